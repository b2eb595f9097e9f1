"""Triton kernels (``@triton.jit`` only) of the segmented linear-recurrence scan: step_gae,
discounted_returns (and the backward of discounted_returns), over CSR offsets ``cu`` [B+1] on
a flat axis of length n.

Every recurrence here is ``y_j = b_j + a_j * y_{j-1}`` in a *scan order* j: for the reverse
recurrences (GAE, returns) j runs from the end of the flat array (t = n - 1 - j), for the
forward one (the gradient of returns) j = t. Segment boundaries need no special case: ``a_j =
0`` on the first element of a segment in scan order cuts the chain. So a segmented scan over
the whole batch is one flat linear-recurrence scan, parallel whatever the segment lengths
(a 100k-token trajectory is split over many programs like everything else):

1. ``scan_aggregate_kernel``: program c scans its ``BLOCK`` elements with
   ``tl.associative_scan`` on pairs ``(a, b)`` and writes the chunk's composed map
   ``(prod a, local y at its last element)``.
2. ``scan_carry_kernel``: one program scans the C chunk maps (in tiles of ``BLOCK`` maps, with
   a running carry), giving ``Y[c]`` = y at the last element of chunk c.
3. ``scan_apply_kernel``: program c redoes its local scan and adds ``(prod a up to j) *
   Y[c-1]``, then writes y (and, for GAE, returns = y + V).

One chunk (n <= BLOCK) needs only the apply kernel. Per element: GAE reads r, V, V_{t+1} and
writes A, R; the binary search over ``cu`` (``log2 B`` loads of a tiny cached array) finds the
element's trajectory for its bootstrap value and boundary test.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import find_segment


@triton.jit
def _compose(a_prev, b_prev, a_cur, b_cur):
    """Compose affine maps x -> b + a x: first ``prev`` then ``cur``."""
    return a_prev * a_cur, b_cur + a_cur * b_prev


@triton.jit
def _scan_terms(
    x_ptr,  # [n] rewards (GAE / returns) or output gradient (forward scan)
    values_ptr,  # [n] values V (read only when HAS_VALUES)
    last_ptr,  # [B] bootstrap values (read only when HAS_LAST)
    cu_ptr,  # [B+1] CSR offsets of the segments
    n,  # flat length
    num_segments,  # B (>= 1)
    decay,  # a of an interior element: gamma * lam (GAE), gamma (returns)
    gamma,  # bootstrap discount: delta_t = r_t + gamma * V_{t+1} - V_t
    chunk,  # chunk index (program id)
    REVERSE: tl.constexpr,  # scan order j = n - 1 - t (reverse recurrences)
    HAS_VALUES: tl.constexpr,  # GAE (True) or plain discounted sum (False)
    HAS_LAST: tl.constexpr,  # bootstrap last_values given
    LOG2_SEGMENTS: tl.constexpr,  # binary-search steps over cu
    BLOCK: tl.constexpr,  # elements per chunk
):
    """Per-element affine maps (a, b) of one chunk in scan order, and the flat positions t."""
    j = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    if REVERSE:
        t = n - 1 - j
    else:
        t = j
    t = tl.where(mask, t, 0)
    seg = find_segment(cu_ptr, t, num_segments, LOG2_SEGMENTS)
    x = tl.load(x_ptr + t, mask=mask, other=0.0).to(tl.float32)
    if REVERSE:
        seg_end = tl.load(cu_ptr + seg + 1, mask=mask, other=0).to(tl.int64)
        boundary = t + 1 == seg_end  # last element of its segment: chain starts here
        if HAS_LAST:
            boot = tl.load(last_ptr + seg, mask=mask & boundary, other=0.0).to(tl.float32)
        else:
            boot = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_VALUES:
            v = tl.load(values_ptr + t, mask=mask, other=0.0).to(tl.float32)
            v_next = tl.load(values_ptr + t + 1, mask=mask & ~boundary, other=0.0).to(tl.float32)
            v_next = tl.where(boundary, boot, v_next)
            b = x + gamma * v_next - v
        else:
            b = x + tl.where(boundary, gamma * boot, 0.0)
    else:
        seg_start = tl.load(cu_ptr + seg, mask=mask, other=0).to(tl.int64)
        boundary = t == seg_start  # first element of its segment
        b = x
    a = tl.where(boundary, 0.0, decay)
    b = tl.where(mask, b, 0.0)
    return a, b, t, mask


@triton.jit
def scan_aggregate_kernel(
    x_ptr,
    values_ptr,
    last_ptr,
    cu_ptr,  # inputs, as in _scan_terms
    agg_a_ptr,  # [C] fp32 out: product of the chunk's a
    agg_b_ptr,  # [C] fp32 out: local y (zero carry-in) at the chunk's last element
    n,
    num_segments,
    decay,
    gamma,  # as in _scan_terms
    REVERSE: tl.constexpr,
    HAS_VALUES: tl.constexpr,
    HAS_LAST: tl.constexpr,
    LOG2_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    a, b, t, mask = _scan_terms(
        x_ptr,
        values_ptr,
        last_ptr,
        cu_ptr,
        n,
        num_segments,
        decay,
        gamma,
        chunk,
        REVERSE,
        HAS_VALUES,
        HAS_LAST,
        LOG2_SEGMENTS,
        BLOCK,
    )
    # Masked tail elements (after the valid ones in scan order) become identities (1, 0).
    a = tl.where(mask, a, 1.0)
    sa, sb = tl.associative_scan((a, b), 0, _compose)
    tail = tl.arange(0, BLOCK) == BLOCK - 1
    tl.store(agg_a_ptr + chunk, tl.sum(tl.where(tail, sa, 0.0), axis=0))
    tl.store(agg_b_ptr + chunk, tl.sum(tl.where(tail, sb, 0.0), axis=0))


@triton.jit
def scan_carry_kernel(
    agg_a_ptr,  # [C] fp32: chunk maps' a (product of a over the chunk)
    agg_b_ptr,  # [C] fp32: chunk maps' b (local y at the chunk end)
    carry_ptr,  # [C] fp32 out: Y[c] = y at the last element of chunk c (full scan)
    num_chunks,  # C
    BLOCK: tl.constexpr,  # chunk maps per iteration
):
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)  # fp32 scalar 0
    for c0 in range(0, num_chunks, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        mask = c < num_chunks
        a = tl.load(agg_a_ptr + c, mask=mask, other=1.0)
        b = tl.load(agg_b_ptr + c, mask=mask, other=0.0)
        sa, sb = tl.associative_scan((a, b), 0, _compose)
        y = sb + sa * carry
        tl.store(carry_ptr + c, y, mask=mask)
        last = tl.minimum(c0 + BLOCK, num_chunks) - 1
        carry = tl.sum(tl.where(c == last, y, 0.0), axis=0)


@triton.jit
def scan_apply_kernel(
    x_ptr,
    values_ptr,
    last_ptr,
    cu_ptr,  # inputs, as in _scan_terms
    carry_ptr,  # [C] fp32: Y[c] from the carry kernel (read only when HAS_CARRY)
    out_ptr,  # [n] fp32 out: y (advantages / returns / gradient)
    out_plus_v_ptr,  # [n] fp32 out: y + V (GAE returns; written only when HAS_VALUES)
    n,
    num_segments,
    decay,
    gamma,  # as in _scan_terms
    REVERSE: tl.constexpr,
    HAS_VALUES: tl.constexpr,
    HAS_LAST: tl.constexpr,
    HAS_CARRY: tl.constexpr,  # more than one chunk: add the carried-in value
    LOG2_SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    a, b, t, mask = _scan_terms(
        x_ptr,
        values_ptr,
        last_ptr,
        cu_ptr,
        n,
        num_segments,
        decay,
        gamma,
        chunk,
        REVERSE,
        HAS_VALUES,
        HAS_LAST,
        LOG2_SEGMENTS,
        BLOCK,
    )
    sa, y = tl.associative_scan((a, b), 0, _compose)
    if HAS_CARRY:
        prev = tl.load(carry_ptr + tl.maximum(chunk - 1, 0))  # Y[c-1]; unused for chunk 0
        y = y + sa * tl.where(chunk > 0, prev, 0.0)
    tl.store(out_ptr + t, y, mask=mask)
    if HAS_VALUES:
        v = tl.load(values_ptr + t, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_plus_v_ptr + t, y + v, mask=mask)
