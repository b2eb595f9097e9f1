"""Trajectory pass of the fused step policy loss: the per-trajectory work of ratio
"trajectory" (GSPO) and agg "traj-mean", on the per-step table written by
``kernel.policy_fwd_kernel`` and before ``kernel_finish.policy_finish_kernel``.

``policy_traj_kernel``: one program per block of ``BLOCK_B`` trajectories walks their steps
(``cu_trajs``) in ``[BLOCK_B, BLOCK_K]`` tiles, three passes over the trajectory's O(steps)
entries (never its tokens):

1. counts, per trajectory b (steps with sw > 0 are "counted"):
   ``c_steps_b`` = counted steps, ``c_toks_b`` = tokens of counted steps, and for trajectory
   ratios the log-ratio sum ``X_b = sum_s lr_sum_s`` (``lr_sum`` is 0 on uncounted steps);
2. per step:
   - traj-mean: the step kernel wrote the columns with unit bases 1; multiply the token-weight
     columns (WK, TOKW, WAKL, TOK_W) by ``1 / c_toks_b`` and, for token/step ratios, the unit
     columns (WL, W, WCLIP, WDUAL, WRHO, DADV, DLR, BASE_W) by ``1 / c_b`` (c_b = c_toks_b for
     token units, c_steps_b for step units; clamped to >= 1, an all-zero-weight trajectory has
     no counted unit); ``DSW = DSW * (1 / c_b) + kl_coef * KL_s / c_toks_b``;
   - ratio "trajectory": l_b = X_b / max(c_toks_b, 1) ** p for every step of b, the PPO unit
     terms with base b_s (1, n_s or 1 / c_steps_b) written to the unit columns, and
     ``G_b = sum_s w_s dL_s/dl_b`` accumulated;
3. ratio "trajectory": ``COL_DLR = G_b / max(c_toks_b, 1) ** p`` on every step of b (d loss /
   d x_i of each token of b, read by the backward kernel).

So trajectory ratios and traj-mean cost one O(S) launch between the token kernel and the
finishing kernel (3 forward launches), and nothing in the backward (the table carries it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel import (
    COL_BASE_W,
    COL_DADV,
    COL_DLR,
    COL_DSW,
    COL_KL,
    COL_TOK_W,
    COL_TOKW,
    COL_W,
    COL_WAKL,
    COL_WCLIP,
    COL_WDUAL,
    COL_WK,
    COL_WL,
    COL_WRHO,
    length_pow,
    store_unit_terms,
)


@triton.jit
def _scale_column(row, COL: tl.constexpr, scale, mask):
    """table[row, COL] *= scale (elementwise over the tile)."""
    tl.store(row + COL, tl.load(row + COL, mask=mask, other=0.0) * scale, mask=mask)


@triton.jit
def _traj_steps(first, count, k0, cu_ptr, sw_ptr, HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Steps ``k0 .. k0 + BLOCK_K`` of each trajectory of the block: (step index s [B, K],
    in-trajectory mask, token count n_s (fp32), step weight (0 if invalid), valid = sw > 0)."""
    k = k0 + tl.arange(0, BLOCK_K)
    mask = k[None, :] < count[:, None]
    s = first[:, None] + k[None, :]
    start = tl.load(cu_ptr + s, mask=mask, other=0)
    n = (tl.load(cu_ptr + s + 1, mask=mask, other=0) - start).to(tl.float32)
    if HAS_WEIGHT:
        sw = tl.load(sw_ptr + s, mask=mask, other=0.0).to(tl.float32)
    else:
        sw = tl.where(mask, 1.0, 0.0)
    valid = mask & (sw > 0)
    return s, mask, n, tl.where(valid, sw, 0.0), valid


@triton.jit
def policy_traj_kernel(
    adv_ptr,  # [S] advantages (ratio "trajectory" only)
    sw_ptr,  # [S] step weights (HAS_WEIGHT only; else 1)
    cu_ptr,  # [S+1] cu_steps offsets
    cu_trajs_ptr,  # [B+1] cu_trajs offsets (cu_trajs[B] == S)
    table_ptr,  # [S, NUM_COLS] fp32 in/out: the per-step table (see step_loss.COL_*)
    lr_sum_ptr,  # [S] fp32: per-step sums of the (masked) log-ratios (ratio "trajectory" only)
    num_trajs,  # B
    length_power,  # p in l_b = X_b / c_toks_b ** p
    clip_low,  # as in policy_fwd_kernel
    clip_high,  # as in policy_fwd_kernel
    dual_clip,  # as in policy_fwd_kernel (HAS_DUAL only)
    kl_coef,  # weight of the KL term (traj-mean part of COL_DSW)
    RATIO: tl.constexpr,  # 0 token, 1 step, 2 trajectory
    AGG: tl.constexpr,  # 0 step-mean, 1 token-mean, 2 traj-mean
    HAS_WEIGHT: tl.constexpr,  # step_weight given
    HAS_DUAL: tl.constexpr,  # dual clip on
    NUM_COLS: tl.constexpr,  # table row length
    BLOCK_B: tl.constexpr,  # trajectories per program
    BLOCK_K: tl.constexpr,  # steps per trajectory per loop iteration
):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b < num_trajs
    first = tl.load(cu_trajs_ptr + b, mask=b_mask, other=0).to(tl.int64)
    count = tl.load(cu_trajs_ptr + b + 1, mask=b_mask, other=0).to(tl.int64) - first
    longest = tl.max(count, axis=0)

    # pass 1: counted steps, counted tokens, trajectory log-ratio sum
    acc_steps = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc_toks = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc_lr = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, longest, BLOCK_K):
        s, mask, n, _sw, valid = _traj_steps(first, count, k0, cu_ptr, sw_ptr, HAS_WEIGHT, BLOCK_K)
        acc_steps += tl.where(valid, 1.0, 0.0)
        acc_toks += tl.where(valid, n, 0.0)
        if RATIO == 2:
            acc_lr += tl.load(lr_sum_ptr + s, mask=mask, other=0.0)
    counted_toks = tl.maximum(tl.sum(acc_toks, axis=1), 1.0)
    tok_scale = (1.0 / counted_toks)[:, None]
    if RATIO == 0:
        unit_scale = tok_scale
    else:
        unit_scale = (1.0 / tl.maximum(tl.sum(acc_steps, axis=1), 1.0))[:, None]
    norm = length_pow(counted_toks, length_power)[:, None]  # trajectory ratios
    traj_l = tl.sum(acc_lr, axis=1)[:, None] / norm  # l_b

    # pass 2: traj-mean scaling, trajectory unit terms
    acc_dlr = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, longest, BLOCK_K):
        s, mask, n, sw, valid = _traj_steps(first, count, k0, cu_ptr, sw_ptr, HAS_WEIGHT, BLOCK_K)
        row = table_ptr + s * NUM_COLS
        if AGG == 2:
            _scale_column(row, COL_WK, tok_scale, mask)
            _scale_column(row, COL_TOKW, tok_scale, mask)
            _scale_column(row, COL_WAKL, tok_scale, mask)
            _scale_column(row, COL_TOK_W, tok_scale, mask)
            kl_dsw = (kl_coef * tok_scale) * tl.load(row + COL_KL, mask=mask, other=0.0)
            if RATIO != 2:
                _scale_column(row, COL_WL, unit_scale, mask)
                _scale_column(row, COL_W, unit_scale, mask)
                _scale_column(row, COL_WCLIP, unit_scale, mask)
                _scale_column(row, COL_WDUAL, unit_scale, mask)
                _scale_column(row, COL_WRHO, unit_scale, mask)
                _scale_column(row, COL_DADV, unit_scale, mask)
                _scale_column(row, COL_DLR, unit_scale, mask)
                _scale_column(row, COL_BASE_W, unit_scale, mask)
                dsw = tl.load(row + COL_DSW, mask=mask, other=0.0)
                tl.store(row + COL_DSW, dsw * unit_scale + kl_dsw, mask=mask)
        else:
            kl_dsw = tl.load(row + COL_DSW, mask=mask, other=0.0)  # the step kernel's KL part
        if RATIO == 2:
            if AGG == 0:
                unit_base = tl.where(mask, 1.0, 0.0)
            elif AGG == 1:
                unit_base = n
            else:
                unit_base = unit_scale + tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            adv = tl.load(adv_ptr + s, mask=mask, other=0.0).to(tl.float32)
            adv = tl.where(valid, adv, 0.0)
            log_ratio = traj_l + tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            tl.store(row + COL_BASE_W, unit_base, mask=mask)
            d_unit = store_unit_terms(
                row, log_ratio, adv, sw, unit_base, kl_dsw, mask, clip_low, clip_high, dual_clip,
                HAS_DUAL,
            )  # fmt: skip
            acc_dlr += tl.where(mask, d_unit, 0.0)

    # pass 3: the per-token coefficient of the trajectory ratio
    if RATIO == 2:
        coef = tl.sum(acc_dlr, axis=1)[:, None] / norm
        for k0 in range(0, longest, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = k[None, :] < count[:, None]
            row = table_ptr + (first[:, None] + k[None, :]) * NUM_COLS
            tl.store(
                row + COL_DLR, coef + tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32), mask=mask
            )
