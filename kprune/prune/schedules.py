"""When filters are removed: the registry of pruning schedules.

- ``once``: one pruning, then (optionally) one retraining (Li et al.'s prune once and retrain).
- ``gradual``: ``rounds`` rounds (4) on the cubic schedule of Zhu & Gupta,
  ``s_t = s_f + (s_i - s_f) (1 - t / n)^3``, fine-tuned after each; ranked globally by default.
- ``iterative``: ``ratio`` more of every layer's filters per round, fine-tuned after each, at most
  ``rounds`` rounds (10), stopping before the first whose mAP@0.5 drops more than ``max_drop``.

A schedule is an object with a ``name``, a docstring, its defaults (allocation, criterion, rounds)
and :meth:`Schedule.targets`. The rounds themselves run in :mod:`.rounds`. The module loads without
TensorFlow, so that command-line choices come from :data:`SCHEDULES`.
"""

from __future__ import annotations

from typing import List, Optional

from kprune.prune.registry import Entry, Registry


def cubic_targets(final: float, rounds: int, initial: float = 0.0) -> List[float]:
    """The fraction of filters removed after each of ``rounds`` rounds on the cubic schedule.

    Raises:
        ValueError: ``rounds`` < 1, or fractions outside [0, 1) or decreasing.
    """
    if rounds < 1:
        raise ValueError(f"rounds {rounds}: must be >= 1")
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"cubic schedule from {initial} to {final}: need 0 <= initial <= final < 1")
    return [final + (initial - final) * (1.0 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def linear_targets(step: float, rounds: int) -> List[float]:
    """``step, 2 step, ...`` for at most ``rounds`` rounds, below 1 (the iterative schedule).

    Raises:
        ValueError: ``step`` outside (0, 1) or ``rounds`` < 1.
    """
    if not 0.0 < step < 1.0:
        raise ValueError(f"step {step}: the fraction removed per round must be in (0, 1)")
    if rounds < 1:
        raise ValueError(f"rounds {rounds}: must be >= 1")
    return [step * t for t in range(1, rounds + 1) if step * t < 1.0 - 1e-9]


class Schedule(Entry):
    """When the filters go: at once, or in rounds with fine-tuning between them."""

    in_rounds = True  # prunes in rounds, fine-tuning after each (needs data and epochs)
    allocation = "uniform"  # the default allocation strategy
    criterion = "l1"  # the default criterion
    rounds = 1
    stops_on_drop = False  # stops before the first round that loses more than max_drop

    def targets(self, ratio: float, rounds: Optional[int] = None) -> List[float]:
        """The fraction of the original filters removed after each round."""
        raise NotImplementedError


SCHEDULES: Registry[Schedule] = Registry("schedule")
register = SCHEDULES.register


def get_schedule(name: str) -> Schedule:
    """The schedule registered as ``name`` (an unknown name is a ValueError listing the known ones)."""
    return SCHEDULES.find(name)


@register
class Once(Schedule):
    """Prune once, then retrain if asked (--epochs)."""

    name = "once"
    in_rounds = False

    def targets(self, ratio, rounds=None):
        return [ratio]


@register
class Gradual(Schedule):
    """--rounds rounds (4) on the cubic schedule to --ratio, fine-tuned --epochs after each."""

    name = "gradual"
    allocation = "global"
    criterion = "l1-normalized"
    rounds = 4

    def targets(self, ratio, rounds=None):
        return cubic_targets(ratio, rounds or self.rounds)


@register
class Iterative(Schedule):
    """--ratio more of the filters per round, fine-tuned, until mAP@0.5 drops more than --max-drop."""

    name = "iterative"
    rounds = 10
    stops_on_drop = True

    def targets(self, ratio, rounds=None):
        return linear_targets(ratio, rounds or self.rounds)
