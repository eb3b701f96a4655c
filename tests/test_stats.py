"""common/stats.py against hand-computed cases: bootstrap intervals, win rates, verdicts, the Welch test over steps."""

import math

import numpy as np
import pytest

from common import stats
from common.stats import (
    Interval,
    bootstrap_mean,
    paired_difference,
    step_trend,
    t_quantile,
    verdict,
    welch_difference,
    win_rate,
    wins,
)


def test_constant_difference_has_a_zero_width_interval_at_that_difference():
    a = [1.5, 2.0, 7.25, -3.0, 0.5, 4.0]
    b = [x - 0.5 for x in a]  # exact in binary: every difference is 0.5
    d = paired_difference(a, b)
    assert (d.mean, d.low, d.high, d.n) == (0.5, 0.5, 0.5, 6)
    assert verdict(d) == "rose"
    assert verdict(paired_difference(b, a)) == "fell"


def test_bootstrap_mean_hand_case_and_reproducibility():
    m = bootstrap_mean([1.0, 2.0, 3.0, 4.0])
    assert m.mean == 2.5 and m.n == 4
    # The mean of 4 draws from {1, 2, 3, 4} is at most 1.25 (sum <= 5) in 5/256 = 2.0% of resamples and at most 1.5
    # in 15/256 = 5.9%: the 2.5% quantile is 1.5, the 97.5% one 3.5 by symmetry (any mean stays inside [1, 4]).
    assert (m.low, m.high) == (1.5, 3.5)
    assert bootstrap_mean([1.0, 2.0, 3.0, 4.0]) == m  # fixed seed: the same interval every time
    values = np.random.default_rng(0).normal(0, 1, 50)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values, seed=0)  # another seed, other resamples
    # the same seed and the same number of values draw the same resamples: a mean minus a constant shifts exactly
    shifted = bootstrap_mean([0.0, 1.0, 2.0, 3.0])
    assert (shifted.low, shifted.high) == (m.low - 1, m.high - 1)


def test_too_few_values_give_no_interval_and_no_verdict():
    assert math.isnan(bootstrap_mean([]).mean) and bootstrap_mean([]).n == 0
    one = bootstrap_mean([3.0])
    assert one.mean == 3.0 and math.isnan(one.low) and verdict(one) == "no clear change"
    assert one.as_dict() == {"mean": 3.0, "low": None, "high": None, "n": 1}
    assert verdict(None) == "no clear change"
    assert verdict({"mean": 1.0, "low": None, "high": None}) == "no clear change"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_pure_noise_gives_no_clear_change(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    assert verdict(paired_difference(a, b)) == "no clear change"
    assert verdict(win_rate(a, b), null=0.5) == "no clear change"
    assert step_trend(rng.normal(5, 1, 100))["verdict"] == "no clear change"


def test_false_alarm_rate_on_noise_is_about_five_percent():
    """Calibration rather than luck: over 200 noise draws, a 95% interval claims a change about 5% of the time."""
    rng = np.random.default_rng(123)
    alarms = sum(verdict(paired_difference(rng.normal(0, 1, 60), rng.normal(0, 1, 60), resamples=500, seed=s))
                 != "no clear change" for s in range(200))
    assert 2 <= alarms <= 20, alarms  # 10 expected; percentile intervals run a little narrow at n = 60
    alarms = sum(step_trend(rng.normal(0, 1, 50))["verdict"] != "no clear change" for _ in range(200))
    assert 2 <= alarms <= 20, alarms


def test_a_clear_shift_rises_or_falls():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 100)
    better = base + 1.0 + rng.normal(0, 0.5, 100)
    assert verdict(paired_difference(better, base)) == "rose"
    assert verdict(paired_difference(base, better)) == "fell"
    assert verdict(win_rate(better, base), null=0.5) == "rose"
    steps = np.concatenate([rng.normal(1.0, 0.3, 20), rng.normal(2.0, 0.3, 20)])
    assert step_trend(steps)["verdict"] == "rose"
    assert step_trend(steps[::-1])["verdict"] == "fell"


def test_win_rate_ties_count_half_and_identical_answers_give_one_half():
    assert wins([1, 2, 3, 4], [0, 2, 5, 1]) == [1.0, 0.5, 0.0, 1.0]
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]).mean == 0.625
    x = [0.3, -1.2, 4.0, 0.0, 2.5]
    same = win_rate(x, x)
    assert (same.mean, same.low, same.high) == (0.5, 0.5, 0.5)
    assert verdict(same, null=0.5) == "no clear change"
    # identical answers tie even where their scores differ by rounding
    assert wins([1.0000001, 2.0], [1.0, 1.0], same=[True, False]) == [0.5, 1.0]


def test_verdict_needs_the_whole_interval_past_the_null():
    assert verdict(Interval(0.2, 0.01, 0.4, 10)) == "rose"
    assert verdict(Interval(0.2, 0.0, 0.4, 10)) == "no clear change"  # touching 0 is not excluding it
    assert verdict((-0.3, -0.1)) == "fell"
    assert verdict({"low": 0.55, "high": 0.7}, null=0.5) == "rose"
    assert verdict({"low": 0.45, "high": 0.7}, null=0.5) == "no clear change"


@pytest.mark.parametrize("df, expected", [(1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (10, 2.2281389),
                                          (30, 2.0422725), (1e6, 1.9599664)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)


def test_t_quantile_non_integer_degrees_of_freedom_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.5, 3.7, 4.959, 17.2):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8)


def test_welch_hand_case():
    # first [1, 2, 3]: mean 2, s^2 = 1; last [4, 5, 6, 7]: mean 5.5, s^2 = 5/3
    # se^2 = 1/3 + 5/12 = 3/4; df = (3/4)^2 / ((1/3)^2 / 2 + (5/12)^2 / 3) = 4.95918; t(0.975, 4.95918) = 2.5769584
    d = welch_difference([1, 2, 3], [4, 5, 6, 7])
    half = 2.5769584 * math.sqrt(0.75)
    assert d.mean == 3.5 and d.n == 7
    assert d.low == pytest.approx(3.5 - half, abs=1e-6) and d.high == pytest.approx(3.5 + half, abs=1e-6)
    assert verdict(d) == "rose"
    flat = welch_difference([2.0, 2.0], [3.0, 3.0])  # no spread at all: the interval is the difference itself
    assert (flat.low, flat.high) == (1.0, 1.0)


def test_step_trend_first_and_last_fifth():
    r = step_trend([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # fifths of 2 steps: [0, 1] and [8, 9]
    assert (r["first"], r["last"], r["difference"], r["steps"]) == (0.5, 8.5, 8.0, 2)
    assert r["verdict"] == "rose"
    constant = step_trend([1.0] * 20)
    assert constant["difference"] == 0.0 and constant["verdict"] == "no clear change"
    gaps = step_trend([1.0, None, float("nan"), 2.0, 3.0, 4.0])  # skipped steps are left out and counted
    assert gaps["dropped"] == 2 and gaps["steps"] == 2
    few = step_trend([1.0, 2.0, 3.0])
    assert few["verdict"] == "no clear change" and few["low"] is None and "too few" in few["note"]


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
    assert stats.RESAMPLES == 2000 and stats.LEVEL == 0.95
