"""Triton kernels (``@triton.jit`` only) of the fused step policy loss (forward and backward)
over CSR ``cu_steps``.

Forward, ``policy_fwd_kernel``: one program per block of ``BLOCK_S`` steps walks a
``[BLOCK_S, BLOCK_T]`` tile along its steps' action-token spans (no ``[S, max_len]``
padding in memory: masked lanes are never loaded), and for each step writes one row of the
per-step table ``table`` [S, NUM_COLS] (fp32): its weighted loss, KL and stats sums, and the
coefficients the backward needs. Per token it reads logp, old_logp (and ref_logp with KL).
``kernel_finish.policy_finish_kernel`` then reduces the table to the loss and the stats.

- ratio "token": every token is a unit (PPO); its loss, clip flags and d L / d A are summed
  over the step with the step's uniform per-token weight.
- ratio "step": l_s = sum_i x_i / n_s ** p from the tile sums, then the unit terms.
- ratio "trajectory": the step kernel only writes the log-ratio sums (and the KL part of the
  step-weight derivative); ``kernel_traj.policy_traj_kernel`` (one program per block of
  trajectories) reduces them per trajectory and writes the unit columns of every step.

Weights: every unit weight is w_u = b_u * sw_s, the base b_u fixed by ``agg`` (1, n_s, 1/n_s
or 1/c_b; c_b counts the units of steps with sw > 0, so it does not vary with the values of
sw) times the step weight. Hence d w_u / d sw_s = b_u, and the table keeps per step
``COL_DSW`` = sum_u b_u L_u + kl_coef sum_t b'_t KL_t and ``COL_BASE_W`` = sum_u b_u, from
which the backward forms d loss / d sw_s = (DSW_s - [D = sum_u w_u] loss BASE_W_s) / D.
For traj-mean the step kernel writes the columns with the bases before the 1/c_b factor (1
per unit) and leaves the KL part out of ``COL_DSW``; ``policy_traj_kernel`` counts c_b and
scales the columns (``COL_KL`` keeps the raw KL sum for that).

Backward, ``policy_bwd_kernel``: the same tiling writes d logp (and d old_logp, d ref_logp
when asked) for every action token in one pass: ``d x_i = DLR_s`` (a per-step coefficient from
the forward) for step/trajectory ratios, recomputed per token for token ratios, plus the KL
term's per-token derivative; and per step d advantages and d step_weight. Everything is scaled
by ``d loss / D``, read from device memory (no host sync).

Masking: a step with ``step_weight == 0`` is invalid: its tokens and advantage are replaced by 0
with ``tl.where`` before any arithmetic (NaN/inf garbage there gives zero loss and gradient).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Per-step table columns (fp32 [S, NUM_COLS]).
COL_WL = tl.constexpr(0)  # sum over the step's units of w_u * L_u
COL_WK = tl.constexpr(1)  # sum over the step's tokens of w'_t * KL_t
COL_W = tl.constexpr(2)  # sum over the step's units of w_u
COL_WCLIP = tl.constexpr(3)  # sum of w_u over units on the clipped branch
COL_WDUAL = tl.constexpr(4)  # sum of w_u over units on the dual-clip branch
COL_WRHO = tl.constexpr(5)  # sum of w_u * rho_u
COL_RHO_MIN = tl.constexpr(6)  # min rho over the step's counted units (+inf if none)
COL_RHO_MAX = tl.constexpr(7)  # max rho over the step's counted units (-inf if none)
COL_TOKW = tl.constexpr(8)  # sum of w'_t over the step's tokens
COL_WAKL = tl.constexpr(9)  # sum of w'_t * (old_logp_t - logp_t)
COL_DLR = tl.constexpr(10)  # d(sum_u w_u L_u) / d x_i per token of the step (step/traj ratios)
COL_DADV = tl.constexpr(11)  # d(sum_u w_u L_u) / d A_s
COL_TOK_W = tl.constexpr(12)  # per-token weight w'_t of the step (token units, KL term)
COL_DSW = tl.constexpr(13)  # d(sum_u w_u L_u + kl_coef sum_t w'_t KL_t) / d sw_s
COL_BASE_W = tl.constexpr(14)  # d(sum_u w_u) / d sw_s = sum of the step's unit bases b_u
COL_KL = tl.constexpr(15)  # sum over the step's tokens of KL_t (unweighted; traj-mean scaling)
NUM_COLS = 16
# Columns the finishing kernel reduces: sums, except RHO_MIN (min) and RHO_MAX (max).
FINISH_COLS = tl.constexpr(10)

RATIO_TOKEN, RATIO_STEP, RATIO_TRAJ = 0, 1, 2
AGG_STEP, AGG_TOKEN, AGG_TRAJ = 0, 1, 2
KL_NONE, KL_K1, KL_K2, KL_K3 = 0, 1, 2, 3
# Globals read inside kernels must be tl.constexpr (Triton's code generator rejects others).
LOG_RATIO_CLAMP = tl.constexpr(20.0)
K3_CLAMP = tl.constexpr(10.0)


@triton.jit
def _unit_terms(log_ratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    """PPO unit terms for log-ratios ``l`` and advantages ``adv`` (same shapes).

    Returns (L, dL/dl, dL/dA, clipped, dual, rho) with rho = exp(clamp(l, -20, 20)),
    L = -min(rho A, clip(rho) A), dual-clipped to -dual_clip A for A < 0 (when HAS_DUAL)."""
    in_range = (log_ratio >= -LOG_RATIO_CLAMP) & (log_ratio <= LOG_RATIO_CLAMP)
    rho = tl.exp(tl.minimum(tl.maximum(log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP))
    low = 1.0 - clip_low
    high = 1.0 + clip_high
    clipped = ((adv > 0) & (rho > high)) | ((adv < 0) & (rho < low))
    rho_c = tl.minimum(tl.maximum(rho, low), high)
    loss = tl.where(clipped, -rho_c * adv, -rho * adv)
    d_adv = tl.where(clipped, -rho_c, -rho)
    d_l = tl.where(clipped | ~in_range, 0.0, -adv * rho)
    if HAS_DUAL:
        dual = (adv < 0) & (rho > dual_clip)
        loss = tl.where(dual, -dual_clip * adv, loss)
        d_adv = tl.where(dual, -dual_clip, d_adv)
        d_l = tl.where(dual, 0.0, d_l)
    else:
        dual = clipped & (adv != adv)  # all False, same shape
    return loss, d_l, d_adv, clipped, dual, rho


@triton.jit
def _kl_terms(lp, rl, KL_TYPE: tl.constexpr):
    """Per-token KL estimate and its derivative w.r.t. logp (d/d ref_logp is its negative)."""
    if KL_TYPE == 1:
        k = lp - rl
        dk = tl.full(lp.shape, 1.0, tl.float32)
    elif KL_TYPE == 2:
        diff = lp - rl
        k = 0.5 * diff * diff
        dk = diff
    else:
        d_raw = rl - lp
        d = tl.minimum(tl.maximum(d_raw, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
        e = tl.exp(d)
        k_raw = e - d - 1.0
        k = tl.minimum(tl.maximum(k_raw, -K3_CLAMP), K3_CLAMP)
        passes = (d_raw >= -LOG_RATIO_CLAMP) & (d_raw <= LOG_RATIO_CLAMP) & (k_raw <= K3_CLAMP)
        dk = tl.where(passes & (k_raw >= -K3_CLAMP), 1.0 - e, 0.0)
    return k, dk


@triton.jit
def length_pow(n, length_power):
    """n ** length_power for n >= 1 (exact division by n for power 1)."""
    return tl.where(length_power == 1.0, n, tl.exp(length_power * tl.log(n)))


@triton.jit
def _step_block(cu_ptr, sw_ptr, num_steps, HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's ``BLOCK_S`` steps: (index s, s < S, first token, token count, step weight
    (0 on invalid steps), valid = in range and weight > 0); the weight is 1 without HAS_WEIGHT."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < num_steps
    start = tl.load(cu_ptr + s, mask=s_mask, other=0).to(tl.int64)
    n_int = tl.load(cu_ptr + s + 1, mask=s_mask, other=0).to(tl.int64) - start
    if HAS_WEIGHT:
        sw = tl.load(sw_ptr + s, mask=s_mask, other=0.0).to(tl.float32)
    else:
        sw = tl.where(s_mask, 1.0, 0.0)
    valid = s_mask & (sw > 0)
    return s, s_mask, start, n_int, tl.where(valid, sw, 0.0), valid


@triton.jit
def policy_fwd_kernel(
    logp_ptr,  # [A] current log-probs (fp32/bf16/fp16)
    old_ptr,  # [A] rollout log-probs
    ref_ptr,  # [A] reference log-probs (read only when KL_TYPE != 0)
    adv_ptr,  # [S] advantages
    sw_ptr,  # [S] step weights (read only when HAS_WEIGHT; else 1)
    cu_ptr,  # [S+1] cu_steps offsets
    table_ptr,  # [S, NUM_COLS] fp32 out: per-step table (see COL_*)
    lr_sum_ptr,  # [S] fp32 out: sum of the step's (masked) log-ratios
    num_steps,  # S
    length_power,  # p in l_s = sum x / n_s ** p
    clip_low,  # rho clipped below at 1 - clip_low
    clip_high,  # rho clipped above at 1 + clip_high
    dual_clip,  # dual-clip constant (HAS_DUAL only)
    kl_coef,  # weight of the KL term (enters COL_DSW only)
    RATIO: tl.constexpr,  # 0 token, 1 step, 2 trajectory
    AGG: tl.constexpr,  # 0 step-mean, 1 token-mean, 2 traj-mean
    KL_TYPE: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3
    HAS_WEIGHT: tl.constexpr,  # step_weight given
    HAS_DUAL: tl.constexpr,  # dual clip on
    NUM_COLS: tl.constexpr,  # table row length
    BLOCK_S: tl.constexpr,  # steps per program
    BLOCK_T: tl.constexpr,  # tokens per step per loop iteration
):
    s, s_mask, start, n_int, sw, valid = _step_block(cu_ptr, sw_ptr, num_steps, HAS_WEIGHT, BLOCK_S)
    n = tl.maximum(n_int, 1).to(tl.float32)
    adv = tl.where(valid, tl.load(adv_ptr + s, mask=s_mask, other=0.0).to(tl.float32), 0.0)
    # unit bases b (w = b * sw); also defined on zero-weight steps: d w / d sw = b there too
    if AGG == 0:
        tok_base = 1.0 / n
        unit_base = tl.full([BLOCK_S], 1.0, tl.float32)
    elif AGG == 1:
        tok_base = tl.full([BLOCK_S], 1.0, tl.float32)
        unit_base = n
    else:  # traj-mean: the bases before the 1/c_b factor (applied by policy_traj_kernel)
        tok_base = tl.full([BLOCK_S], 1.0, tl.float32)
        unit_base = tl.full([BLOCK_S], 1.0, tl.float32)
    tok_w = sw * tok_base

    acc_lr = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_loss = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_dadv = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    acc_rho = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    rho_min = tl.full([BLOCK_S, BLOCK_T], float("inf"), tl.float32)
    rho_max = tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32)
    longest = tl.max(tl.where(valid, n_int, 0), axis=0)
    for t0 in range(0, longest, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        m = (pos[None, :] < n_int[:, None]) & valid[:, None]
        idx = start[:, None] + pos[None, :]
        lp = tl.load(logp_ptr + idx, mask=m, other=0.0).to(tl.float32)
        ol = tl.load(old_ptr + idx, mask=m, other=0.0).to(tl.float32)
        lr = tl.where(m, lp - ol, 0.0)
        acc_lr += lr
        if RATIO == 0:
            loss, d_l, d_a, clipped, dual, rho = _unit_terms(
                lr, adv[:, None], clip_low, clip_high, dual_clip, HAS_DUAL
            )
            acc_loss += tl.where(m, loss, 0.0)
            acc_dadv += tl.where(m, d_a, 0.0)
            acc_clip += tl.where(m & clipped, 1.0, 0.0)
            acc_dual += tl.where(m & dual, 1.0, 0.0)
            acc_rho += tl.where(m, rho, 0.0)
            rho_min = tl.minimum(rho_min, tl.where(m, rho, float("inf")))
            rho_max = tl.maximum(rho_max, tl.where(m, rho, float("-inf")))
        if KL_TYPE != 0:
            rl = tl.load(ref_ptr + idx, mask=m, other=0.0).to(tl.float32)
            k, _ = _kl_terms(tl.where(m, lp, 0.0), tl.where(m, rl, 0.0), KL_TYPE)
            acc_kl += tl.where(m, k, 0.0)

    lr_sum = tl.sum(acc_lr, axis=1)
    kl_sum = tl.sum(acc_kl, axis=1)
    row = table_ptr + s * NUM_COLS
    tl.store(lr_sum_ptr + s, lr_sum, mask=s_mask)
    tl.store(row + COL_WK, tok_w * kl_sum, mask=s_mask)
    tl.store(row + COL_TOKW, tok_w * n, mask=s_mask)
    tl.store(row + COL_WAKL, -tok_w * lr_sum, mask=s_mask)
    tl.store(row + COL_TOK_W, tok_w, mask=s_mask)
    tl.store(row + COL_KL, kl_sum, mask=s_mask)
    if AGG == 2:  # the KL term's part of COL_DSW needs 1/c_b: policy_traj_kernel adds it
        kl_dsw = tl.zeros([BLOCK_S], dtype=tl.float32)
    else:
        kl_dsw = kl_coef * tok_base * kl_sum  # the KL term's part of COL_DSW
    if RATIO == 0:
        loss_sum = tl.sum(acc_loss, axis=1)
        tl.store(row + COL_WL, tok_w * loss_sum, mask=s_mask)
        tl.store(row + COL_W, tok_w * n, mask=s_mask)
        tl.store(row + COL_WCLIP, tok_w * tl.sum(acc_clip, axis=1), mask=s_mask)
        tl.store(row + COL_WDUAL, tok_w * tl.sum(acc_dual, axis=1), mask=s_mask)
        tl.store(row + COL_WRHO, tok_w * tl.sum(acc_rho, axis=1), mask=s_mask)
        tl.store(row + COL_RHO_MIN, tl.min(rho_min, axis=1), mask=s_mask)
        tl.store(row + COL_RHO_MAX, tl.max(rho_max, axis=1), mask=s_mask)
        tl.store(row + COL_DADV, tok_w * tl.sum(acc_dadv, axis=1), mask=s_mask)
        tl.store(row + COL_DLR, tl.zeros([BLOCK_S], dtype=tl.float32), mask=s_mask)
        tl.store(row + COL_DSW, tok_base * loss_sum + kl_dsw, mask=s_mask)
        tl.store(row + COL_BASE_W, tok_base * n, mask=s_mask)
    else:
        tl.store(row + COL_BASE_W, unit_base, mask=s_mask)
        if RATIO == 1:
            norm = length_pow(n, length_power)
            d_unit = store_unit_terms(
                row, lr_sum / norm, adv, sw, unit_base, kl_dsw, s_mask, clip_low, clip_high,
                dual_clip, HAS_DUAL,
            )  # fmt: skip
            tl.store(row + COL_DLR, d_unit / norm, mask=s_mask)
        else:  # policy_traj_kernel writes the unit columns
            tl.store(row + COL_DSW, kl_dsw, mask=s_mask)


@triton.jit
def store_unit_terms(
    row,  # [BLOCK] (any shape) pointers to the steps' table rows
    log_ratio,  # [BLOCK] unit log-ratios
    adv,  # [BLOCK] advantages (0 on invalid steps)
    sw,  # [BLOCK] step weights (0 on invalid steps)
    unit_base,  # [BLOCK] unit bases b_s (unit weight w_s = b_s * sw_s)
    kl_dsw,  # [BLOCK] the KL term's part of COL_DSW
    mask,  # [BLOCK] the step exists (store mask)
    clip_low,
    clip_high,
    dual_clip,
    HAS_DUAL: tl.constexpr,  # as in _unit_terms
):
    """Write the unit columns (all but COL_DLR) of steps that are units (step/trajectory
    ratios); COL_DSW gets b_s * L_s + kl_dsw. Returns w_s * dL/dl (COL_DLR before the
    d l / d x_i factor, which the caller applies)."""
    loss, d_l, d_a, clipped, dual, rho = _unit_terms(
        log_ratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL
    )
    unit_w = sw * unit_base
    tl.store(row + COL_WL, unit_w * loss, mask=mask)
    tl.store(row + COL_W, unit_w, mask=mask)
    tl.store(row + COL_WCLIP, tl.where(clipped, unit_w, 0.0), mask=mask)
    tl.store(row + COL_WDUAL, tl.where(dual, unit_w, 0.0), mask=mask)
    tl.store(row + COL_WRHO, unit_w * rho, mask=mask)
    counted = unit_w > 0  # sw is 0 on invalid steps
    tl.store(row + COL_RHO_MIN, tl.where(counted, rho, float("inf")), mask=mask)
    tl.store(row + COL_RHO_MAX, tl.where(counted, rho, float("-inf")), mask=mask)
    tl.store(row + COL_DADV, unit_w * d_a, mask=mask)
    tl.store(row + COL_DSW, unit_base * loss + kl_dsw, mask=mask)
    return unit_w * d_l


@triton.jit
def policy_bwd_kernel(
    logp_ptr,  # [A] current log-probs
    old_ptr,  # [A] rollout log-probs
    ref_ptr,  # [A] reference log-probs (KL_TYPE != 0 only)
    adv_ptr,  # [S] advantages (token ratios only)
    sw_ptr,  # [S] step weights (HAS_WEIGHT only)
    cu_ptr,  # [S+1] cu_steps offsets
    table_ptr,  # [S, NUM_COLS] fp32 per-step table from the forward
    grad_ptr,  # [1] upstream gradient d out / d loss (any float dtype)
    loss_ptr,  # [1] fp32 forward loss (NEED_SW and SW_IN_DENOM only)
    denom_ptr,  # [1] fp32 forward denominator D (normalizer or sum_u w_u, 1 if that is 0)
    d_logp_ptr,  # [A] fp32 out: d loss / d logp
    d_old_ptr,  # [A] fp32 out: d loss / d old_logp (NEED_OLD only)
    d_ref_ptr,  # [A] fp32 out: d loss / d ref_logp (NEED_REF only)
    d_adv_ptr,  # [S] fp32 out: d loss / d advantages
    d_sw_ptr,  # [S] fp32 out: d loss / d step_weight (NEED_SW only)
    num_steps,  # S
    clip_low,  # as in the forward
    clip_high,  # as in the forward
    dual_clip,  # as in the forward
    kl_coef,  # weight of the KL term
    RATIO: tl.constexpr,  # 0 token, 1 step, 2 trajectory
    KL_TYPE: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3
    HAS_WEIGHT: tl.constexpr,  # step_weight given
    HAS_DUAL: tl.constexpr,  # dual clip on
    NEED_OLD: tl.constexpr,  # write d old_logp
    NEED_REF: tl.constexpr,  # write d ref_logp
    NEED_SW: tl.constexpr,  # write d step_weight
    SW_IN_DENOM: tl.constexpr,  # D = sum_u w_u (no normalizer): D varies with step_weight
    NUM_COLS: tl.constexpr,  # table row length
    BLOCK_S: tl.constexpr,  # steps per program
    BLOCK_T: tl.constexpr,  # tokens per step per loop iteration
):
    s, s_mask, start, n_int, _weight, valid = _step_block(
        cu_ptr, sw_ptr, num_steps, HAS_WEIGHT, BLOCK_S
    )
    scale = tl.load(grad_ptr).to(tl.float32) / tl.load(denom_ptr)  # d out / d numerator
    row = table_ptr + s * NUM_COLS
    tl.store(d_adv_ptr + s, scale * tl.load(row + COL_DADV, mask=s_mask, other=0.0), mask=s_mask)
    if NEED_SW:
        # d loss / d sw_s = (DSW_s - loss * d D / d sw_s) / D, d D / d sw_s = BASE_W_s
        d_sw = tl.load(row + COL_DSW, mask=s_mask, other=0.0)
        if SW_IN_DENOM:
            d_sw -= tl.load(loss_ptr) * tl.load(row + COL_BASE_W, mask=s_mask, other=0.0)
        tl.store(d_sw_ptr + s, scale * d_sw, mask=s_mask)
    tok_w = tl.load(row + COL_TOK_W, mask=s_mask, other=0.0)
    d_lr_step = tl.load(row + COL_DLR, mask=s_mask, other=0.0)
    adv = tl.where(valid, tl.load(adv_ptr + s, mask=s_mask, other=0.0).to(tl.float32), 0.0)
    longest = tl.max(n_int, axis=0)
    for t0 in range(0, longest, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        in_step = (pos[None, :] < n_int[:, None]) & s_mask[:, None]
        m = in_step & valid[:, None]
        idx = start[:, None] + pos[None, :]
        if RATIO == 0 or KL_TYPE != 0:
            lp = tl.where(m, tl.load(logp_ptr + idx, mask=m, other=0.0).to(tl.float32), 0.0)
        if RATIO == 0:
            ol = tl.where(m, tl.load(old_ptr + idx, mask=m, other=0.0).to(tl.float32), 0.0)
            _, d_l, _, _, _, _ = _unit_terms(
                lp - ol, adv[:, None], clip_low, clip_high, dual_clip, HAS_DUAL
            )
            d_ratio = tok_w[:, None] * d_l
        else:
            d_ratio = d_lr_step[:, None] + tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
        d_ratio = tl.where(m, d_ratio * scale, 0.0)
        if KL_TYPE != 0:
            rl = tl.where(m, tl.load(ref_ptr + idx, mask=m, other=0.0).to(tl.float32), 0.0)
            _, dk = _kl_terms(lp, rl, KL_TYPE)
            d_kl = tl.where(m, (kl_coef * scale) * tok_w[:, None] * dk, 0.0)
        else:
            d_kl = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
        tl.store(d_logp_ptr + idx, d_ratio + d_kl, mask=in_step)
        if NEED_OLD:
            tl.store(d_old_ptr + idx, -d_ratio, mask=in_step)
        if NEED_REF:
            tl.store(d_ref_ptr + idx, -d_kl, mask=in_step)
