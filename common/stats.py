"""Noise-aware verdicts: is a change real, or could the noise over prompts (or over training steps) explain it?

docs/design.md ("Evaluation and the gold judge"): every verdict the pipeline prints is tested against the noise,
otherwise it says "no clear change". ``evaluate.py`` and the pipeline summary use these pure functions.

    from common.stats import paired_difference, win_rate, verdict, step_trend
    d = paired_difference(gold_final, gold_sft)    # the same prompts, in the same order
    verdict(d)                                     # "rose" | "fell" | "no clear change"
    verdict(win_rate(gold_final, gold_sft), null=0.5)
    step_trend([m["objective/scores"] for m in metrics])["verdict"]

Over prompts: a **percentile bootstrap** (Efron & Tibshirani 1993, ch. 13) that resamples prompts with replacement
(``RESAMPLES`` = 2000 times, a fixed seed, so the same numbers always give the same interval). A difference or a
win rate is **paired**: each resample takes whole prompts, both answers of a prompt together, so what the prompts
have in common (hard questions are hard for every model) cancels out. With the same ``seed`` and the same number
of prompts every function draws the same resamples, so a mean and a difference over the same prompts agree.
Percentile intervals are too narrow for a handful of prompts (they cover less than 95% under about 20); below two
values there is no interval at all and the verdict is "no clear change".

Over training steps (``step_trend``): the mean of the first fifth of the steps against the last fifth, with a
**Welch** interval (unequal variances, Welch-Satterthwaite degrees of freedom, Student t quantile; Welch 1947).
It treats the per-step values of a fifth as independent draws around their mean: PPO's per-step score is a mean
over a fresh batch of prompts, so its noise is close to that. A trend inside a fifth only widens the interval
(its spread counts as noise), which makes the test conservative, not wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
TREND_FRACTION = 0.2  # first and last fifth of the steps
ROSE, FELL, NO_CLEAR_CHANGE = "rose", "fell", "no clear change"


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval (``low``/``high`` are NaN when there is none) over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        """JSON-safe: NaN becomes None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _array(values: Sequence[float], name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds a NaN or infinite value")
    return x


def _resample_means(x: np.ndarray, resamples: int, seed: int, chunk: int = 250) -> np.ndarray:
    """Means of ``x`` over ``resamples`` bootstrap resamples (indices drawn with replacement), in chunks of rows
    so memory stays at ``chunk * len(x)`` indices. The indices depend only on (seed, len(x), resamples)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.empty(resamples)
    for s in range(0, resamples, chunk):
        rows = min(chunk, resamples - s)
        out[s : s + rows] = x[rng.integers(0, len(x), size=(rows, len(x)))].mean(1)
    return out


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> Interval:
    """The mean of ``values`` (one per prompt) with a percentile bootstrap interval over them."""
    x = _array(values)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    means = _resample_means(x, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    # The percentile interval of a constant is that constant; rounding in the resampled means must not push the
    # estimate outside its own interval.
    return Interval(mean, float(min(low, mean)), float(max(high, mean)), len(x))


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> Interval:
    """``mean(a - b)`` over paired values (``a[i]`` and ``b[i]`` belong to the same prompt), with a paired
    bootstrap interval."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    return bootstrap_mean(x - y, resamples, seed, level)


def wins(a: Sequence[float], b: Sequence[float], same: Sequence[bool] | None = None) -> list[float]:
    """Per pair: 1 if ``a[i] > b[i]``, 0 if lower, 1/2 for a tie (equal scores, or ``same[i]``: identical answers,
    which must tie whatever rounding did to their scores)."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    tie = (x == y) if same is None else (x == y) | np.asarray(same, dtype=bool)
    return np.where(tie, 0.5, (x > y).astype(np.float64)).tolist()


def win_rate(a: Sequence[float], b: Sequence[float], same: Sequence[bool] | None = None,
             resamples: int = RESAMPLES, seed: int = SEED, *, level: float = LEVEL) -> Interval:
    """Share of pairs where ``a`` beats ``b`` (ties count 1/2, see ``wins``), with a paired bootstrap interval.
    0.5 is "as good as"; test it with ``verdict(interval, null=0.5)``."""
    return bootstrap_mean(wins(a, b, same), resamples, seed, level)


def verdict(interval: Interval | dict | tuple[float, float] | None, null: float = 0.0) -> str:
    """"rose" when the whole interval lies above ``null``, "fell" when below, else "no clear change" (also when
    there is no interval: too few values)."""
    if interval is None:
        return NO_CLEAR_CHANGE
    if isinstance(interval, Interval):
        low, high = interval.low, interval.high
    elif isinstance(interval, dict):
        low, high = interval.get("low"), interval.get("high")
    else:
        low, high = interval
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return NO_CLEAR_CHANGE
    if low > null:
        return ROSE
    if high < null:
        return FELL
    return NO_CLEAR_CHANGE


# ------------------------------------------------------------------------------------------ over training steps


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz; Numerical
    Recipes, 3rd ed., sec. 6.4), on the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_cdf(t: float, df: float) -> float:
    """Student t distribution function with ``df`` (any real > 0) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``; 1e-10)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-10 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def welch_difference(first: Sequence[float], last: Sequence[float], level: float = LEVEL) -> Interval:
    """``mean(last) - mean(first)`` of two independent samples with a Welch t interval (NaN bounds when either
    sample has fewer than two values). Two constant samples give the zero-width interval at their difference."""
    x, y = _array(first, "first"), _array(last, "last")
    n = min(len(x), len(y))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    diff = float(y.mean() - x.mean())
    if n < 2:
        return Interval(diff, math.nan, math.nan, len(x) + len(y))
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Interval(diff, diff, diff, len(x) + len(y))
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # Welch-Satterthwaite
    half = t_quantile(1 - (1 - level) / 2, df) * se
    return Interval(diff, diff - half, diff + half, len(x) + len(y))


def step_trend(values: Sequence[float | None], fraction: float = TREND_FRACTION, level: float = LEVEL) -> dict:
    """Did a noisy per-step metric (PPO's score, KL, ...) change from the start of training to the end?

    Compares the first ``fraction`` of the steps with the last (at least two steps each; at least four steps in
    all, else there is no interval) by ``welch_difference``. ``values`` are in step order; None and NaN (a skipped
    step) are left out and counted. Returns ``first`` and ``last`` (means), ``difference`` (last - first),
    ``low``/``high`` (its interval, None without one), ``steps`` (how many per part), ``dropped`` and ``verdict``.
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    k = max(2, int(len(kept) * fraction))
    if 2 * k > len(kept):
        mean = float(np.mean(kept)) if kept else None
        return {"first": mean, "last": mean, "difference": None, "low": None, "high": None, "steps": len(kept) // 2,
                "dropped": len(values) - len(kept), "verdict": NO_CLEAR_CHANGE,
                "note": f"{len(kept)} steps: too few to compare the first and last {fraction:.0%} (at least 4)"}
    first, last = kept[:k], kept[-k:]
    interval = welch_difference(first, last, level)
    return {"first": float(np.mean(first)), "last": float(np.mean(last)), "difference": interval.mean,
            "low": interval.as_dict()["low"], "high": interval.as_dict()["high"], "steps": k,
            "dropped": len(values) - len(kept), "verdict": verdict(interval)}
