"""Budgets instead of ratios: remove filters until a fraction of the FLOPs (or of a predicted
latency, :mod:`.latency`) is gone.

A budget is met by searching the one number an allocation strategy takes — the ratio of ``uniform``
and ``global``, a factor on the per-layer ratios of ``independent``, the tolerated mAP loss per layer
of ``sensitivity`` — for the smallest value whose pruned model has at least the asked fraction of the
cost removed. The cost falls with that number in steps (whole filters, kept filters rounded to
``round_to``), so the search is a bisection on it, each step a real surgery measured with the cost
function (:func:`kprune.models.counting.count_flops` by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kprune.models.counting import count_flops

TOLERANCE = 0.01  # the landing the search aims at: within 1 point above the asked fraction
RESOLUTION = 1e-4  # the search stops when the interval of ratios is this narrow


@dataclass
class BudgetResult:
    """The pruning that met the budget: the value searched (``ratio``), what ``prune`` returned for
    it, and the fraction of the cost it removed."""

    ratio: float
    result: object
    removed: float


def meet_budget(model, target: float, prune: Callable[[float], object], high: float,
                cost: Callable[[object], float] = count_flops, what: str = "FLOPs") -> BudgetResult:
    """The smallest value in [0, ``high``] whose pruning removes at least ``target`` of the cost.

    Args:
        model: the model to prune (left unchanged).
        target: fraction of ``model``'s cost to remove, in (0, 1).
        prune: value -> an object with the pruned model as ``.model`` (e.g.
            :func:`kprune.prune.structured.prune_filters` with the other options bound).
        high: the largest value the allocation accepts.
        cost: model -> its cost (FLOPs, predicted milliseconds).
        what: the cost's name, for messages.

    Raises:
        ValueError: ``target`` outside (0, 1), or not reachable even at ``high`` (the message gives
            the most that can be removed under the constraints).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"{what} budget {target}: the fraction of {what} to remove must be in (0, 1)")
    dense = cost(model)

    def attempt(ratio: float) -> BudgetResult:
        result = prune(ratio)
        return BudgetResult(ratio, result, 1.0 - cost(result.model) / dense)

    best = attempt(high)
    if best.removed < target:
        raise ValueError(f"{what} budget {target:.1%}: at most {best.removed:.1%} of the {what} can be removed "
                         f"under the constraints (at {high:g}; raise --max-ratio or lower --round-to)")
    low = 0.0
    while high - low > RESOLUTION and best.removed > target + TOLERANCE / 10:
        middle = (low + high) / 2
        trial = attempt(middle)
        if trial.removed >= target:
            high, best = middle, trial
        else:
            low = middle
    return best

