"""Small-sample statistics for ``steppo compare`` (pure Python, no scipy).

- :func:`t_cdf` / :func:`t_quantile`: Student's t distribution with ``df`` degrees of freedom,
  ``F(t) = 1 - I_x(df/2, 1/2) / 2`` for ``t >= 0`` with ``x = df / (df + t^2)`` (and
  ``F(-t) = 1 - F(t)``), where ``I_x(a, b)`` is the regularised incomplete beta function,
  evaluated by its continued fraction (modified Lentz, relative accuracy ~1e-14). The quantile
  inverts the CDF by bisection to 1e-12.
- :func:`t_interval`: the two-sided ``level`` confidence interval of a mean,
  ``m +- t_{(1+level)/2, n-1} * s / sqrt(n)`` (``s``: sample standard deviation, n - 1).
- :func:`paired_t`: paired t test of ``d_i = a_i - b_i``: ``t = mean(d) / (s_d / sqrt(n))``,
  two-sided ``p = 2 * (1 - F_{n-1}(|t|))``.
- :func:`sign_flip_p`: exact paired permutation (sign-flip) test: under H0 each ``d_i`` is as
  likely ``-d_i``; ``p = #{s in {-1,1}^n : |sum s_i d_i| >= |sum d_i|} / 2^n``. Its smallest
  value is ``2 / 2^n`` (1/16 with 5 pairs): :func:`min_sign_flip_p`.
- :func:`auc`: trapezoid area under a curve given at points ``x``, divided by the x span (a
  curve in [0, 1] gives an area in [0, 1]).
"""

from __future__ import annotations

import itertools
import math
import random

EXACT_SIGN_FLIP_MAX = 16  # 2**16 sign vectors; beyond: Monte Carlo with a fixed seed
MC_DRAWS = 1 << 16


def mean(xs: list[float]) -> float:
    if not xs:
        raise ValueError("mean: needs at least one value")
    return math.fsum(xs) / len(xs)


def sample_sd(xs: list[float]) -> float:
    """Sample standard deviation (divisor n - 1); 0.0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc: needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df > 0`` degrees of freedom at ``t``."""
    if not df > 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``0 < p < 1``), by bisection on :func:`t_cdf`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided t confidence interval of the mean of ``xs``
    (``low == high == mean`` for one value: no interval can be formed; callers say so)."""
    m = mean(xs)
    if len(xs) < 2:
        return m, m, m
    half = t_quantile(0.5 + level / 2.0, len(xs) - 1) * sample_sd(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def paired_t(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(t, two-sided p)`` of the paired t test of ``a - b`` (``len >= 2``). Identical
    differences (``s_d = 0``) give ``t = 0, p = 1`` when they are 0, else ``t = +-inf, p = 0``."""
    d = _diffs(a, b)
    if len(d) < 2:
        raise ValueError(f"paired_t: needs >= 2 pairs, got {len(d)}")
    m, s = mean(d), sample_sd(d)
    if s == 0.0:
        return (0.0, 1.0) if m == 0.0 else (math.copysign(math.inf, m), 0.0)
    t = m / (s / math.sqrt(len(d)))
    return t, min(1.0, 2.0 * (1.0 - t_cdf(abs(t), len(d) - 1)))


def sign_flip_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of the paired sign-flip permutation test on ``a - b``: exact for up to
    :data:`EXACT_SIGN_FLIP_MAX` pairs, else Monte Carlo (:data:`MC_DRAWS` seeded draws,
    ``(1 + hits) / (1 + draws)``)."""
    d = _diffs(a, b)
    if not d:
        raise ValueError("sign_flip_p: needs >= 1 pair")
    observed = abs(math.fsum(d))
    slack = 1e-12 * max(1.0, math.fsum(abs(x) for x in d))  # ties up to rounding count
    if len(d) <= EXACT_SIGN_FLIP_MAX:
        hits = sum(
            abs(math.fsum(s * x for s, x in zip(signs, d))) >= observed - slack
            for signs in itertools.product((1.0, -1.0), repeat=len(d))
        )
        return hits / 2 ** len(d)
    rng = random.Random(0)
    hits = sum(
        abs(math.fsum(x if rng.random() < 0.5 else -x for x in d)) >= observed - slack
        for _ in range(MC_DRAWS)
    )
    return (1 + hits) / (1 + MC_DRAWS)


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with ``n`` pairs."""
    return min(1.0, 2.0 / 2**n)


def auc(xs: list[float], ys: list[float]) -> float:
    """Trapezoid area under ``(xs, ys)`` divided by ``xs[-1] - xs[0]`` (``xs`` increasing)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"auc: needs >= 2 points and as many x as y, got {len(xs)}, {len(ys)}")
    for i in range(1, len(xs)):
        if not xs[i] > xs[i - 1]:
            raise ValueError(f"auc: x must increase, x[{i - 1}]={xs[i - 1]}, x[{i}]={xs[i]}")
    area = math.fsum((xs[i] - xs[i - 1]) * (ys[i] + ys[i - 1]) / 2 for i in range(1, len(xs)))
    return area / (xs[-1] - xs[0])


def _diffs(a: list[float], b: list[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired test: {len(a)} values vs {len(b)} values (pairs by seed)")
    return [x - y for x, y in zip(a, b)]
