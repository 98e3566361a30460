"""Which filters to remove: :func:`plan_filters` ranks each group's units by a criterion
(:mod:`.importance`), asks an allocation strategy (:mod:`.allocation`) how many go from each group,
and applies the constraints (``max_ratio``, never all of a group, ``round_to``: 8 by default, since
odd channel counts waste the speed-up on vector hardware)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from kprune.prune.allocation import cap, check_ratio, get_allocation, group_limits, group_size
from kprune.prune.graph import ChannelGraph, Group
from kprune.prune.importance import filter_scores, unit_score


@dataclass
class FilterPlan:
    """Units chosen for removal, and for every producer its channels before and after."""

    removed: List[int]
    channels: Dict[str, tuple] = field(default_factory=dict)  # producer -> (before, after)
    capped: List[str] = field(default_factory=list)  # groups held back by max_ratio or to keep a channel


def plan_filters(model, graph: ChannelGraph, ratio: float = 0.5, criterion: str = "l1", allocation: str = "uniform",
                 layers: Optional[List[str]] = None, round_to: int = 8, max_ratio: float = 0.9,
                 ratios: Optional[Dict[str, float]] = None,
                 original: Optional[Dict[str, int]] = None, sample=None) -> FilterPlan:
    """Choose the units to remove.

    Args:
        layers: producers in scope (see :func:`kprune.prune.scope.layers_in_scope`); a group is
            pruned only if all its producers are in scope. None: all.
        allocation: a name of :data:`kprune.prune.allocation.ALLOCATIONS`.
        ratio: fraction of filters to remove (per group for ``uniform``, overall for ``global``).
        ratios: for ``independent``, layer name or regular expression -> ratio.
        original: for a model pruned before, the units of each group in the original model
            (:func:`group_sizes` of it), so that ``max_ratio`` caps the total over all prunings.
        sample: training data for a criterion that needs it (:class:`kprune.prune.importance.Sample`).

    Raises:
        ValueError: bad ratio, allocation or criterion, or ``independent`` without ``ratios``.
    """
    allocator = get_allocation(allocation)
    check_ratio(ratio, round_to, max_ratio)
    groups = prunable_groups(graph, layers)
    scores = filter_scores(model, [p for g in groups for p in g.producers], criterion, sample)
    ranked = {id(g): sorted(g.units, key=lambda u: unit_score(u, scores)) for g in groups}

    wanted = allocator.counts(groups, ranked, scores, ratio, ratios, round_to, max_ratio, original)
    plan = FilterPlan(removed=[])
    for g in groups:
        n = group_limits(g, wanted[id(g)], round_to, max_ratio, original)
        if wanted[id(g)] > min(len(g.units), cap(g, max_ratio, original), group_size(g) - 1):
            plan.capped.append(g.name)
        plan.removed.extend(u.root for u in ranked[id(g)][:n])
    keep = graph.keep_masks(plan.removed)
    for name, ids in graph.producers.items():
        plan.channels[name] = (len(ids), int(keep(ids).sum()))
    return plan


def prunable_groups(graph: ChannelGraph, layers: Optional[List[str]] = None) -> List[Group]:
    """The groups with prunable units whose producers are all in ``layers`` (None: all)."""
    scope = set(layers) if layers is not None else None
    return [g for g in graph.groups() if g.units and (scope is None or all(p in scope for p in g.producers))]


def group_sizes(graph: ChannelGraph, layers: Optional[List[str]] = None) -> Dict[str, int]:
    """Group name -> units, for the prunable groups in scope."""
    return {g.name: group_size(g) for g in prunable_groups(graph, layers)}


def prunable_channels(graph: ChannelGraph, layers: Optional[List[str]] = None) -> int:
    """Channels of the prunable groups in scope: what a global ``ratio`` is a fraction of."""
    return sum(group_size(g) * max(u.width for u in g.units) for g in prunable_groups(graph, layers))
