"""Test tolerances derived from floating-point error analysis, never from one machine's error.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3-4): one
rounding into a dtype with unit roundoff ``u`` (= eps / 2) has relative error <= u. An n-term
sum (or dot product) evaluated in a dtype in ANY order (sequential, pairwise, blocked, SIMD
lanes, with or without FMA; i.e. whatever code path the CPU or library picks) has error
``<= gamma_n * sum|x_i|`` with ``gamma_n = n u / (1 - n u)`` in the worst case, and
``<= LAMBDA * sqrt(n) * u * sum|x_i|`` with probability >= 1 - 2 n exp(-LAMBDA^2 / 2) when the
rounding errors behave like independent zero-mean variables (Higham & Mary, SIAM J. Sci.
Comput. 41(5), 2019). The probabilistic form is used for random test data; ``worst=True`` gives
the deterministic one.

Two fp32 evaluations of the same math (e.g. a kernel and the torch reference) each sit within
the bound of the exact result, so they differ by at most twice it (``pair_tol``).

When no clean a-priori bound exists (a chain of exp / log / softmax on top of GEMMs),
``assert_close_to_oracle`` bounds the error of ``got`` against an fp64 oracle by a constant
times the error torch's own fp32 computation makes on the same inputs on this machine, plus an
a-priori term (flash-attention's and cut-cross-entropy's test rule): the bound moves with the
machine's own rounding. scripts/test.sh runs the numeric tests a second time under another
CPU code path, so a tolerance that holds on one CPU only fails there first.
"""

from __future__ import annotations

import math

import torch

# Confidence parameter of the probabilistic bound. Higham & Mary's rigorous probability needs
# LAMBDA ~ 6-7 for n ~ 1e4; their experiments (and the backward-error analysis of blocked and
# pairwise sums, whose constants grow like log n or sqrt(n / block)) put actual errors of random
# data at LAMBDA ~ 1. 4 leaves a factor-4 margin and still catches one wrong term (its size,
# ~max|x_i|, is 1 / (4 sqrt(n) u) times the bound at unit scale).
LAMBDA = 4.0

# Constant of the oracle comparison (flash-attention uses 2): a different correct algorithm
# (other summation order, other exp / log, inputs such as a log-sum-exp taken from a separate
# fp32 computation) may err a few times more than torch's one fp32 path does; 4 covers that and
# still fails on an error of 1e-5 relative in one coefficient
# (tests/logprobs/test_triton_logprobs.py).
ORACLE_FACTOR = 4.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one round-to-nearest into ``dtype``."""
    return torch.finfo(dtype).eps / 2


def sum_error(dtype: torch.dtype, n: int, abs_sum, *, worst: bool = False):
    """Bound on |fl(sum_i x_i) - sum_i x_i| for an ``n``-term sum accumulated in ``dtype`` in any
    order, ``abs_sum`` = sum_i |x_i| (float or tensor, elementwise). Probabilistic
    LAMBDA sqrt(n) u, or worst-case n u / (1 - n u) with ``worst``."""
    u, n = unit_roundoff(dtype), max(int(n), 1)
    factor = n * u / (1 - n * u) if worst else LAMBDA * math.sqrt(n) * u
    return factor * abs_sum


def pair_tol(dtype: torch.dtype, n: int = 1, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for ``torch.testing.assert_close`` between two evaluations in ``dtype`` of
    the same result built from ``n`` roundings (a sum of n terms, or n chained operations): each
    is within LAMBDA sqrt(n) u of the truth relative to ``scale`` (the sum of the magnitudes
    involved), so they differ by twice that. rtol is the same bound relative to the result
    itself (no cancellation)."""
    rel = 2 * sum_error(dtype, n, 1.0)
    return rel * scale, rel


def rounded_once_tol(dtype: torch.dtype, n: int = 1, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for a result accumulated in fp64 (n terms, magnitudes summing to ``scale``)
    and rounded once into ``dtype``, compared with the exact (fp64) result: rtol = u(dtype) for
    the final rounding, atol = the fp64 accumulation error (plus the smallest normal's rounding,
    for results near 0)."""
    atol = sum_error(torch.float64, n, scale) + torch.finfo(dtype).tiny
    return atol, unit_roundoff(dtype)


def assert_close_to_oracle(
    got, oracle, ref, *, n: int = 1, scale=None, factor: float = ORACLE_FACTOR, msg: str = ""
):
    """max|got - oracle| <= factor * max|ref - oracle| + sum_error(got.dtype, n, scale).

    ``oracle``: the result in fp64 on the same input values; ``ref``: torch's reference at the
    precision ``got`` claims (fp32), on the same inputs. The a-priori term (``n`` roundings per
    result, ``scale`` = the sum of the magnitudes behind one result, default max|oracle|: one
    rounding of the output at its largest magnitude for n = 1) keeps the bound honest when the
    reference happens to be exact or accumulates in higher precision."""
    oracle = oracle.double()
    assert got.shape == oracle.shape == ref.shape, (got.shape, oracle.shape, ref.shape)
    if oracle.numel() == 0:
        return
    err = (got.double() - oracle).abs().max().item()
    ref_err = (ref.double() - oracle).abs().max().item()
    scale = oracle.abs().max().item() if scale is None else float(scale)
    floor = sum_error(got.dtype, n, scale) if n > 1 else unit_roundoff(got.dtype) * scale
    bound = factor * ref_err + floor
    assert err <= bound, (
        f"{msg}: max error {err:.3g} vs fp64 exceeds {factor} x torch's own fp32 error "
        f"{ref_err:.3g} + a-priori {floor:.3g} (n={n}, scale={scale:.3g})"
    )


def assert_within(got, want, bound, msg: str = ""):
    """|got - want| <= bound elementwise (``bound``: a float or a tensor broadcastable to want,
    from one of the bounds above), reporting the worst entry."""
    want = want.double()
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.numel() == 0:
        return
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(want).flatten()
    err = (got.double() - want).abs().flatten()
    worst = int((err - bound).argmax())
    assert err[worst] <= bound[worst], (
        f"{msg}: entry {worst} off by {err[worst].item():.3g} > bound {bound[worst].item():.3g}"
    )


def assert_close_pair(got, want, n: int, dtype: torch.dtype = torch.float32, msg: str = ""):
    """Two evaluations (``got``, ``want``) in ``dtype`` arithmetic of a result built from at most
    ``n`` roundings each (an n-term sum, or n chained operations), magnitudes at most
    max|want|: ``pair_tol(dtype, n, max|want|)`` as (atol, rtol)."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    atol, rtol = pair_tol(dtype, n, scale)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=msg or None)


def scan_error(dtype, magnitudes, cu, decay: float, *, roundings: int = 2, reverse: bool = True):
    """Elementwise bound on the error of a segmented linear recurrence evaluated in ``dtype``:
    y_t = x_t + decay * y_{t+1} within each CSR segment of ``cu`` (``reverse``; else y_t = x_t +
    decay * y_{t-1}), in any association (sequential, chunked, tree scan).

    Each step commits ``roundings`` roundings, each <= u * m_j with m_j = ``magnitudes[j]`` (the
    sizes of the operands at step j, e.g. |x_j| + |y_j|); the error at t carries them discounted:
    e_t = sum_{j after t} decay^{|j - t|} eps_j. With independent rounding errors (the model of
    ``sum_error``) that is <= LAMBDA * roundings * u * sqrt(sum_j decay^{2|j - t|} m_j^2)."""
    m2 = magnitudes.double().square()
    cu = cu.long()
    out = torch.empty_like(m2)
    d2 = decay * decay
    for b in range(cu.numel() - 1):
        lo, hi = int(cu[b]), int(cu[b + 1])
        order = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        acc = 0.0
        for t in order:
            acc = float(m2[t]) + d2 * acc
            out[t] = acc
    return LAMBDA * roundings * unit_roundoff(dtype) * out.sqrt()


def gae_error(dtype, rewards, values, cu, gamma: float, lam: float, last, adv):
    """Elementwise bound on the error of one evaluation of step GAE in ``dtype``:
    delta_t = r_t + gamma V_{t+1} - V_t (3 roundings of operands <= d_t = |r_t| +
    gamma |V_{t+1}| + |V_t|), A_t = delta_t + gamma lam A_{t+1} (2 roundings of operands
    <= |delta_t| + gamma lam |A_{t+1}| <= 2 d_t + |A_t|): ``scan_error`` with 5 roundings of
    2 d_t + |A_t|. V_{t+1} is the next step's value in the trajectory, else its bootstrap value
    ``last`` (or 0). The return R_t = A_t + V_t adds one rounding of |R_t|."""
    r, v = rewards.double(), values.double()
    nxt = torch.cat([v[1:], v.new_zeros(1)]) if v.numel() else v.clone()
    ends, nonempty = cu[1:].long() - 1, cu[1:] > cu[:-1]
    tail = v.new_zeros(cu.numel() - 1) if last is None else last.double()
    nxt[ends[nonempty]] = tail[nonempty]
    d = r.abs() + gamma * nxt.abs() + v.abs()
    return scan_error(dtype, 2 * d + adv.double().abs(), cu, gamma * lam, roundings=5)
