"""How many filters each layer loses: the registry of allocation strategies.

- ``uniform``: the same ratio in every group (Li et al.'s "prune once").
- ``independent``: a ratio per layer (layer name or regular expression -> ratio), for example from
  a sensitivity analysis; layers not named keep all their filters.
- ``global``: one ranking of all units across layers; the lowest-scoring go until ``ratio`` of the
  filters in scope is removed (use the ``l1-normalized`` criterion for a fair comparison).
- ``sensitivity``: per-layer ratios read from sensitivity curves (``kprune sensitivity``), every layer
  losing as many filters as keep its predicted mAP loss within one tolerance; for budgets only (the
  budget search finds the tolerance).

Constraints, applied to every group whatever the allocation: never more than ``max_ratio`` of its
channels, never all of them, and kept channels rounded up to a multiple of ``round_to``.

An allocation is an object with a ``name``, a docstring, :meth:`Allocation.counts` (units to remove
per group) and :meth:`Allocation.searched` (the one number a FLOPs or latency budget searches). The
module loads without TensorFlow, so that command-line choices come from :data:`ALLOCATIONS`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from kprune.prune.importance import unit_score
from kprune.prune.registry import Entry, Registry

MAX_BUDGET_RATIO = 0.99  # the budget search's upper end on a ratio; max_ratio still caps every layer
RESOLUTION = 1e-4  # the smallest tolerance searched, in mAP@0.5

# ratio (or the allocation's number) -> a pruning result; ``allocation`` and ``ratios`` override
Prune = Callable[..., object]


def group_size(group) -> int:
    """Units of a group, prunable or protected."""
    return len(group.units) + group.protected_units


def cap(group, max_ratio: float, original: Optional[Dict[str, int]]) -> int:
    """The most units ``max_ratio`` lets go from the group, counted against its size in the
    original model when it was pruned before (``original``: group name -> units)."""
    total = group_size(group)
    first = (original or {}).get(group.name, total)
    return max(0, total - int(math.ceil((1.0 - max_ratio) * first - 1e-9)))


def group_limits(group, n_remove: int, round_to: int, max_ratio: float,
                 original: Optional[Dict[str, int]] = None) -> int:
    """The number of units the constraints allow to remove, at most ``n_remove``."""
    total = group_size(group)
    widths = {u.width for u in group.units}
    step = round_to // math.gcd(round_to, widths.pop()) if len(widths) == 1 and round_to > 1 else max(round_to, 1)
    n = min(n_remove, len(group.units), cap(group, max_ratio, original))
    kept = total - n
    if kept < total:
        kept = min(total, max(step, int(math.ceil(kept / step)) * step))
    kept = max(kept, 1)
    return max(total - kept, 0)


def check_ratio(ratio: float, round_to: int, max_ratio: float) -> None:
    """Refuse a ratio outside [0, 1), ``round_to`` < 1, or ``max_ratio`` outside (0, 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio}: must be in [0, 1) (a ratio of 1 would empty every layer)")
    if round_to < 1:
        raise ValueError(f"round_to {round_to}: must be >= 1")
    if not 0.0 < max_ratio < 1.0:
        raise ValueError(f"max_ratio {max_ratio}: must be in (0, 1)")


class Allocation(Entry):
    """A way to spread filter removal over the groups of a model."""

    in_rounds = False  # usable by the gradual and iterative schedules (one ratio of all filters)
    budget_only = False  # takes a FLOPs or latency budget, never a ratio

    def counts(self, groups: List, ranked: Dict[int, List], scores, ratio: float,
               ratios: Optional[Dict[str, float]], round_to: int, max_ratio: float,
               original: Optional[Dict[str, int]]) -> Dict[int, int]:
        """Units to remove per group (``id(group)`` -> count), before the constraints.

        Args:
            groups: the prunable groups in scope; ``ranked``: their units, lowest score first.
            scores: the criterion's scores (:func:`kprune.prune.importance.unit_score`).
            ratio, ratios: the fraction asked, or the per-layer fractions.
        """
        raise NotImplementedError

    def searched(self, prune: Prune, layer_ratios: Optional[Dict[str, float]],
                 sensitivity: Optional[dict]) -> Tuple[Callable[[float], object], float]:
        """The number a budget searches, as a function (number -> ``prune``'s result), and its
        largest value. By default the ratio."""
        return prune, MAX_BUDGET_RATIO


ALLOCATIONS: Registry[Allocation] = Registry("allocation")
register = ALLOCATIONS.register


def get_allocation(name: str) -> Allocation:
    """The allocation registered as ``name`` (an unknown name is a ValueError listing the known ones)."""
    return ALLOCATIONS.find(name)


@register
class Uniform(Allocation):
    """The same fraction of every layer's filters (Li et al.'s prune once)."""

    name = "uniform"
    in_rounds = True

    def counts(self, groups, ranked, scores, ratio, ratios, round_to, max_ratio, original):
        return {id(g): int(round(ratio * group_size(g))) for g in groups}


@register
class Independent(Allocation):
    """A fraction per layer (--layer-ratio; a budget scales them together); layers not named keep all."""

    name = "independent"

    def counts(self, groups, ranked, scores, ratio, ratios, round_to, max_ratio, original):
        if not ratios:
            raise ValueError("allocation independent needs per-layer ratios (layer name or pattern -> ratio)")
        for value in ratios.values():
            check_ratio(float(value), round_to, max_ratio)
        wanted = {}
        for g in groups:
            value = next((float(v) for p, v in ratios.items()
                          if any(p == name or re.fullmatch(p, name) for name in g.producers)), 0.0)
            wanted[id(g)] = int(round(value * group_size(g)))
        return wanted

    def searched(self, prune, layer_ratios, sensitivity):
        top = max((layer_ratios or {}).values(), default=0.0) or 1.0  # none: counts() says what is missing
        return (lambda x: prune(0.0, ratios={k: v * x / top for k, v in (layer_ratios or {}).items()}),
                MAX_BUDGET_RATIO)


@register
class Global(Allocation):
    """One ranking of all filters across layers; the lowest-scoring go (use l1-normalized)."""

    name = "global"
    in_rounds = True

    def counts(self, groups, ranked, scores, ratio, ratios, round_to, max_ratio, original):
        """Per group, how many of its lowest units fall under the global threshold that removes
        (after the constraints) the fraction of channels closest to ``ratio``."""
        everything = sorted((unit_score(u, scores), id(g)) for g in groups for u in ranked[id(g)])
        width = {id(g): max(u.width for u in g.units) for g in groups}
        sizes = {id(g): group_size(g) * width[id(g)] for g in groups}
        by_id = {id(g): g for g in groups}
        total = sum(sizes.values())

        def counts(k: int) -> Dict[int, int]:
            c = {key: 0 for key in by_id}
            for _, key in everything[:k]:
                c[key] += 1
            return c

        def achieved(k: int) -> float:
            return sum(group_limits(by_id[key], n, round_to, max_ratio, original) * width[key]
                       for key, n in counts(k).items()) / total

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


@register
class Sensitivity(Allocation):
    """Per-layer fractions from sensitivity curves (--sensitivity), the same predicted mAP loss each."""

    name = "sensitivity"
    budget_only = True

    def counts(self, groups, ranked, scores, ratio, ratios, round_to, max_ratio, original):
        raise ValueError("allocation sensitivity meets a budget (--remove-flops or --target-latency); "
                         "it takes no ratio")

    def searched(self, prune, layer_ratios, sensitivity):
        if sensitivity is None:
            raise ValueError("allocation sensitivity needs the sensitivity curves: give --sensitivity "
                             "MODEL.sensitivity/sensitivity.json (written by kprune sensitivity)")
        return (lambda loss: prune(0.0, allocation="independent", ratios=sensitivity_ratios(sensitivity, loss)),
                max_loss(sensitivity) or RESOLUTION)


def losses(row: dict, baseline: float) -> List[float]:
    """A layer's predicted mAP loss at each ratio of its sensitivity curve: the drop below the
    baseline, never negative and never smaller than at a lower ratio (removing more filters is not
    taken to help)."""
    return list(np.maximum.accumulate(np.maximum(baseline - np.asarray(row["map50"], dtype=float), 0.0)))


def max_loss(result: dict) -> float:
    """The largest predicted loss of any layer: a tolerance this high prunes every layer the most."""
    return max(max(losses(row, result["baseline"])) for row in result["layers"])


def ratio_within(row: dict, baseline: float, ratios: Sequence[float], tolerance: float) -> float:
    """The largest ratio whose predicted loss (linear between the measured ratios, 0 at ratio 0) is
    at most ``tolerance``."""
    xs, ys = [0.0, *ratios], [0.0, *losses(row, baseline)]
    best = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= tolerance:
            best = x1
        elif y0 <= tolerance:  # the curve crosses the tolerance on this segment
            return x0 + (x1 - x0) * (tolerance - y0) / (y1 - y0)
        else:
            break
    return best


def sensitivity_ratios(result: dict, tolerance: float) -> Dict[str, float]:
    """Per-layer ratios (first producer of each group -> ratio) from a sensitivity analysis
    (:func:`kprune.prune.sensitivity.analyze`): each group loses as many filters as keep its
    predicted mAP loss within ``tolerance``, so the layers that hold up lose the most."""
    order = np.argsort(result["ratios"])
    ratios = [float(result["ratios"][i]) for i in order]
    return {row["producers"][0]: ratio_within({"map50": [row["map50"][i] for i in order]}, result["baseline"],
                                              ratios, tolerance)
            for row in result["layers"]}
