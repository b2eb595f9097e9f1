"""Registrations of the C++ ops (``torch.ops.steppo_fast.*``, built from csrc/ into
``steppo_fast._C``): a fake (meta) kernel per op so they trace under ``torch.compile``, and the
autograd formulas of the differentiable ones. Importing this module registers them."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.steppo_fast.*)

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
def _(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, *scalars):
    need_grad = scalars[-1]  # after the options' scalars (StepLossOptions.scalars order)
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
    return (grad_loss * grad_logp,) + (None,) * 15  # 7 tensors + 8 scalars + need_grad


torch.library.register_autograd(
    _LIB + "step_policy_loss", _loss_backward, setup_context=_loss_setup
)
