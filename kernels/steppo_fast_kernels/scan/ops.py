"""Launcher, registered ops (namespace ``steppo_fast_triton``) and backend functions of the
segmented scans (kernels in ``kernel.py``): step_gae (no grad, as the public op) and
discounted_returns (differentiable).

Backward of ``G_t = r_t + gamma G_{t+1}`` (segmented, ``G_T = gamma-bootstrapped last value``):
``dr = y`` with ``y_t = g_t + gamma y_{t-1}`` (the same kernel scanning forward), and
``d last_value_b = gamma * y[last element of b]`` (0 for an empty trajectory).

fp64 calls never reach these functions: steppo_fast._dispatch routes them to the reference.
"""

from __future__ import annotations

import torch
import triton

from .. import _configs
from .._common import log2_ceil
from . import kernel as _k

_NS = "steppo_fast_triton"

# Chunk size (BLOCK elements per program), carry tile and num_warps come from _configs (per
# device); ``linear_scan(block=..., carry_block=...)`` overrides the tiles (tests).


def linear_scan(
    x: torch.Tensor,
    cu: torch.Tensor,
    *,
    decay: float,
    gamma: float = 0.0,
    values: torch.Tensor | None = None,
    last_values: torch.Tensor | None = None,
    reverse: bool = True,
    block: int | None = None,
    carry_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Segmented scan launcher.

    reverse=True: ``y_t = b_t + decay * y_{t+1}`` within each segment, where ``b_t = x_t +
    gamma * V_{t+1} - V_t`` (``V_T = last_values[seg]`` or 0) when ``values`` is given (GAE),
    else ``b_t = x_t`` plus ``gamma * last_values[seg]`` on each segment's last element
    (discounted returns). reverse=False: ``y_t = x_t + decay * y_{t-1}`` within segments.
    Returns ``(y, y + values)`` (the second None without values), both fp32 [n].
    ``block`` / ``carry_block`` (powers of two) override the chunk and carry tile sizes of the
    device's launch configuration (``_configs.fixed(gpu, "scan" / "scan_carry")``).
    """
    x, cu = x.contiguous(), cu.contiguous()
    values = None if values is None else values.contiguous()
    last_values = None if last_values is None else last_values.contiguous()
    n = x.numel()
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    y_plus_v = torch.empty_like(y) if values is not None else None
    if n == 0:
        return y, y_plus_v
    gpu = _configs.gpu_of(x.device)
    scan_launch = _configs.fixed(gpu, "scan")
    carry_launch = _configs.fixed(gpu, "scan_carry")
    block = block or scan_launch["BLOCK"]
    carry_block = carry_block or carry_launch["BLOCK"]
    num_segments = cu.numel() - 1
    num_chunks = triton.cdiv(n, block)
    common = dict(
        REVERSE=reverse,
        HAS_VALUES=values is not None,
        HAS_LAST=last_values is not None,
        LOG2_SEGMENTS=log2_ceil(num_segments),
        BLOCK=block,
        num_warps=scan_launch.num_warps,
    )
    v_arg = values if values is not None else x  # placeholder pointer, never read
    last_arg = last_values if last_values is not None else x  # placeholder, never read
    carry = y  # placeholder pointer when there is a single chunk
    if num_chunks > 1:
        agg_a = torch.empty(num_chunks, dtype=torch.float32, device=x.device)
        agg_b = torch.empty_like(agg_a)
        _k.scan_aggregate_kernel[(num_chunks,)](
            x, v_arg, last_arg, cu, agg_a, agg_b, n, num_segments, decay, gamma, **common
        )
        carry = torch.empty_like(agg_a)
        _k.scan_carry_kernel[(1,)](
            agg_a, agg_b, carry, num_chunks, BLOCK=carry_block, num_warps=carry_launch.num_warps
        )
    _k.scan_apply_kernel[(num_chunks,)](
        x,
        v_arg,
        last_arg,
        cu,
        carry,
        y,
        y_plus_v if y_plus_v is not None else y,
        n,
        num_segments,
        decay,
        gamma,
        HAS_CARRY=num_chunks > 1,
        **common,
    )
    return y, y_plus_v


# ---- registered ops ----


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
    adv, ret = linear_scan(
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
    out, _ = linear_scan(rewards, cu_trajs, decay=gamma, gamma=gamma, last_values=last_values)
    return out


@discounted_returns_op.register_fake
def _(rewards, cu_trajs, last_values, gamma):
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::discounted_returns_backward", mutates_args=())
def discounted_returns_backward_op(
    grad: torch.Tensor, cu_trajs: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rewards [S], d last_values [B]) fp32 for the output gradient ``grad`` [S]."""
    y, _ = linear_scan(grad, cu_trajs, decay=gamma, reverse=False)
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
    with torch.no_grad():
        adv, ret = step_gae_op(rewards, values, cu_trajs, last_values, float(gamma), float(lam))
    return adv, ret


def discounted_returns(rewards, cu_trajs, *, gamma=1.0, last_values=None):
    """Triton backend of :func:`steppo_fast.discounted_returns` (differentiable w.r.t.
    ``rewards`` and ``last_values``)."""
    return discounted_returns_op(rewards, cu_trajs, last_values, float(gamma))
