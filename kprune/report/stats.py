"""Run-to-run spread, and when a difference of mAP is larger than it.

Two groups of runs (e.g. a pruned model over seeds and its dense control over the same seeds) differ
when a two-sided test rejects "same mean" at ``ALPHA``:

- both groups have at least two runs: Welch's t-test (unequal variances), from scipy;
- otherwise, with a ``spread`` (the standard deviation of one run, measured elsewhere, e.g. over
  seeds of the baseline): a z-test with that standard deviation, the difference of the means
  having ``spread * sqrt(1 / n_a + 1 / n_b)``;
- otherwise nothing is decided: one run says nothing about the spread.

A difference is only called ``better`` or ``worse`` when the test rejects; else it is ``within
spread``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from scipy import stats

ALPHA = 0.05
BETTER, WORSE, WITHIN, UNTESTED = "better", "worse", "within spread", "untested: 1 run, no spread given"


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (None for one run) and number of runs."""

    mean: float
    std: Optional[float]
    n: int

    def text(self, digits: int = 3) -> str:
        """``0.612 ± 0.011`` (``0.612`` for one run)."""
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (``ddof=1``) of ``values``.

    Raises:
        ValueError: no values.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize: no values")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return Summary(mean, std, len(values))


@dataclass(frozen=True)
class Difference:
    """``a - b`` in means, the test used, its two-sided p-value and the verdict."""

    change: float
    test: Optional[str]
    p: Optional[float]
    verdict: str

    def text(self) -> str:
        """``-1.4 pts (worse, p 0.003)``: the change in points of mAP and what the test says."""
        tail = self.verdict if self.p is None else f"{self.verdict}, p {self.p:.3f}"
        return f"{100 * self.change:+.1f} pts ({tail})"

    def as_dict(self) -> dict:
        return asdict(self)


def difference(a: Sequence[float], b: Sequence[float], spread: Optional[float] = None) -> Difference:
    """How the runs ``a`` differ from the runs ``b`` (see the module docstring for the rule).

    Args:
        a, b: one value per run (e.g. mAP@0.5 per seed).
        spread: the standard deviation of one run, used when a group has a single run.

    Raises:
        ValueError: an empty group, or a negative spread.
    """
    if spread is not None and spread < 0:
        raise ValueError(f"spread {spread}: a standard deviation is >= 0")
    sa, sb = summarize(a), summarize(b)
    change = sa.mean - sb.mean
    if sa.n >= 2 and sb.n >= 2:
        if sa.std == 0 and sb.std == 0:  # identical runs in each group: any difference is real
            p = 1.0 if change == 0 else 0.0
        else:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        test = "welch"
    elif spread is not None:
        sigma = spread * math.sqrt(1 / sa.n + 1 / sb.n)
        p = (1.0 if change == 0 else 0.0) if sigma == 0 else float(2 * stats.norm.sf(abs(change) / sigma))
        test = "z"
    else:
        return Difference(change, None, None, UNTESTED)
    verdict = WITHIN if p >= ALPHA else (BETTER if change > 0 else WORSE)
    return Difference(change, test, p, verdict)
