"""C++ CPU backend (``impl="cpp"``): thin wrappers over ``torch.ops.steppo_fast.*``.

The kernels live in ``csrc/`` and are built by ``setup.py`` into ``steppo_fast._C`` (importing
it registers the ops). This module registers, for each op, a fake (meta) kernel so the ops
trace under ``torch.compile``, and an autograd formula for the differentiable ones, then
exposes functions named like the public ops with the reference signatures (inputs already
validated by :mod:`steppo_fast.ops`).

Dtypes: fp32/bf16/fp16 inputs are read as they are and accumulated in double, results are
fp32; fp64 inputs give fp64 results. Offsets may be int32 or int64. Mixed float dtypes among
the inputs of one op are first cast to the compute dtype (fp32, or fp64 if any is fp64).

Differentiable: ``discounted_returns`` (rewards, last_values), ``segment_sum``,
``segment_mean``, ``segment_broadcast``, ``whiten`` (x), ``group_advantages`` (scores),
``step_policy_loss`` (logp; when another input requires grad this backend defers to the
reference, which differentiates everything). ``step_gae`` has no gradient (as the reference).
Not implemented here (``impl="auto"`` uses the reference): ``gigpo_advantages``,
``kl_penalty``, ``value_loss``, ``linear_logprobs``.

Threads: the kernels follow ``torch.get_num_threads()`` unless :func:`set_num_threads` (or the
:func:`num_threads` context manager) says otherwise, and use more than one thread only on
inputs large enough to gain from it. On a machine whose cores are busy with other work, use
``set_num_threads(1)``: a parallel region waits for every thread to be scheduled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.steppo_fast.*)
from ._cpu_threads import (  # noqa: F401  (public: the thread-count knob)
    get_num_threads,
    num_threads,
    set_num_threads,
    thread_setting,
)
from ._validate import compute_dtype
from .reference.loss import PackedStats

_ops = torch.ops.steppo_fast
_LIB = "steppo_fast::"


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes and dtypes, for torch.compile / FakeTensor tracing.


@torch.library.register_fake(_LIB + "step_gae")
def _(rewards, values, cu_trajs, gamma, lam, last_values):
    dtype = _out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(
        rewards.shape, dtype=dtype
    )


@torch.library.register_fake(_LIB + "discounted_returns")
def _(rewards, cu_trajs, gamma, last_values):
    return rewards.new_empty(rewards.shape, dtype=_out_dtype(rewards))


@torch.library.register_fake(_LIB + "segment_sum")
def _(x, cu_steps):
    return x.new_empty((cu_steps.shape[0] - 1,), dtype=_out_dtype(x))


@torch.library.register_fake(_LIB + "segment_mean")
def _(x, cu_steps):
    return x.new_empty((cu_steps.shape[0] - 1,), dtype=_out_dtype(x))


def _fake_broadcast(y, cu_steps):
    # the output length cu_steps[-1] is data-dependent
    length = torch.library.get_ctx().new_dynamic_size()
    return y.new_empty((length,), dtype=_out_dtype(y))


torch.library.register_fake(_LIB + "segment_broadcast")(_fake_broadcast)
torch.library.register_fake(_LIB + "segment_mean_backward")(_fake_broadcast)


@torch.library.register_fake(_LIB + "whiten")
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x))


@torch.library.register_fake(_LIB + "whiten_backward")
def _(grad, x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x))


@torch.library.register_fake(_LIB + "group_advantages")
def _(scores, group, mode, eps):
    return scores.new_empty(scores.shape, dtype=_out_dtype(scores))


@torch.library.register_fake(_LIB + "group_advantages_backward")
def _(grad, scores, group, mode, eps):
    return scores.new_empty(scores.shape, dtype=_out_dtype(scores))


@torch.library.register_fake(_LIB + "step_policy_loss")
def _(
    logp,
    old_logp,
    advantages,
    cu_steps,
    cu_trajs,
    step_weight,
    ref_logp,
    ratio_level,
    length_power,
    clip_low,
    clip_high,
    dual_clip,
    agg,
    kl_coef,
    kl_type,
    need_grad,
):
    dtype = _out_dtype(logp)
    return (
        logp.new_empty((), dtype=dtype),
        logp.new_empty((8,), dtype=torch.float64),
        logp.new_empty((logp.shape[0] if need_grad else 0,), dtype=dtype),
    )


# ---------------------------------------------------------------------------------------------
# Autograd formulas.


def _discounted_setup(ctx, inputs, output):
    rewards, cu_trajs, gamma, last_values = inputs
    ctx.save_for_backward(cu_trajs)
    ctx.gamma = gamma
    ctx.has_last = last_values is not None


def _discounted_backward(ctx, grad):
    # d out_t / d r_u = gamma^(u - t) for t <= u in one trajectory: the gradient is the forward
    # (prefix) discounted scan of grad, i.e. the reverse scan of the flipped arrays.
    (cu,) = ctx.saved_tensors
    n = grad.shape[0]
    flipped_cu = n - cu.flip(0)
    grad_r = _ops.discounted_returns(grad.flip(0).contiguous(), flipped_cu, ctx.gamma, None)
    grad_r = grad_r.flip(0)
    grad_last = None
    if ctx.has_last:
        lengths = cu[1:] - cu[:-1]
        if n == 0:
            grad_last = grad_r.new_zeros(lengths.shape[0])
        else:
            last = grad_r[(cu[1:] - 1).clamp_min(0).long()]
            grad_last = torch.where(lengths > 0, ctx.gamma * last, torch.zeros_like(last))
    return grad_r, None, None, grad_last


torch.library.register_autograd(
    _LIB + "discounted_returns", _discounted_backward, setup_context=_discounted_setup
)


def _save_offsets(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _segment_sum_backward(ctx, grad):
    (cu,) = ctx.saved_tensors
    return _ops.segment_broadcast(grad.contiguous(), cu), None


def _segment_mean_backward(ctx, grad):
    (cu,) = ctx.saved_tensors
    return _ops.segment_mean_backward(grad.contiguous(), cu), None


def _segment_broadcast_backward(ctx, grad):
    (cu,) = ctx.saved_tensors
    return _ops.segment_sum(grad.contiguous(), cu), None


torch.library.register_autograd(
    _LIB + "segment_sum", _segment_sum_backward, setup_context=_save_offsets
)
torch.library.register_autograd(
    _LIB + "segment_mean", _segment_mean_backward, setup_context=_save_offsets
)
torch.library.register_autograd(
    _LIB + "segment_broadcast", _segment_broadcast_backward, setup_context=_save_offsets
)


def _whiten_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _whiten_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return _ops.whiten_backward(grad.contiguous(), x, weight, ctx.eps), None, None


torch.library.register_autograd(_LIB + "whiten", _whiten_backward, setup_context=_whiten_setup)


def _group_setup(ctx, inputs, output):
    scores, group, mode, eps = inputs
    ctx.save_for_backward(scores, group)
    ctx.mode, ctx.eps = mode, eps


def _group_backward(ctx, grad):
    scores, group = ctx.saved_tensors
    dx = _ops.group_advantages_backward(grad.contiguous(), scores, group, ctx.mode, ctx.eps)
    return dx, None, None, None


torch.library.register_autograd(
    _LIB + "group_advantages", _group_backward, setup_context=_group_setup
)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])  # d loss_sum / d logp, computed in the forward pass


def _loss_backward(ctx, grad_loss, grad_stats, grad_grad):
    (grad_logp,) = ctx.saved_tensors
    return (grad_loss * grad_logp,) + (None,) * 15


torch.library.register_autograd(
    _LIB + "step_policy_loss", _loss_backward, setup_context=_loss_setup
)


# ---------------------------------------------------------------------------------------------
# Backend functions (the public ops' signatures minus ``impl``; inputs already validated).


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


@dataclass(frozen=True)
class PolicyLossOptions:
    """Scalar options of the C++ ``step_policy_loss`` op (its schema takes them in this order;
    parsed into a ``LossOptions`` struct in csrc/policy_loss.cpp)."""

    ratio_level: str = "step"
    length_power: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "step-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"

    def op_args(self) -> tuple:
        dual = None if self.dual_clip is None else float(self.dual_clip)
        return (
            self.ratio_level,
            float(self.length_power),
            float(self.clip_low),
            float(self.clip_high),
            dual,
            self.agg,
            float(self.kl_coef),
            self.kl_type,
        )


def step_policy_loss(
    logp,
    old_logp,
    advantages,
    cu_steps,
    *,
    cu_trajs=None,
    ratio_level="step",
    length_power=1.0,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="step-mean",
    step_weight=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_type="k3",
    normalizer=None,
):
    """Clipped StepPO policy loss and stats; see :func:`steppo_fast.step_policy_loss`.

    One C++ pass computes the loss numerator, the stats sums and (when ``logp`` requires grad)
    d(loss)/d(logp); the backward is one multiply. Stats are detached fp64 0-d tensors (no host
    sync; the public wrapper converts them to floats when asked). Only ``logp`` gets a gradient
    here: when another float input requires grad, this defers to the reference implementation.
    """
    opts = PolicyLossOptions(
        ratio_level, length_power, clip_low, clip_high, dual_clip, agg, kl_coef, kl_type
    )
    others = (old_logp, advantages, step_weight, ref_logp)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in others):
        from .reference.loss import step_policy_loss as reference_loss

        return reference_loss(
            logp,
            old_logp,
            advantages,
            cu_steps,
            cu_trajs=cu_trajs,
            step_weight=step_weight,
            ref_logp=ref_logp,
            normalizer=normalizer,
            **asdict(opts),
        )
    # compute dtype as the reference's: fp64 if any float input is fp64, else fp32
    dtype = compute_dtype(logp, old_logp, advantages, step_weight, ref_logp)
    use_kl = kl_coef != 0.0
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
        *opts.op_args(),
        need_grad,
    )
    stats = stats.detach()  # fp64 sums [8]; no gradient flows through them
    if normalizer is not None:
        return loss_sum / normalizer, _stats_dict(stats)
    total_w = stats[0]
    denominator = torch.where(total_w > 0, total_w, torch.ones_like(total_w)).to(loss_sum.dtype)
    return loss_sum / denominator, _stats_dict(stats)
