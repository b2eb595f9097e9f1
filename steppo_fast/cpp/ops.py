"""Backend functions of the C++ ops (the public ops' signatures minus ``impl``; inputs already
validated by :mod:`steppo_fast.ops`), thin wrappers over ``torch.ops.steppo_fast.*``.

Dtypes: fp32/bf16/fp16 inputs are read as they are and accumulated in double, results are
fp32; fp64 inputs give fp64 results. Offsets may be int32 or int64. Mixed float dtypes among
the inputs of one op are first cast to the compute dtype (fp32, or fp64 if any is fp64).
"""

from __future__ import annotations

import torch

from .._defs import PackedStats, StepLossOptions
from .._validate import compute_dtype
from . import _registry  # noqa: F401  (fakes and autograd of the ops used below)

_ops = torch.ops.steppo_fast


def _common(dtype: torch.dtype, *tensors):
    """Cast the given float tensors to ``dtype`` unless they already share one dtype that
    computes to it (fp32/bf16/fp16 for fp32, fp64 for fp64). None entries pass through."""
    present = [t for t in tensors if t is not None]
    same = len({t.dtype for t in present}) <= 1
    ok = same and all(compute_dtype(t) == dtype for t in present)
    if ok:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def step_gae(rewards, values, cu_trajs, *, gamma=1.0, lam=1.0, last_values=None):
    """Step (or token) GAE; see :func:`steppo_fast.step_gae`. Returns (advantages, returns)."""
    dtype = compute_dtype(rewards, values, last_values)
    rewards, values = _common(dtype, rewards, values)
    if last_values is not None:
        last_values = last_values.to(dtype).contiguous()
    return _ops.step_gae(
        rewards.contiguous(), values.contiguous(), cu_trajs, float(gamma), float(lam), last_values
    )


def discounted_returns(rewards, cu_trajs, *, gamma=1.0, last_values=None):
    """Discounted reward-to-go; see :func:`steppo_fast.discounted_returns`."""
    dtype = compute_dtype(rewards, last_values)
    (rewards,) = _common(dtype, rewards)
    if last_values is not None:
        last_values = last_values.to(dtype).contiguous()
    return _ops.discounted_returns(rewards.contiguous(), cu_trajs, float(gamma), last_values)


def segment_sum(x, cu_steps):
    """Per-segment sums; see :func:`steppo_fast.segment_sum`."""
    return _ops.segment_sum(x.contiguous(), cu_steps)


def segment_mean(x, cu_steps):
    """Per-segment means (0 for an empty segment); see :func:`steppo_fast.segment_mean`."""
    return _ops.segment_mean(x.contiguous(), cu_steps)


def segment_broadcast(y, cu_steps, *, total=None):
    """Each segment's value copied to its entries; see :func:`steppo_fast.segment_broadcast`.

    The C++ op reads its output length from ``cu_steps[-1]``; under ``torch.compile`` its fake
    kernel gives a data-dependent length, and ``total`` (validated equal to ``cu_steps[-1]`` by
    the public wrapper in eager) tells the compiler what it is."""
    out = _ops.segment_broadcast(y.contiguous(), cu_steps)
    if total is not None:
        torch._check(out.shape[0] == total)
    return out


def whiten(x, weight=None, eps=1e-8):
    """Masked whitening of ``x`` (any shape); see :func:`steppo_fast.whiten`."""
    flat_weight = None if weight is None else weight.reshape(-1).contiguous()
    out = _ops.whiten(x.reshape(-1).contiguous(), flat_weight, float(eps))
    return out.reshape(x.shape)


def group_advantages(scores, group, *, mode="grpo", eps=1e-6):
    """GRPO / Dr.GRPO / RLOO advantages; see :func:`steppo_fast.group_advantages`."""
    return _ops.group_advantages(scores.contiguous(), group.contiguous(), mode, float(eps))


def _stats_dict(sums: torch.Tensor) -> PackedStats:
    """The public stats from the kernel's fp64 sums [8], as detached fp64 0-d tensors without
    host sync (same rules as the reference: no counted unit -> fracs 0, ratios 1; no counted
    token -> approx_kl 0)."""
    total_w, clip_n, dual_n, ratio_n, ratio_min, ratio_max, tok_total, kl_n = sums.unbind()
    counted, tok_counted = total_w > 0, tok_total > 0
    zero, one = torch.zeros_like(total_w), torch.ones_like(total_w)
    safe_w = torch.where(counted, total_w, one)
    safe_tok = torch.where(tok_counted, tok_total, one)
    values = (  # in STAT_KEYS order
        torch.where(counted, clip_n / safe_w, zero),  # clip_frac
        torch.where(counted, dual_n / safe_w, zero),  # dual_clip_frac
        torch.where(tok_counted, kl_n / safe_tok, zero),  # approx_kl
        torch.where(counted, ratio_n / safe_w, one),  # ratio_mean
        torch.where(counted, ratio_min, one),  # ratio_min
        torch.where(counted, ratio_max, one),  # ratio_max
    )
    return PackedStats(torch.stack(values))


def step_policy_loss(
    logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, options: StepLossOptions
):
    """Clipped StepPO policy loss and stats; see :func:`steppo_fast.step_policy_loss`.

    One C++ pass computes the loss numerator, the stats sums and (when ``logp`` requires grad)
    d(loss)/d(logp); the backward is one multiply. Stats are detached fp64 0-d tensors (no host
    sync; the public wrapper converts them to floats when asked). Only ``logp`` gets a gradient
    here (a call where another float input requires grad is routed to the reference by the
    rules of :mod:`steppo_fast._dispatch`; called directly, those inputs get no gradient).
    """
    # compute dtype as the reference's: fp64 if any float input is fp64, else fp32
    dtype = compute_dtype(logp, old_logp, advantages, step_weight, ref_logp)
    use_kl = options.kl_coef != 0.0
    logp, old_logp, ref = _common(dtype, logp, old_logp, ref_logp if use_kl else None)
    advantages = advantages.to(dtype).contiguous()
    if step_weight is not None:
        step_weight = step_weight.to(dtype).contiguous()
    if cu_trajs is not None and cu_trajs.dtype != cu_steps.dtype:
        cu_trajs = cu_trajs.to(cu_steps.dtype)
    need_grad = torch.is_grad_enabled() and logp.requires_grad
    loss_sum, stats, _ = _ops.step_policy_loss(
        logp.contiguous(),
        old_logp.contiguous(),
        advantages,
        cu_steps,
        cu_trajs,
        step_weight,
        None if ref is None else ref.contiguous(),
        *options.scalars(),
        need_grad,
    )
    stats = stats.detach()  # fp64 sums [8]; no gradient flows through them
    if options.normalizer is not None:
        return loss_sum / options.normalizer, _stats_dict(stats)
    total_w = stats[0]
    denominator = torch.where(total_w > 0, total_w, torch.ones_like(total_w)).to(loss_sum.dtype)
    return loss_sum / denominator, _stats_dict(stats)
