"""Helpers shared by the Triton kernel families: CSR segment lookup inside a kernel and the
small host-side conventions of every launcher.

Launchers take already-validated tensors (see :mod:`steppo_fast._validate`), make them
contiguous, and allocate fp32 outputs (inputs in bf16/fp16 are loaded and converted to fp32 right
after each load: the math is fp32, and the Triton interpreter computes garbage on bf16 values).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_segment(cu_ptr, pos, num_segments, LOG2_SEGMENTS: tl.constexpr):
    """Segment of every position: the largest ``s`` in ``[0, num_segments)`` with
    ``cu[s] <= pos`` (so empty segments are skipped), by a branch-free binary search.

    cu_ptr:         CSR offsets [num_segments + 1] (int32/int64), cu[0] == 0, non-decreasing
    pos:            int64 tensor of positions to look up (any shape)
    num_segments:   number of segments S (>= 1)
    LOG2_SEGMENTS:  number of halving steps; 2 ** LOG2_SEGMENTS must be >= num_segments
    """
    seg = tl.zeros_like(pos)
    for i in tl.static_range(LOG2_SEGMENTS):
        step = 1 << (LOG2_SEGMENTS - 1 - i)
        cand = seg + step
        in_range = cand < num_segments
        start = tl.load(cu_ptr + cand, mask=in_range, other=0).to(tl.int64)
        seg = tl.where(in_range & (start <= pos), cand, seg)
    return seg


def log2_ceil(n: int) -> int:
    """Halving steps for :func:`find_segment` over ``n`` segments (at least 1)."""
    return max(1, (max(n, 1) - 1).bit_length())
