"""Pure-PyTorch reference of the loss family: ``step_policy_loss``, ``value_loss``, ``kl_penalty``.

This is the spec the kernels are tested against (docs/design.md §1 and §4, "Aggregation, exactly").
Inputs are already validated by :mod:`steppo_fast.ops.loss`. Everything is vectorised over the
CSR layout (segment ids from ``repeat_interleave`` + ``index_add``; no Python loop over steps or
tokens) and differentiable through torch autograd.

Dtypes: fp32/bf16/fp16 inputs are computed in fp32 and the loss is fp32; fp64 stays fp64.

Padding: a step with ``step_weight == 0`` never reaches the loss. Its advantage, its tokens'
log-ratios and KL inputs are replaced by 0 with ``torch.where`` before any arithmetic, so even
NaN/inf garbage there gives a finite loss and exactly zero gradient.
"""

from __future__ import annotations

import torch

from .._defs import AGGS, K3_CLAMP, KL_KINDS, LOG_RATIO_CLAMP, PackedStats, StepLossOptions
from .._validate import compute_dtype
from .segments import _segment_sum_ids, segment_ids, segment_lengths


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of KL(pi || pi_ref) from samples of pi, [A] -> [A].

    k1 = logp - ref; k2 = 0.5 (logp - ref)^2; k3 = clamp(exp(d) - d - 1, -10, 10), d = ref - logp.
    k1 and k2 are not clamped. For k3, d is first clamped to [-20, 20]: this changes no value
    (k3 >= 19 > 10 for |d| >= 20) but keeps exp() finite so the gradient is 0, never NaN.
    """
    dtype = compute_dtype(logp, ref_logp)
    logp, ref_logp = logp.to(dtype), ref_logp.to(dtype)
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(d) - d - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"kind: {kind!r} is not one of {', '.join(map(repr, KL_KINDS))}")


def _safe_denominator(total: torch.Tensor, normalizer: float | None) -> torch.Tensor | float:
    """``normalizer`` when given, else ``total`` (1 where total == 0: the numerator is 0 then)."""
    if normalizer is not None:
        return normalizer
    return torch.where(total > 0, total, torch.ones_like(total))


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip: float | None = None,
    weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Clipped value loss, [M] x3 -> scalar.

    e_j = 0.5 max((v_j - R_j)^2, (old_j + clamp(v_j - old_j, -clip, clip) - R_j)^2) (the second
    term only when ``clip`` is given); loss = sum_j w_j e_j / sum_j w_j (w = 1 without weight),
    the denominator replaced by ``normalizer`` when given. Zero total weight -> 0 (with grad_fn).
    """
    dtype = compute_dtype(values, old_values, returns, weight)
    v, old, ret = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    err = (v - ret).square()
    if clip is not None:
        err_clipped = (old + (v - old).clamp(-clip, clip) - ret).square()
        # strict '>' picks the clipped branch only where it is larger: zero grad there (PPO)
        err = torch.where(err_clipped > err, err_clipped, err)
    per_entry = 0.5 * err
    if weight is None:
        w = torch.ones_like(per_entry)
    else:
        w = weight.to(dtype)
        per_entry = torch.where(w > 0, per_entry, torch.zeros_like(per_entry))
    total = w.sum()
    return (w * per_entry).sum() / _safe_denominator(total, normalizer)


def unit_weights(
    cu_steps: torch.Tensor,
    cu_trajs: torch.Tensor | None,
    step_weight: torch.Tensor,
    *,
    agg: str,
    token_units: bool,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Aggregation weight w_u of every loss unit (docs/design.md §4, "Aggregation, exactly").

    Units are tokens ([A] result) when ``token_units`` else steps ([S] result). With n_s the
    step's token count and sw_s = ``step_weight`` [S] (float, already >= 0):
    - step-mean:  step unit 1,    token unit 1 / n_s (every step sums to 1);
    - token-mean: step unit n_s,  token unit 1;
    - traj-mean:  1 / c_b, c_b = number of units of trajectory b whose step has sw > 0 (every
      trajectory sums to 1, shared equally by its counted units; needs ``cu_trajs``);
    then multiplied by sw_s of the unit's step. Units of zero-weight steps get weight 0.
    ``num_tokens`` (= ``cu_steps[-1]``) avoids a host read of the offsets for token units.
    """
    num_steps = step_weight.shape[0]
    lengths = segment_lengths(cu_steps).to(step_weight.dtype)
    valid = (step_weight > 0).to(step_weight.dtype)
    if agg == "traj-mean":
        if cu_trajs is None:
            raise ValueError("cu_trajs: required for agg='traj-mean'")
        step_traj = segment_ids(cu_trajs, num_steps)
        per_step_units = lengths if token_units else torch.ones_like(lengths)
        counted = _segment_sum_ids(valid * per_step_units, step_traj, cu_trajs.numel() - 1)
        # a trajectory with c_b = 0 has only zero-weight steps: any finite base works there
        base = (1.0 / counted.clamp_min(1.0))[step_traj]
    elif agg == "step-mean":
        base = 1.0 / lengths.clamp_min(1.0) if token_units else torch.ones_like(lengths)
    elif agg == "token-mean":
        base = torch.ones_like(lengths) if token_units else lengths
    else:
        raise ValueError(f"agg: {agg!r} is not one of {', '.join(map(repr, AGGS))}")
    per_step = base * step_weight
    if token_units:
        return per_step[segment_ids(cu_steps, num_tokens)]
    return per_step


def loss_normalizer(
    cu_steps: torch.Tensor,
    *,
    cu_trajs: torch.Tensor | None = None,
    ratio_level: str = "step",
    agg: str = "step-mean",
    step_weight: torch.Tensor | None = None,
) -> float:
    """sum_u w_u: the denominator ``step_policy_loss`` uses when ``normalizer`` is None.

    Summing it over micro-batches / ranks gives the global ``normalizer`` under which the
    micro-batch losses add up exactly to the full-batch loss.
    """
    num_steps = cu_steps.numel() - 1
    if step_weight is None:
        sw = torch.ones(num_steps, dtype=torch.float64, device=cu_steps.device)
    else:
        sw = step_weight.to(torch.float64)
    w = unit_weights(cu_steps, cu_trajs, sw, agg=agg, token_units=ratio_level == "token")
    return float(w.sum())


def _unit_log_ratios(log_ratio, tok_step, tok_valid, cu_trajs, num_steps, ratio_level, power):
    """Log importance ratio of every unit: [A] for "token", [S] for "step"/"trajectory"."""
    if ratio_level == "token":
        return log_ratio
    dtype = log_ratio.dtype
    if ratio_level == "step":
        counts = _segment_sum_ids(torch.ones_like(log_ratio), tok_step, num_steps)
        return _segment_sum_ids(log_ratio, tok_step, num_steps) / counts.clamp_min(1.0) ** power
    if cu_trajs is None:
        raise ValueError("cu_trajs: required for ratio_level='trajectory'")
    step_traj = segment_ids(cu_trajs, num_steps)
    tok_traj = step_traj[tok_step]
    num_trajs = cu_trajs.numel() - 1
    sums = _segment_sum_ids(log_ratio, tok_traj, num_trajs)
    counts = _segment_sum_ids(tok_valid.to(dtype), tok_traj, num_trajs)  # tokens of valid steps
    return (sums / counts.clamp_min(1.0) ** power)[step_traj]


def step_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_steps: torch.Tensor,
    cu_trajs: torch.Tensor | None,
    step_weight: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    options: StepLossOptions,
) -> tuple[torch.Tensor, PackedStats]:
    """Clipped step-level policy loss and its stats (see ``steppo_fast.step_policy_loss``).

    loss = (sum_u w_u L_u + kl_coef * sum_t w'_t k_t) / D with units u (tokens for "token",
    steps otherwise), w from :func:`unit_weights`, token-unit weights w' for the KL term,
    D = sum_u w_u (or ``normalizer``). The trajectory ratio averages over the tokens of the
    trajectory's steps with step_weight > 0 (padding steps never reach the loss).

    Stats are detached 0-d tensors of the compute dtype (no host sync; the public wrapper turns
    them into Python floats when asked), keyed by ``STAT_KEYS``. ``options`` holds the scalar
    keywords of the public op (:class:`steppo_fast._defs.StepLossOptions`).
    """
    ratio_level, length_power, agg = options.ratio_level, options.length_power, options.agg
    clip_low, clip_high, dual_clip = options.clip_low, options.clip_high, options.dual_clip
    kl_coef, kl_type, normalizer = options.kl_coef, options.kl_type, options.normalizer
    dtype = compute_dtype(logp, old_logp, advantages, step_weight, ref_logp)
    num_tokens, num_steps = logp.shape[0], advantages.shape[0]
    tok_step = segment_ids(cu_steps, num_tokens)
    if step_weight is None:
        sw = torch.ones(num_steps, dtype=dtype, device=logp.device)
    else:
        sw = step_weight.to(dtype)
    step_valid = sw > 0
    tok_valid = step_valid[tok_step]
    zeros_tok = torch.zeros(num_tokens, dtype=dtype, device=logp.device)
    # cast once: a bf16 leaf then receives one rounding of its total fp32 gradient
    logp = logp.to(dtype)
    log_ratio = torch.where(tok_valid, logp - old_logp.to(dtype), zeros_tok)
    adv = torch.where(step_valid, advantages.to(dtype), torch.zeros_like(sw))

    token_units = ratio_level == "token"
    unit_l = _unit_log_ratios(
        log_ratio, tok_step, tok_valid, cu_trajs, num_steps, ratio_level, length_power
    )
    unit_adv = adv[tok_step] if token_units else adv
    tok_w = unit_weights(cu_steps, cu_trajs, sw, agg=agg, token_units=True, num_tokens=num_tokens)
    unit_w = (
        tok_w if token_units else unit_weights(cu_steps, cu_trajs, sw, agg=agg, token_units=False)
    )

    rho = torch.exp(unit_l.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low, high = 1.0 - clip_low, 1.0 + clip_high
    # -min(rho A, clip(rho) A): the clipped branch wins exactly when A > 0 and rho > 1 + clip_high
    # or A < 0 and rho < 1 - clip_low; there clamp() is flat, so the gradient is exactly zero.
    clipped = ((unit_adv > 0) & (rho > high)) | ((unit_adv < 0) & (rho < low))
    per_unit = torch.where(clipped, -rho.clamp(low, high) * unit_adv, -rho * unit_adv)
    if dual_clip is not None:
        # A < 0: L = |A| max(rho, 1 - clip_low) exceeds -dual_clip A exactly when rho > dual_clip
        dual = (unit_adv < 0) & (rho > dual_clip)
        per_unit = torch.where(dual, -dual_clip * unit_adv, per_unit)
    else:
        dual = torch.zeros_like(clipped)

    total_w = unit_w.sum()
    denominator = _safe_denominator(total_w, normalizer)
    loss = (unit_w * per_unit).sum() / denominator
    if kl_coef != 0.0:
        kl_logp = torch.where(tok_valid, logp, zeros_tok)
        kl_ref = torch.where(tok_valid, ref_logp.to(dtype), zeros_tok)
        kl = kl_penalty(kl_logp, kl_ref, kl_type)
        loss = loss + kl_coef * ((tok_w * kl).sum() / denominator)

    stats = _policy_stats(unit_w, rho, clipped, dual, tok_w, log_ratio, total_w)
    return loss, stats


@torch.no_grad()
def _policy_stats(unit_w, rho, clipped, dual, tok_w, log_ratio, total_w) -> PackedStats:
    """Weighted batch stats as detached 0-d tensors, without host sync (see the public
    docstring). No counted unit: fracs 0, ratio mean/min/max 1; no counted token: approx_kl 0."""
    counted = unit_w > 0
    any_counted = total_w > 0
    safe_w = torch.where(any_counted, total_w, torch.ones_like(total_w))
    tok_total = tok_w.sum()
    safe_tok = torch.where(tok_total > 0, tok_total, torch.ones_like(tok_total))
    # a +inf / -inf sentinel keeps min / max defined on an empty batch (no data-dependent branch)
    inf = rho.new_full((1,), float("inf"))
    ratio_min = torch.cat([torch.where(counted, rho, inf), inf]).amin()
    ratio_max = torch.cat([torch.where(counted, rho, -inf), -inf]).amax()
    zero, one = torch.zeros_like(total_w), torch.ones_like(total_w)
    values = (
        torch.where(any_counted, (unit_w * clipped).sum() / safe_w, zero),
        torch.where(any_counted, (unit_w * dual).sum() / safe_w, zero),
        torch.where(tok_total > 0, (tok_w * -log_ratio).sum() / safe_tok, zero),
        torch.where(any_counted, (unit_w * rho).sum() / safe_w, one),
        torch.where(any_counted, ratio_min, one),
        torch.where(any_counted, ratio_max, one),
    )
    return PackedStats(torch.stack(values))
