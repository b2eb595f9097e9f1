"""Launchers, registered ops (namespace ``steppo_fast_triton``) and backend functions of the
segment family: segment_sum, segment_mean, segment_broadcast (kernels in ``kernel.py``).

Ops are ``torch.library.custom_op`` (opaque to torch.compile, traced through their fake
implementations) rather than ``triton_op``: ``triton_op`` traces into the kernel under fake /
AOT dispatch, which breaks on CPU tensors under the Triton interpreter. Autograd:

- sum:       d x = broadcast(d out)              (one broadcast launch)
- mean:      d x = broadcast(d out / n_s)        (the same kernel, ``mean=True``)
- broadcast: d y = segment_sum(d out)            (one reduce launch)

fp64 calls never reach these functions: steppo_fast._dispatch routes them to the reference.
"""

from __future__ import annotations

import torch
import triton

from .. import _configs
from .._common import log2_ceil
from . import kernel as _k

_NS = "steppo_fast_triton"

# Launch configurations (BLOCK_S x BLOCK_T reduce tiles, BLOCK broadcast entries, num_warps)
# come from _configs: per device, and for the reduce by the mean segment length.


def segment_reduce(x: torch.Tensor, cu: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """Per-segment sum (or mean) of ``x`` [A] over ``cu`` [S+1] -> fp32 [S]."""
    x, cu = x.contiguous(), cu.contiguous()
    num_segments = cu.numel() - 1
    out = torch.empty(num_segments, dtype=torch.float32, device=x.device)
    if num_segments == 0:
        return out
    launch = _configs.segment_reduce(_configs.gpu_of(x.device), num_segments, x.numel())
    grid = (triton.cdiv(num_segments, launch["BLOCK_S"]),)
    _k.segment_reduce_kernel[grid](x, cu, out, num_segments, MEAN=mean, **launch.kwargs())
    return out


def segment_expand(y: torch.Tensor, cu: torch.Tensor, num_entries: int, *, mean: bool):
    """Copy ``y[s]`` (divided by ``n_s`` when ``mean``) to each entry of segment s -> fp32 [A]."""
    y, cu = y.contiguous(), cu.contiguous()
    out = torch.empty(num_entries, dtype=torch.float32, device=y.device)
    if num_entries == 0:
        return out
    num_segments = cu.numel() - 1
    launch = _configs.fixed(_configs.gpu_of(y.device), "elementwise")
    grid = (triton.cdiv(num_entries, launch["BLOCK"]),)
    _k.segment_broadcast_kernel[grid](
        y,
        cu,
        out,
        num_entries,
        num_segments,
        MEAN=mean,
        LOG2_SEGMENTS=log2_ceil(num_segments),
        **launch.kwargs(),
    )
    return out


# ---- registered ops ----


@torch.library.custom_op(f"{_NS}::segment_reduce", mutates_args=())
def segment_reduce_op(x: torch.Tensor, cu: torch.Tensor, mean: bool) -> torch.Tensor:
    """fp32 [S] per-segment sum (mean when ``mean``) of ``x`` [A] over ``cu`` [S+1]."""
    return segment_reduce(x, cu, mean=mean)


@segment_reduce_op.register_fake
def _(x, cu, mean):
    return x.new_empty(cu.shape[0] - 1, dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::segment_expand", mutates_args=())
def segment_expand_op(
    y: torch.Tensor, cu: torch.Tensor, num_entries: int, mean: bool
) -> torch.Tensor:
    """fp32 [num_entries]: ``y[s]`` (``/ n_s`` when ``mean``) copied to segment s's entries."""
    return segment_expand(y, cu, num_entries, mean=mean)


@segment_expand_op.register_fake
def _(y, cu, num_entries, mean):
    return y.new_empty(num_entries, dtype=torch.float32)


def _reduce_setup(ctx, inputs, output):
    x, cu, mean = inputs
    ctx.save_for_backward(cu)
    ctx.num_entries = x.shape[0]
    ctx.mean = mean
    ctx.x_dtype = x.dtype


def _reduce_backward(ctx, grad):
    (cu,) = ctx.saved_tensors
    dx = segment_expand_op(grad, cu, ctx.num_entries, ctx.mean).to(ctx.x_dtype)
    return dx, None, None


segment_reduce_op.register_autograd(_reduce_backward, setup_context=_reduce_setup)


def _expand_setup(ctx, inputs, output):
    y, cu, num_entries, mean = inputs
    ctx.save_for_backward(cu)
    ctx.mean = mean
    ctx.y_dtype = y.dtype


def _expand_backward(ctx, grad):
    (cu,) = ctx.saved_tensors
    dy = segment_reduce_op(grad, cu, ctx.mean).to(ctx.y_dtype)
    return dy, None, None, None


segment_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup)


# ---- backend functions (the contract of steppo_fast._dispatch: reference signatures) ----


def segment_sum(x, cu_steps):
    """Triton backend of :func:`steppo_fast.segment_sum` (fp32 math)."""
    return segment_reduce_op(x, cu_steps, False)


def segment_mean(x, cu_steps):
    """Triton backend of :func:`steppo_fast.segment_mean` (empty segment -> 0)."""
    return segment_reduce_op(x, cu_steps, True)


def segment_broadcast(y, cu_steps, *, total=None):
    """Triton backend of :func:`steppo_fast.segment_broadcast`. The output length is ``total``
    when given, else read from ``cu_steps[-1]`` on the host (one sync, like the reference)."""
    if total is None:
        total = int(cu_steps[-1])
    return segment_expand_op(y, cu_steps, total, False)
