"""Finishing kernel of the fused step policy loss: the per-step table -> the loss and the stats.

``policy_finish_kernel`` is one program. It walks the per-step table ``[S, NUM_COLS]``
written by ``kernel.policy_fwd_kernel`` (and ``kernel_traj.policy_traj_kernel``) in
``[BLOCK_S, COLS]`` tiles and keeps per-lane column sums, minima and maxima; after the loop it
reduces the lanes (``tl.sum`` / ``tl.min`` / ``tl.max``: a fixed order, so the result is
deterministic) and writes, all fp32:

    D        = normalizer, else sum_s W_s (1 when that is 0: the numerator is 0 then)
    loss     = (sum_s WL_s + kl_coef * sum_s WK_s) / D
    stats[0] = clip_frac      = sum WCLIP / sum W        (0 when no unit is counted)
    stats[1] = dual_clip_frac = sum WDUAL / sum W        (0 when no unit is counted)
    stats[2] = approx_kl      = sum WAKL / sum TOKW      (0 when no token is counted)
    stats[3] = ratio_mean     = sum WRHO / sum W         (1 when no unit is counted)
    stats[4] = ratio_min      = min RHO_MIN              (1 when no unit is counted)
    stats[5] = ratio_max      = max RHO_MAX              (1 when no unit is counted)

(the "no counted unit" rules of ``steppo_fast.reference.loss._policy_stats``). So the forward
of the loss is two launches (three with the trajectory pass of trajectory ratios and traj-mean)
with no host sync and no torch epilogue. One program reads the first FINISH_COLS columns of
the 64-byte rows (at most ``4 * NUM_COLS * S`` bytes, 256 KB at S = 4096): below a
microsecond of HBM time, far below its launch cost; S is the number of steps, so one program is
enough (a tree of block partial sums would add a launch to save nothing).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel import (
    COL_RHO_MAX,
    COL_RHO_MIN,
    COL_TOKW,
    COL_W,
    COL_WAKL,
    COL_WCLIP,
    COL_WDUAL,
    COL_WK,
    COL_WL,
    COL_WRHO,
    FINISH_COLS,
)


@triton.jit
def _column(values, cols, COL: tl.constexpr):
    """The entry of column ``COL`` of a [COLS] vector (a masked sum: no dynamic indexing)."""
    return tl.sum(tl.where(cols == COL, values, 0.0), axis=0)


@triton.jit
def policy_finish_kernel(
    table_ptr,  # [S, NUM_COLS] fp32 per-step table (only the first FINISH_COLS columns read)
    loss_ptr,  # [1] fp32 out: the loss
    stats_ptr,  # [6] fp32 out: clip_frac, dual_clip_frac, approx_kl, ratio_mean/min/max
    denom_ptr,  # [1] fp32 out: the denominator D (read by the backward)
    num_steps,  # S (may be 0)
    kl_coef,  # weight of the KL term
    normalizer,  # D when HAS_NORMALIZER (> 0)
    HAS_NORMALIZER: tl.constexpr,  # normalizer given
    NUM_COLS: tl.constexpr,  # table row length (row stride)
    COLS: tl.constexpr,  # power of two >= FINISH_COLS: tile width
    BLOCK_S: tl.constexpr,  # table rows per loop iteration
):
    cols = tl.arange(0, COLS)
    col_in = cols < FINISH_COLS
    is_min = cols == COL_RHO_MIN
    is_max = cols == COL_RHO_MAX
    acc = tl.zeros([BLOCK_S, COLS], dtype=tl.float32)
    lo = tl.full([BLOCK_S, COLS], float("inf"), tl.float32)
    hi = tl.full([BLOCK_S, COLS], float("-inf"), tl.float32)
    for r0 in range(0, num_steps, BLOCK_S):
        rows = r0 + tl.arange(0, BLOCK_S).to(tl.int64)
        m = (rows < num_steps)[:, None] & col_in[None, :]
        ptrs = table_ptr + rows[:, None] * NUM_COLS + cols[None, :]
        tile = tl.load(ptrs, mask=m, other=0.0)
        # the min/max columns hold +-inf for uncounted units: keep them out of the sums
        acc += tl.where((is_min | is_max)[None, :], 0.0, tile)
        lo = tl.minimum(lo, tl.where(m, tile, float("inf")))
        hi = tl.maximum(hi, tl.where(m, tile, float("-inf")))
    sums = tl.sum(acc, axis=0)
    w = _column(sums, cols, COL_W)
    tok_w = _column(sums, cols, COL_TOKW)
    counted = w > 0
    safe_w = tl.where(counted, w, 1.0)
    safe_tok = tl.where(tok_w > 0, tok_w, 1.0)
    if HAS_NORMALIZER:
        denom = normalizer
    else:
        denom = safe_w
    numerator = _column(sums, cols, COL_WL) + kl_coef * _column(sums, cols, COL_WK)
    rho_min = tl.sum(tl.where(is_min, tl.min(lo, axis=0), 0.0), axis=0)
    rho_max = tl.sum(tl.where(is_max, tl.max(hi, axis=0), 0.0), axis=0)
    tl.store(loss_ptr, numerator / denom)
    tl.store(denom_ptr, denom)
    tl.store(stats_ptr + 0, tl.where(counted, _column(sums, cols, COL_WCLIP) / safe_w, 0.0))
    tl.store(stats_ptr + 1, tl.where(counted, _column(sums, cols, COL_WDUAL) / safe_w, 0.0))
    tl.store(stats_ptr + 2, tl.where(tok_w > 0, _column(sums, cols, COL_WAKL) / safe_tok, 0.0))
    tl.store(stats_ptr + 3, tl.where(counted, _column(sums, cols, COL_WRHO) / safe_w, 1.0))
    tl.store(stats_ptr + 4, tl.where(counted, rho_min, 1.0))
    tl.store(stats_ptr + 5, tl.where(counted, rho_max, 1.0))
