"""Pure-PyTorch reference of the segment ops over CSR offsets (the spec the kernels follow).

A CSR layout ``cu`` [S+1] (int32 or int64, ``cu[0] == 0``, non-decreasing) splits an axis of
length ``A = cu[-1]`` into S contiguous segments: segment s = entries ``[cu[s], cu[s+1])``.

Dtypes: fp32/bf16/fp16 inputs are accumulated in fp32 and returned as fp32; fp64 stays fp64.
Everything is vectorised (one ``index_add`` or gather; no Python loop over segments) and
differentiable through torch autograd. The private helpers (``segment_ids``, ``segment_lengths``)
are shared by the other reference modules.
"""

from __future__ import annotations

import torch

from .._validate import compute_dtype


def segment_lengths(cu: torch.Tensor) -> torch.Tensor:
    """Entries per segment, ``cu[1:] - cu[:-1]``, as int64 [S]."""
    cu = cu.long()
    return cu[1:] - cu[:-1]


def segment_ids(cu: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Segment id of every entry, int64 [A]: ``ids[i] = s`` for ``cu[s] <= i < cu[s+1]``.

    ``total`` (= ``cu[-1]``) avoids a device sync when the caller knows the axis length.
    """
    lengths = segment_lengths(cu)
    if total is None:
        total = int(cu[-1]) if cu.numel() else 0
    ids = torch.arange(lengths.numel(), device=cu.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def _segment_sum_ids(x: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[s] = sum_{i: ids[i] == s} x[i]`` in x's dtype (differentiable, out-of-place)."""
    out = torch.zeros(num_segments, dtype=x.dtype, device=x.device)
    return out.index_add(0, ids, x)


def segment_sum(x: torch.Tensor, cu_steps: torch.Tensor) -> torch.Tensor:
    """Per-segment sum: ``out[s] = sum_{i in [cu[s], cu[s+1])} x[i]``.

    x [A] float, cu_steps [S+1] int -> [S] (fp32, or fp64 for fp64 x). Empty segment -> 0.
    """
    dtype = compute_dtype(x)
    ids = segment_ids(cu_steps, x.shape[0])
    return _segment_sum_ids(x.to(dtype), ids, cu_steps.numel() - 1)


def segment_mean(x: torch.Tensor, cu_steps: torch.Tensor) -> torch.Tensor:
    """Per-segment mean: ``out[s] = segment_sum(x)[s] / n_s`` with ``n_s = cu[s+1] - cu[s]``.

    x [A] float, cu_steps [S+1] int -> [S] (fp32, or fp64 for fp64 x). An empty segment
    (n_s = 0) has mean 0 (its sum, 0, divided by 1), never NaN.
    """
    sums = segment_sum(x, cu_steps)
    counts = segment_lengths(cu_steps).clamp_min(1).to(sums.dtype)
    return sums / counts


def segment_broadcast(
    y: torch.Tensor, cu_steps: torch.Tensor, *, total: int | None = None
) -> torch.Tensor:
    """Copy each segment's value to its entries: ``out[i] = y[s]`` for ``cu[s] <= i < cu[s+1]``.

    y [S] float, cu_steps [S+1] int -> [A] (fp32, or fp64 for fp64 y), ``A = total`` when given
    (it must equal ``cu_steps[-1]``; passing it avoids a host read of the offsets and lets
    ``torch.compile`` trace the op), else read from ``cu_steps[-1]``. The gradient w.r.t. y is
    the segment sum of the output gradient.
    """
    dtype = compute_dtype(y)
    if total is None:
        total = int(cu_steps[-1])
    return y.to(dtype)[segment_ids(cu_steps, total)]
