"""Critic-quality metrics of one iteration (algorithms with a critic): ``critic/*`` keys of
``metrics.jsonl``.

Over the U units of the batch (steps for ``steppo``, action tokens for ``ppo``), with ``R`` the
critic targets (GAE returns), ``V`` the critic's values at rollout time (before the update) and
``A`` the advantages before whitening, all [U] fp32:

- ``critic/explained_var`` = 1 - Var(R - V) / Var(R) (1: V predicts the returns exactly, 0: no
  better than their mean, < 0: worse; the quantity StepPO's authors and verl log as
  ``critic/vf_explained_var``). ``None`` when Var(R) = 0 (every return equal, e.g. no episode
  succeeded), where it is undefined.
- ``critic/adv_std``: the population standard deviation of ``A`` (the spread that whitening
  divides out).
- ``critic/return_mean``, ``critic/value_mean``: mean of ``R`` and of ``V``.

Computed from the fp64 sufficient statistics ``[U, sum R, sum R^2, sum E, sum E^2, sum A,
sum A^2, sum V]`` (E = R - V), so data-parallel ranks combine by summing them. Variances use
the population normaliser 1/U in numerator and denominator (the ratio is the same with 1/(U-1)).
"""

from __future__ import annotations

import math

import torch

KEYS = ("critic/explained_var", "critic/adv_std", "critic/return_mean", "critic/value_mean")


def critic_sums(returns: torch.Tensor, values: torch.Tensor, raw_adv: torch.Tensor) -> list[float]:
    """The 8 fp64 sufficient statistics of :func:`critic_fields` over [U] ``returns``,
    ``values`` and ``raw_adv`` (same length U; a mismatch is a ``ValueError``)."""
    if not (returns.shape == values.shape == raw_adv.shape) or returns.dim() != 1:
        raise ValueError(
            f"critic_sums: returns {tuple(returns.shape)}, values {tuple(values.shape)} and "
            f"raw_adv {tuple(raw_adv.shape)} must be 1-D of one length"
        )
    r, v, a = (t.detach().double() for t in (returns, values, raw_adv))
    e = r - v
    return [
        float(r.numel()),
        *(float(x) for x in (r.sum(), (r * r).sum(), e.sum(), (e * e).sum())),
        *(float(x) for x in (a.sum(), (a * a).sum(), v.sum())),
    ]


def _var(n: float, s: float, s2: float) -> float:
    return max(s2 / n - (s / n) ** 2, 0.0)


def critic_fields(sums: list[float]) -> dict:
    """The ``critic/*`` metrics from (summed) :func:`critic_sums`; all ``None`` for U = 0."""
    n, sr, sr2, se, se2, sa, sa2, sv = sums
    if n <= 0:
        return dict.fromkeys(KEYS)
    var_r = _var(n, sr, sr2)
    # Var(R) at the level of fp64 cancellation on O(1) returns counts as 0 (constant returns)
    ev = None if var_r <= 1e-12 * max(sr2 / n, 1e-300) else 1.0 - _var(n, se, se2) / var_r
    return {
        "critic/explained_var": ev,
        "critic/adv_std": math.sqrt(_var(n, sa, sa2)),
        "critic/return_mean": sr / n,
        "critic/value_mean": sv / n,
    }
