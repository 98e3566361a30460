"""Structured pruning in rounds, with fine-tuning after each round.

The schedules themselves (the fraction after each round) are in :mod:`.schedules`.

- **Gradual global**: round t of n removes filters until a fraction
  ``s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3`` of the original filters in scope is gone (the cubic
  schedule of Zhu & Gupta, applied to whole filters), ranked globally by the ``l1-normalized``
  criterion so that layers compare fairly. Early rounds remove much, the last ones little, while
  the network has the most to recover from.
- **Iterative**: round t removes ``t * step`` of the original filters; the rounds stop at the first
  one whose mAP@0.5 after fine-tuning is more than ``max_drop`` below the baseline, and the model of
  the round before is the result.

Every round prunes the current (already pruned, fine-tuned) model; ``max_ratio`` still caps each
layer against its original width, and the history refers to the original model throughout.
The fine-tuning is a function given by the caller (:func:`kprune.prune.command.prune` trains with
:func:`kprune.train.train_model`), so the rounds can be tested without a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from kprune.models.counting import count_flops, count_params
from kprune.prune.allocation import ALLOCATIONS, get_allocation
from kprune.prune.graph import ChannelGraph
from kprune.prune.scope import layers_in_scope
from kprune.prune.plan import group_sizes, prunable_channels
from kprune.prune.structured import prune_filters
from kprune.prune.surgeon import History

# fine-tune a pruned model after round ``t`` (1-based); returns the model and its metrics (``map50``)
Finetune = Callable[[object, int], Tuple[object, dict]]

MAX_ROUND_RATIO = 0.99


@dataclass
class RoundsResult:
    """The final model, its history (original-model indices) and one record per round."""

    model: object
    history: History
    rounds: List[dict] = field(default_factory=list)
    stopped: str = ""  # why the rounds ended early, if they did
    metrics: dict = field(default_factory=dict)  # the fine-tuning metrics of the returned model
    layers: List[dict] = field(default_factory=list)  # per producer: channels in the original and final model


def prune_in_rounds(model, targets: Sequence[float], finetune: Finetune, criterion: str = "l1-normalized",
                    allocation: str = "global", scope: str = "all", round_to: int = 8, max_ratio: float = 0.9,
                    baseline_map: Optional[float] = None, max_drop: Optional[float] = None,
                    log: Optional[Callable[[str], None]] = None, sample=None) -> RoundsResult:
    """Prune ``model`` (left unchanged) in rounds to the given fractions of its filters.

    Args:
        targets: after round t, this fraction of the original filters in scope is removed
            (:meth:`kprune.prune.schedules.Schedule.targets`); non-decreasing, in [0, 1).
        finetune: called after every round's surgery.
        criterion, allocation (``uniform`` or ``global``), scope, round_to, max_ratio: as in
            :func:`kprune.prune.structured.prune_filters`.
        baseline_map, max_drop: stop at the first round whose mAP@0.5 (``finetune``'s ``map50``)
            is more than ``max_drop`` below ``baseline_map``, and return the round before.
        log: receives one line per round.
        sample: training data for a data-driven criterion, scored anew on each round's model.

    Returns:
        :class:`RoundsResult`; each round has ``round``, ``target``, ``ratio`` (the fraction of the
        current model's filters removed in the round), ``removed`` (of the original filters, as
        achieved after rounding and caps), ``params``, ``flops``, ``capped``, ``map50`` and
        ``metrics`` (all of ``finetune``'s).

    Raises:
        ValueError: bad targets or allocation, or ``max_drop`` without ``baseline_map``.
    """
    if not get_allocation(allocation).in_rounds:
        raise ValueError(f"allocation {allocation!r} in rounds: choose one of "
                         f"{', '.join(name for name, a in ALLOCATIONS.items() if a.in_rounds)}")
    if not targets or any(not 0.0 <= t < 1.0 for t in targets) or list(targets) != sorted(targets):
        raise ValueError(f"round targets {list(targets)}: need a non-decreasing list of fractions in [0, 1)")
    if (max_drop is None) != (baseline_map is None):
        raise ValueError("stopping on an mAP drop needs both max_drop and baseline_map")

    graph = ChannelGraph(model)
    layers = layers_in_scope(model, scope)
    original, total = group_sizes(graph, layers), prunable_channels(graph, layers)
    widths = {name: len(ids) for name, ids in graph.producers.items()}
    result = RoundsResult(model, {})
    for t, target in enumerate(targets, start=1):
        current = prunable_channels(ChannelGraph(result.model), layers)
        ratio = min(max(0.0, 1.0 - (1.0 - target) * total / current), MAX_ROUND_RATIO) if current else 0.0
        pruned = prune_filters(result.model, ratio, criterion, allocation, scope, round_to, max_ratio,
                               history=result.history, original=original, sample=sample)
        tuned, metrics = finetune(pruned.model, t)
        record = {"round": t, "target": target, "ratio": ratio,
                  "removed": 1.0 - prunable_channels(ChannelGraph(tuned), layers) / total,
                  "params": count_params(tuned)["params"], "flops": count_flops(tuned),
                  "capped": pruned.capped, "map50": metrics.get("map50"), "metrics": metrics}
        result.rounds.append(record)
        if log:
            log(f"round {t}/{len(targets)}: {record['removed']:.1%} of the filters removed (target {target:.1%}), "
                f"{record['flops'] / 1e9:.3f} GFLOPs, mAP@0.5 {_fmt(record['map50'])}")
        if max_drop is not None and (record["map50"] is None or baseline_map - record["map50"] > max_drop):
            result.stopped = (f"round {t}: mAP@0.5 {_fmt(record['map50'])} is more than {max_drop} below the "
                              f"baseline {baseline_map:.4f}; the model of round {t - 1} is kept")
            if log:
                log(result.stopped)
            break
        result.model, result.history, result.metrics = tuned, pruned.history, metrics
    kept = {name: len(ids) for name, ids in ChannelGraph(result.model).producers.items()}
    result.layers = [{"name": name, "channels_before": n, "channels_after": kept[name]} for name, n in widths.items()]
    return result


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"
