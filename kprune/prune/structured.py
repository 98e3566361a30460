"""Structured pruning in one call: plan (:mod:`.plan`), remove (:mod:`.surgeon`), measure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from kprune.prune.graph import ChannelGraph
from kprune.prune.scope import layers_in_scope
from kprune.prune.plan import plan_filters
from kprune.prune.surgeon import History, compose_history, remove_units


@dataclass
class PruneResult:
    """A pruned model, its history (dense-model indices) and the per-layer summary."""

    model: object
    history: History
    layers: List[dict]
    protected: Dict[str, str]
    unhandled: Dict[str, str]
    capped: List[str]


def prune_filters(model, ratio: float, criterion: str = "l1", allocation: str = "uniform", scope: str = "all",
                  round_to: int = 8, max_ratio: float = 0.9, ratios: Optional[Dict[str, float]] = None,
                  history: Optional[History] = None, original: Optional[Dict[str, int]] = None,
                  sample=None) -> PruneResult:
    """Remove filters from ``model`` (which is left unchanged) and return the smaller model.

    Args:
        ratio, criterion, allocation, round_to, max_ratio, ratios: see :func:`plan_filters`.
        scope: see :func:`kprune.prune.scope.layers_in_scope`.
        history: the history ``model`` already carries (when pruning a pruned model again), so
            that the result's history still refers to the dense model.
        original: see :func:`plan_filters` (``max_ratio`` over several prunings).
        sample: training data for a data-driven criterion (see :func:`plan_filters`).
    """
    graph = ChannelGraph(model)
    plan = plan_filters(model, graph, ratio, criterion, allocation, layers_in_scope(model, scope), round_to,
                        max_ratio, ratios, original, sample)
    pruned, new_history = remove_units(model, graph, plan.removed)
    layers = [{"name": name, "channels_before": before, "channels_after": after}
              for name, (before, after) in plan.channels.items()]
    return PruneResult(pruned, compose_history(history, new_history), layers, graph.protected_producers(),
                       dict(graph.unhandled), plan.capped)
