"""Spread and significance: hand-computed means, deviations, test statistics and verdicts."""

import math

import pytest

from kprune.report.stats import BETTER, UNTESTED, WITHIN, WORSE, Difference, difference, summarize


def test_summary_is_the_mean_and_the_sample_deviation():
    s = summarize([0.5, 0.6, 0.7])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1) and s.n == 3  # sqrt(0.02 / 2)
    assert s.text() == "0.600 ± 0.100"
    one = summarize([0.612])
    assert one.std is None and one.text() == "0.612"
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_welch_t_test_between_groups_of_seeds():
    # means 0.61 and 0.51, both std 0.01 over 3 runs: t = 0.1 / sqrt(2 * 0.01^2 / 3) = 12.247 on 4
    # degrees of freedom; two-sided p = 2.552e-4
    d = difference([0.60, 0.61, 0.62], [0.50, 0.51, 0.52])
    assert d.change == pytest.approx(0.1) and d.test == "welch" and d.verdict == BETTER
    assert d.p == pytest.approx(2.552e-4, rel=1e-3)
    assert difference([0.50, 0.51, 0.52], [0.60, 0.61, 0.62]).verdict == WORSE
    # 0.62 +- 0.02 against 0.60 +- 0.01: t = 0.02 / sqrt(0.0004 / 3 + 0.0001 / 3) = 1.549 on 2.94
    # degrees of freedom (Welch-Satterthwaite), p = 0.221: two points that are within the spread
    d = difference([0.60, 0.62, 0.64], [0.59, 0.60, 0.61])
    assert d.verdict == WITHIN and d.p == pytest.approx(0.2209, abs=1e-4)
    assert d.text() == "+2.0 pts (within spread, p 0.221)"
    # identical runs in each group (a deterministic host): any difference is real, none is not
    assert difference([0.5, 0.5], [0.4, 0.4]).verdict == BETTER
    assert difference([0.5, 0.5], [0.5, 0.5]).verdict == WITHIN


def test_single_runs_need_a_given_spread():
    # two single runs with a run-to-run std of 0.01: the difference has std 0.01 * sqrt(2) = 0.01414;
    # 3 points give z = 2.121, p = 0.0339 (worse); 2 points give z = 1.414, p = 0.157 (within)
    d = difference([0.57], [0.60], spread=0.01)
    assert d.test == "z" and d.verdict == WORSE and d.p == pytest.approx(0.03389, abs=1e-5)
    assert difference([0.58], [0.60], spread=0.01).p == pytest.approx(0.15730, abs=1e-5)
    assert difference([0.58], [0.60], spread=0.01).verdict == WITHIN
    # three runs against one: std of the difference 0.01 * sqrt(1/3 + 1) = 0.011547
    d = difference([0.58, 0.58, 0.58], [0.60], spread=0.01)
    assert d.p == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(0.02 / 0.011547 / math.sqrt(2)))), abs=1e-6)
    none = difference([0.57], [0.60])
    assert none.verdict == UNTESTED and none.p is None and none.text() == f"-3.0 pts ({UNTESTED})"
    assert Difference(**none.as_dict()) == none
    with pytest.raises(ValueError, match="spread -0.1"):
        difference([0.5], [0.6], spread=-0.1)
