"""Value checks of the loss ops' float inputs (finiteness, weights, magnitudes).

All of an op's tensors are read with one ``aminmax`` each and **one** host transfer
(:func:`steppo_fast._validate.min_max_all`); everything else runs only on the failure path.
Like every value check they are skipped while ``torch.compile`` traces (see
:mod:`steppo_fast._validate`).

Padding: entries (steps) with weight 0 never reach a loss, so they may hold anything (NaN
included); only counted entries must be finite and within the magnitude bound.

Magnitude bound of ``step_policy_loss``. Every backend forms the per-unit terms
``w_u * L_u`` and sums them in the compute dtype (fp32 for fp32/bf16/fp16 inputs; the C++ backend
in double), so a finite input can still overflow a kernel's partial sum and give inf or NaN on one
backend and a finite loss on another. With ``|L_u| <= e^20 |A_u|`` (the ratio is clamped), the
KL estimate bounded by ``k_max`` (10 for k3; ``|logp| + |ref|`` for k1; half its square for k2),
N the number of weight units of ``agg`` (S for step-mean, A for token-mean, B for traj-mean: each
step, token or trajectory sums to at most ``max(step_weight)``), the loss numerator is at most

    bound = N * max(step_weight) * (e^20 max|A| + |kl_coef| k_max),

the log-ratio sums at most ``A * (max|logp| + max|old_logp|)``, and the stats' weighted sums
at most ``N * max(step_weight) * max(e^20, max|logp| + max|old_logp|)``. All of them (and
``bound / normalizer`` when a normalizer is given) must stay below half the largest finite
value of the compute dtype (1.7e38 for fp32), so that no backend's partial sum can overflow;
otherwise a ``ValueError`` names the input and the limit. For fp32 with a million units and
weights <= 1 the limit on ``|A|`` is about 3e23: far beyond any meaningful advantage.
"""

from __future__ import annotations

import math

import torch

from .._defs import K3_CLAMP, LOG_RATIO_CLAMP
from .._validate import check_finite, check_weights, min_max_all
from ..reference.segments import segment_ids

RHO_MAX = math.exp(LOG_RATIO_CLAMP)


def check_values(
    weight_name: str,
    weight,
    entries: dict,
    tokens: dict | None = None,
    token_entry=None,
    bounds: list | None = None,
) -> list:
    """Finiteness of a loss op's float inputs and weights, with one host transfer in all.

    ``weight`` (named ``weight_name``; None = every entry counts) must be finite and >= 0.
    Every tensor of ``entries`` (shaped like ``weight``) and of ``tokens`` (token-level; token t
    belongs to entry ``token_entry()[t]``) must be finite where it reaches the loss: everywhere
    without ``weight``, else on the entries (tokens of entries) with weight > 0. None tensors
    are skipped. Masks are built only on the failure path. Returns the (min, max) pairs read,
    in the order weight, entries, tokens (None where nothing was read); ``bounds`` passes them
    in when the caller already read them (with :func:`steppo_fast._validate.read_values`)."""
    tokens = tokens or {}
    named = [(n, x, False) for n, x in entries.items()] + [(n, x, True) for n, x in tokens.items()]
    if bounds is None:
        bounds = min_max_all(weight, *(x for _, x, _ in named))
    if bounds[0] is not None:
        check_weights(weight_name, weight, bounds=bounds[0])
    rule = f"entries with {weight_name} > 0 must be finite (zero-weight padding is never read)"
    for (name, x, per_token), b in zip(named, bounds[1:]):
        if b is None:
            continue
        if weight is None:
            check_finite(name, x, bounds=b)
        elif per_token:
            check_finite(name, x, bounds=b, counted=lambda: (weight > 0)[token_entry()], rule=rule)
        else:
            check_finite(name, x, bounds=b, counted=lambda: weight > 0, rule=rule)
    return bounds


def _abs_max(bounds, x, counted) -> float:
    """max |x| over the counted entries: from ``bounds`` (all entries) when that is finite,
    else (padding held non-finite values) recomputed over ``counted()`` on the host."""
    if bounds is None:
        return 0.0
    high = max(abs(bounds[0]), abs(bounds[1]))
    if math.isfinite(high) or counted is None:
        return high
    kept = x.detach()[counted()]
    return float(kept.abs().max()) if kept.numel() else 0.0


def check_policy_magnitudes(
    bounds, tensors, *, step_weight, cu_steps, num_units, kl_coef, kl_type, normalizer, limit
) -> None:
    """The magnitude bound of the module docstring for ``step_policy_loss``.

    ``bounds``: the pairs :func:`check_values` returned for (step_weight, advantages, logp,
    old_logp, ref_logp); ``tensors``: those tensors (ref_logp None without a KL term).
    ``num_units``: N of the bound; ``limit``: half the compute dtype's largest finite value."""
    w_b, a_b, lp_b, old_b, ref_b = bounds
    advantages, logp, old_logp, ref_logp = tensors
    num_tokens = logp.shape[0]
    if step_weight is None:
        step_mask = tok_mask = None
        w_max = 1.0
    else:
        step_mask = lambda: step_weight > 0
        tok_mask = lambda: (step_weight > 0)[segment_ids(cu_steps, num_tokens)]
        w_max = 0.0 if w_b is None else w_b[1]
    a_max = _abs_max(a_b, advantages, step_mask)
    lp_max = _abs_max(lp_b, logp, tok_mask)
    old_max = _abs_max(old_b, old_logp, tok_mask)
    ref_max = _abs_max(ref_b, ref_logp, tok_mask) if ref_logp is not None else 0.0
    if num_tokens * (lp_max + old_max) > limit:
        name, value = ("logp", lp_max) if lp_max >= old_max else ("old_logp", old_max)
        raise ValueError(
            f"{name}: |{name}| up to {value:.3g} can overflow the log-ratio sums: "
            f"{num_tokens} tokens * (max|logp| + max|old_logp|) must stay below {limit:.3g}"
        )
    k_max = {"k1": lp_max + ref_max, "k2": 0.5 * (lp_max + ref_max) ** 2, "k3": K3_CLAMP}
    scale = num_units * w_max
    policy = scale * RHO_MAX * a_max
    kl = scale * abs(kl_coef) * k_max[kl_type] if kl_coef != 0.0 else 0.0
    rule = (
        f"the loss ops need N * max(step_weight) * (e^20 max|advantages| + |kl_coef| k_max) "
        f"below {limit:.3g} (N = {num_units} units, max(step_weight) = {w_max:.3g})"
    )
    # the stats' weighted sums: sum_u w_u rho_u <= N max(sw) e^20, and approx_kl's
    # sum_t w'_t |x_t| <= N max(sw) (max|logp| + max|old_logp|)
    if scale * max(RHO_MAX, lp_max + old_max) > limit:
        if scale * RHO_MAX > limit:
            name, what = "step_weight", f"max(step_weight) = {w_max:.3g}"
        else:
            name, what = ("logp", "|logp|") if lp_max >= old_max else ("old_logp", "|old_logp|")
            what += f" up to {max(lp_max, old_max):.3g}"
        raise ValueError(
            f"{name}: {what} can overflow the ratio and KL statistics: N * max(step_weight) * "
            f"max(e^20, max|logp| + max|old_logp|) must stay below {limit:.3g} "
            f"(N = {num_units} units)"
        )
    if policy + kl > limit:
        if policy >= kl:
            name, what = "advantages", f"|advantages| up to {a_max:.3g}"
        elif kl_type == "k3":
            name, what = "kl_coef", f"kl_coef = {kl_coef:.3g}"
        else:
            name, what = "ref_logp", f"|logp| + |ref_logp| up to {lp_max + ref_max:.3g}"
        raise ValueError(f"{name}: {what} can overflow the loss; {rule}")
    if normalizer is not None and (policy + kl) / normalizer > limit:
        raise ValueError(
            f"normalizer: {normalizer:.3g} is so small that the loss can overflow; {rule}, "
            "divided by the normalizer"
        )


def compute_limit(dtype: torch.dtype) -> float:
    """Half the largest finite value of the compute dtype (fp64 for fp64, else fp32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max / 2
