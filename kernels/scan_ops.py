"""Registered ops (namespace ``steppo_fast_triton``) and backend functions for the segmented
scans: step_gae (no grad, as the public op) and discounted_returns (differentiable).

Backward of ``G_t = r_t + gamma G_{t+1}`` (segmented, ``G_T = gamma-bootstrapped last value``):
``dr = y`` with ``y_t = g_t + gamma y_{t-1}`` (the same kernel scanning forward), and
``d last_value_b = gamma * y[last element of b]`` (0 for an empty trajectory).

fp64 inputs go to the torch reference (the gradcheck path).
"""

from __future__ import annotations

import torch

from . import scan as _k
from ._common import is_fp64

_NS = "steppo_fast_triton"


@torch.library.custom_op(f"{_NS}::step_gae", mutates_args=())
def step_gae_op(
    rewards: torch.Tensor,
    values: torch.Tensor,
    cu_trajs: torch.Tensor,
    last_values: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both fp32 [S]: segmented reverse GAE scan."""
    adv, ret = _k.linear_scan(
        rewards, cu_trajs, decay=gamma * lam, gamma=gamma, values=values, last_values=last_values
    )
    return adv, ret


@step_gae_op.register_fake
def _(rewards, values, cu_trajs, last_values, gamma, lam):
    out = rewards.new_empty(rewards.shape[0], dtype=torch.float32)
    return out, torch.empty_like(out)


@torch.library.custom_op(f"{_NS}::discounted_returns", mutates_args=())
def discounted_returns_op(
    rewards: torch.Tensor, cu_trajs: torch.Tensor, last_values: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """fp32 [S]: segmented reverse scan ``G_t = r_t + gamma G_{t+1}``, ``G_T = last_values``."""
    out, _ = _k.linear_scan(rewards, cu_trajs, decay=gamma, gamma=gamma, last_values=last_values)
    return out


@discounted_returns_op.register_fake
def _(rewards, cu_trajs, last_values, gamma):
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::discounted_returns_backward", mutates_args=())
def discounted_returns_backward_op(
    grad: torch.Tensor, cu_trajs: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rewards [S], d last_values [B]) fp32 for the output gradient ``grad`` [S]."""
    y, _ = _k.linear_scan(grad, cu_trajs, decay=gamma, reverse=False)
    cu = cu_trajs.long()
    nonempty = cu[1:] > cu[:-1]
    if y.numel() == 0:
        return y, torch.zeros(cu.numel() - 1, dtype=torch.float32, device=y.device)
    last = y[(cu[1:] - 1).clamp_min(0)]
    return y, torch.where(nonempty, gamma * last, torch.zeros_like(last))


@discounted_returns_backward_op.register_fake
def _(grad, cu_trajs, gamma):
    return grad.new_empty(grad.shape[0], dtype=torch.float32), grad.new_empty(
        cu_trajs.shape[0] - 1, dtype=torch.float32
    )


def _returns_setup(ctx, inputs, output):
    rewards, cu_trajs, last_values, gamma = inputs
    ctx.save_for_backward(cu_trajs)
    ctx.gamma = gamma
    ctx.r_dtype = rewards.dtype
    ctx.lv_dtype = None if last_values is None else last_values.dtype


def _returns_backward(ctx, grad):
    (cu_trajs,) = ctx.saved_tensors
    d_rewards, d_last = discounted_returns_backward_op(grad, cu_trajs, ctx.gamma)
    d_last = None if ctx.lv_dtype is None else d_last.to(ctx.lv_dtype)
    return d_rewards.to(ctx.r_dtype), None, d_last, None


discounted_returns_op.register_autograd(_returns_backward, setup_context=_returns_setup)


# ---- backend functions (reference signatures) ----


def step_gae(rewards, values, cu_trajs, *, gamma=1.0, lam=1.0, last_values=None):
    """Triton backend of :func:`steppo_fast.step_gae` (raw advantages and returns, no grad)."""
    if is_fp64(rewards, values, last_values):
        from steppo_fast.reference import step_gae as ref

        return ref(rewards, values, cu_trajs, gamma=gamma, lam=lam, last_values=last_values)
    with torch.no_grad():
        adv, ret = step_gae_op(rewards, values, cu_trajs, last_values, float(gamma), float(lam))
    return adv, ret


def discounted_returns(rewards, cu_trajs, *, gamma=1.0, last_values=None):
    """Triton backend of :func:`steppo_fast.discounted_returns` (differentiable w.r.t.
    ``rewards`` and ``last_values``)."""
    if is_fp64(rewards, last_values):
        from steppo_fast.reference import discounted_returns as ref

        return ref(rewards, cu_trajs, gamma=gamma, last_values=last_values)
    return discounted_returns_op(rewards, cu_trajs, last_values, float(gamma))
