"""Student t statistics over a few runs: t quantiles (no scipy), the t-interval of a mean and the Welch interval of a
difference of means. Used by bupo.evals.compare.

The t CDF is computed through the regularized incomplete beta function (continued fraction) and inverted by
bisection; exact to ~1e-10, non-integer degrees of freedom included (Welch).
"""

from __future__ import annotations

import math

# --- Student t quantiles ------------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (0.5 < p < 1), by bisection on t_cdf."""
    assert 0.5 < p < 1 and df > 0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def t_interval(xs: list[float], level: float) -> dict:
    """{n, mean, sd, lo, hi}: mean +- t_{(1+level)/2, n-1} sd / sqrt(n); lo = hi = None when n < 2."""
    if not xs:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    m, sd = _mean_sd(xs)
    if len(xs) < 2:
        return {"n": 1, "mean": m, "sd": None, "lo": None, "hi": None}
    half = t_quantile((1 + level) / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return {"n": len(xs), "mean": m, "sd": sd, "lo": m - half, "hi": m + half}


def welch_interval(a: list[float], b: list[float], level: float) -> dict:
    """Difference mean(b) - mean(a) with a Welch t-interval; lo = hi = df = None unless both sides have n >= 2."""
    out = {"n_a": len(a), "n_b": len(b), "diff": None, "lo": None, "hi": None, "df": None}
    if not a or not b:
        return out
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    out["diff"] = mb - ma
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:  # no spread on either side: the interval has zero width at any df
        out.update(lo=mb - ma, hi=mb - ma)
        return out
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    out.update(lo=mb - ma - half, hi=mb - ma + half, df=df)
    return out
