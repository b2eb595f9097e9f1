"""The statistics of ``steppo compare`` against closed forms, printed tables and hand-computed
values (steppo_fast/trainer/stats.py)."""

from __future__ import annotations

import math

import pytest

from steppo_fast.trainer.stats import (
    auc,
    betainc,
    min_sign_flip_p,
    paired_t,
    sign_flip_p,
    t_cdf,
    t_interval,
    t_quantile,
)

# double precision evaluations of a continued fraction / closed form: agreement to a few
# hundred ulps of 1 (the bisection of the quantile stops at 1e-12 relative)
EPS = 1e-12


def _cdf_closed(t: float, df: int) -> float:
    """Student t CDFs with elementary closed forms (df 1, 2, 3, 4)."""
    if df == 1:
        return 0.5 + math.atan(t) / math.pi
    if df == 2:
        return 0.5 + t / (2 * math.sqrt(2 + t * t))
    if df == 3:
        u = t / math.sqrt(3)
        return 0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi
    q = 1 + t * t / 4
    return 0.5 + 0.375 * (t / math.sqrt(q)) * (1 - t * t / (12 * q))


@pytest.mark.parametrize("df", [1, 2, 3, 4])
def test_t_cdf_matches_closed_forms(df):
    for t in (-30.0, -4.1, -1.0, -0.3, 0.0, 0.2, 0.9, 2.5, 7.0, 55.0):
        assert abs(t_cdf(t, df) - _cdf_closed(t, df)) < EPS, (t, df)


def test_t_quantiles_match_the_printed_table():
    # two-sided 95% critical values (any statistics table), 6+ significant digits
    table = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 29: 2.045230}
    for df, want in table.items():
        assert abs(t_quantile(0.975, df) - want) < 1e-6, df
    assert abs(t_quantile(0.975, 1e7) - 1.959964) < 1e-5  # the normal limit
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)
    for df in (1, 3, 8):
        for p in (0.6, 0.9, 0.995):
            assert abs(t_cdf(t_quantile(p, df), df) - p) < 1e-10


def test_betainc_symmetry_and_uniform_case():
    for x in (0.01, 0.3, 0.77):
        assert abs(betainc(1.0, 1.0, x) - x) < EPS  # I_x(1, 1) = x
        assert abs(betainc(2.5, 0.5, x) + betainc(0.5, 2.5, 1 - x) - 1) < EPS
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        betainc(1.0, 1.0, 1.5)


def test_t_interval_by_hand():
    m, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t_{.975,4} * s / sqrt(n)
    assert m == 3.0 and abs(lo - (3 - half)) < 1e-6 and abs(hi - (3 + half)) < 1e-6
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert t_interval([0.7]) == (0.7, 0.7, 0.7)


def test_paired_t_by_hand():
    a = [0.5, 0.6, 0.7, 0.8, 0.9]
    b = [0.4, 0.6, 0.5, 0.6, 0.8]  # d = 0.1, 0, 0.2, 0.2, 0.1: mean 0.12, s_d = sqrt(0.007)
    t, p = paired_t(a, b)
    want_t = 0.12 / (math.sqrt(0.007) / math.sqrt(5))
    assert abs(t - want_t) < 1e-9
    assert abs(p - 2 * (1 - _cdf_closed(want_t, 4))) < EPS
    t2, p2 = paired_t(b, a)
    assert abs(t2 + t) < 1e-12 and abs(p2 - p) < EPS
    assert paired_t([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)
    assert paired_t([1.5, 2.5], [1.0, 2.0]) == (math.inf, 0.0)
    with pytest.raises(ValueError, match="pairs by seed"):
        paired_t([1.0, 2.0], [1.0])


def test_sign_flip_exact_by_hand():
    a = [0.5, 0.6, 0.7, 0.8, 0.9]
    b = [0.4, 0.6, 0.5, 0.6, 0.8]
    # nonzero d = 0.1, 0.2, 0.2, 0.1: only all-plus / all-minus reach |sum| = 0.6; the zero
    # difference doubles each: 4 of 32 sign vectors
    assert sign_flip_p(a, b) == 4 / 32
    # all five differences positive: 2 of 32 = 1/16, the smallest possible with 5 seeds
    assert sign_flip_p([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]) == 1 / 16 == min_sign_flip_p(5)
    # d = 3, -1, -1: |sum| = 1; flips reaching >= 1: all 8 but (+,+,-)? enumerate by hand:
    # sums over signs of (3,-1,-1): 1, 3, 3, 5, -5, -3, -3, -1 -> all 8 have |sum| >= 1
    assert sign_flip_p([3, -1, -1], [0, 0, 0]) == 1.0
    # d = 2, 1, 1, 1: sums over signs: |sum| >= 5 only for all-plus/all-minus: 2/16
    assert sign_flip_p([2, 1, 1, 1], [0, 0, 0, 0]) == 2 / 16
    # Monte Carlo beyond the exact range: 20 equal positive differences -> p ~ 2 / 2^20
    assert sign_flip_p([1.0] * 20, [0.0] * 20) < 1e-3


def test_auc_normalised_trapezoid():
    assert auc([0, 5, 10], [0.0, 0.5, 1.0]) == 0.5
    assert auc([0, 4, 10], [1.0, 1.0, 1.0]) == 1.0
    assert auc([0, 2, 10], [0.0, 1.0, 1.0]) == pytest.approx((1 + 8) / 10, abs=EPS)
    with pytest.raises(ValueError, match="x must increase"):
        auc([0, 5, 5], [0, 1, 1])
