"""Which filters to remove: the strategies of structured pruning, and :func:`prune_filters`.

- ``uniform``: the same ratio in every group (Li et al.'s "prune once").
- ``independent``: a ratio per layer (``ratios``: layer name or regular expression -> ratio), for
  example from a sensitivity analysis; layers not named keep all their filters.
- ``global``: one ranking of all units across layers; the lowest-scoring go until ``ratio`` of the
  filters in scope is removed (use the ``l1-normalized`` criterion for fair comparison).

Constraints, applied to every group: never more than ``max_ratio`` of its channels, never all of
them, and kept channels rounded up to a multiple of ``round_to`` (8 by default: odd channel counts
waste the speed-up on vector hardware).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from kprune.prune.graph import ChannelGraph, Group
from kprune.prune.importance import filter_scores, unit_score

STRATEGIES = ("uniform", "independent", "global")


@dataclass
class FilterPlan:
    """Units chosen for removal, and for every producer its channels before and after."""

    removed: List[int]
    channels: Dict[str, tuple] = field(default_factory=dict)  # producer -> (before, after)
    capped: List[str] = field(default_factory=list)  # groups held back by max_ratio or to keep a channel


def group_size(group: Group) -> int:
    """Units of a group, prunable or protected."""
    return len(group.units) + group.protected_units


def _cap(group: Group, max_ratio: float, original: Optional[Dict[str, int]]) -> int:
    """The most units ``max_ratio`` lets go from the group, counted against its size in the
    original model when it was pruned before (``original``: group name -> units)."""
    total = group_size(group)
    first = (original or {}).get(group.name, total)
    return max(0, total - int(math.ceil((1.0 - max_ratio) * first - 1e-9)))


def _group_limits(group: Group, n_remove: int, round_to: int, max_ratio: float,
                  original: Optional[Dict[str, int]] = None) -> int:
    """The number of units the constraints allow to remove, at most ``n_remove``."""
    total = group_size(group)
    widths = {u.width for u in group.units}
    step = round_to // math.gcd(round_to, widths.pop()) if len(widths) == 1 and round_to > 1 else max(round_to, 1)
    n = min(n_remove, len(group.units), _cap(group, max_ratio, original))
    kept = total - n
    if kept < total:
        kept = min(total, max(step, int(math.ceil(kept / step)) * step))
    kept = max(kept, 1)
    return max(total - kept, 0)


def _validate(ratio: float, round_to: int, max_ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio}: must be in [0, 1) (a ratio of 1 would empty every layer)")
    if round_to < 1:
        raise ValueError(f"round_to {round_to}: must be >= 1")
    if not 0.0 < max_ratio < 1.0:
        raise ValueError(f"max_ratio {max_ratio}: must be in (0, 1)")


def plan_filters(model, graph: ChannelGraph, ratio: float = 0.5, criterion: str = "l1", strategy: str = "uniform",
                 layers: Optional[List[str]] = None, round_to: int = 8, max_ratio: float = 0.9,
                 ratios: Optional[Dict[str, float]] = None,
                 original: Optional[Dict[str, int]] = None, sample=None) -> FilterPlan:
    """Choose the units to remove.

    Args:
        layers: producers in scope (see :func:`kprune.prune.scope.layers_in_scope`); a group is
            pruned only if all its producers are in scope. None: all.
        ratio: fraction of filters to remove (per group for ``uniform``, overall for ``global``).
        ratios: for ``independent``, layer name or regular expression -> ratio.
        original: for a model pruned before, the units of each group in the original model
            (:func:`group_sizes` of it), so that ``max_ratio`` caps the total over all prunings.
        sample: training data for a criterion that needs it (:class:`kprune.prune.importance.Sample`).

    Raises:
        ValueError: bad ratio, strategy or criterion, or ``independent`` without ``ratios``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    _validate(ratio, round_to, max_ratio)
    groups = prunable_groups(graph, layers)
    scores = filter_scores(model, [p for g in groups for p in g.producers], criterion, sample)
    ranked = {id(g): sorted(g.units, key=lambda u: unit_score(u, scores)) for g in groups}

    wanted: Dict[int, int] = {}
    if strategy == "uniform":
        wanted = {id(g): int(round(ratio * group_size(g))) for g in groups}
    elif strategy == "independent":
        if not ratios:
            raise ValueError("strategy independent needs per-layer ratios (layer name or pattern -> ratio)")
        for pattern, value in ratios.items():
            _validate(float(value), round_to, max_ratio)
        for g in groups:
            value = next((float(v) for p, v in ratios.items()
                          if any(p == name or re.fullmatch(p, name) for name in g.producers)), 0.0)
            wanted[id(g)] = int(round(value * group_size(g)))
    else:
        wanted = _global_counts(groups, ranked, scores, ratio, round_to, max_ratio, original)

    plan = FilterPlan(removed=[])
    for g in groups:
        n = _group_limits(g, wanted[id(g)], round_to, max_ratio, original)
        if wanted[id(g)] > min(len(g.units), _cap(g, max_ratio, original), group_size(g) - 1):
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


def _global_counts(groups, ranked, scores, ratio, round_to, max_ratio, original) -> Dict[int, int]:
    """Per group, how many of its lowest units fall under the global threshold that removes
    (after the constraints) the fraction of channels closest to ``ratio``."""
    everything = sorted((unit_score(u, scores), id(g)) for g in groups for u in ranked[id(g)])
    sizes = {id(g): group_size(g) * max(u.width for u in g.units) for g in groups}
    width = {id(g): max(u.width for u in g.units) for g in groups}
    by_id = {id(g): g for g in groups}
    total = sum(sizes.values())

    def counts(k: int) -> Dict[int, int]:
        c = {key: 0 for key in by_id}
        for _, key in everything[:k]:
            c[key] += 1
        return c

    def achieved(k: int) -> float:
        c = counts(k)
        return sum(_group_limits(by_id[key], n, round_to, max_ratio, original) * width[key]
                   for key, n in c.items()) / total

    lo, hi = 0, len(everything)
    while lo < hi:  # the smallest k that reaches the ratio (achieved() never decreases with k)
        mid = (lo + hi) // 2
        if achieved(mid) >= ratio:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(achieved(lo - 1) - ratio) < abs(achieved(lo) - ratio):
        lo -= 1
    return counts(lo)
