"""Triton kernels (``@triton.jit`` only) of the CSR segment ops (segment_sum, segment_mean,
segment_broadcast).

Layout: ``cu`` [S+1] offsets split an axis of length ``A = cu[-1]`` into S segments,
segment s = entries ``[cu[s], cu[s+1])``; no padding to ``[S, max_len]`` anywhere.

- reduce (sum / mean): one program per block of ``BLOCK_S`` segments walks a
  ``[BLOCK_S, BLOCK_T]`` tile along its segments until the longest one ends; fp32
  accumulation, deterministic (no atomics). Reads each entry once, writes S floats.
- broadcast: one program per ``BLOCK`` entries finds each entry's segment by a binary search
  over ``cu`` (``log2 S`` cached loads) and gathers ``y[s]`` (divided by ``n_s`` for the
  backward of the mean). Perfectly balanced whatever the segment lengths.

Outputs are fp32 (bf16/fp16 inputs are converted to fp32 right after each load).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import find_segment


@triton.jit
def segment_reduce_kernel(
    x_ptr,  # [A] input values (fp32/bf16/fp16), contiguous
    cu_ptr,  # [S+1] CSR offsets (int32/int64)
    out_ptr,  # [S] fp32 output: per-segment sum (or mean)
    num_segments,  # S
    MEAN: tl.constexpr,  # divide each sum by its segment length (empty segment -> 0)
    BLOCK_S: tl.constexpr,  # segments per program
    BLOCK_T: tl.constexpr,  # entries per segment per loop iteration
):
    seg = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    seg_mask = seg < num_segments
    start = tl.load(cu_ptr + seg, mask=seg_mask, other=0).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1, mask=seg_mask, other=0).to(tl.int64)
    length = end - start
    longest = tl.max(length, axis=0)
    acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, longest, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        mask = pos[None, :] < length[:, None]
        x = tl.load(x_ptr + start[:, None] + pos[None, :], mask=mask, other=0.0)
        acc += x.to(tl.float32)
    total = tl.sum(acc, axis=1)
    if MEAN:
        total = total / tl.maximum(length, 1).to(tl.float32)
    tl.store(out_ptr + seg, total, mask=seg_mask)


@triton.jit
def segment_broadcast_kernel(
    y_ptr,  # [S] per-segment values (fp32/bf16/fp16)
    cu_ptr,  # [S+1] CSR offsets (int32/int64)
    out_ptr,  # [A] fp32 output: out[i] = y[segment of i] (/ n_s when MEAN)
    num_entries,  # A
    num_segments,  # S (>= 1 when A > 0)
    MEAN: tl.constexpr,  # divide by the segment length (backward of segment_mean)
    LOG2_SEGMENTS: tl.constexpr,  # binary-search steps, 2 ** LOG2_SEGMENTS >= S
    BLOCK: tl.constexpr,  # entries per program
):
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < num_entries
    seg = find_segment(cu_ptr, pos, num_segments, LOG2_SEGMENTS)
    y = tl.load(y_ptr + seg, mask=mask, other=0.0).to(tl.float32)
    if MEAN:
        start = tl.load(cu_ptr + seg, mask=mask, other=0)
        end = tl.load(cu_ptr + seg + 1, mask=mask, other=1)
        y = y / (end - start).to(tl.float32)
    tl.store(out_ptr + pos, y, mask=mask)
