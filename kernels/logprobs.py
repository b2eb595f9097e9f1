"""Triton kernels for exact fused linear log-probabilities (forward with online log-sum-exp,
backward logit gradient recomputed tile by tile).

With ``z_ij = (h_i . w_j + b_j) * inv_temp`` (rows i of hidden [M, H], vocab rows j of weight
[V, H])::

    lse_i  = log sum_j exp(z_ij),   logp_i = z_{i,t_i} - lse_i,
    H_i    = lse_i - sum_j p_ij z_ij,                      p_ij = exp(z_ij - lse_i)
    dz_ij  = g_i [j == t_i] - p_ij (g_i + e_i (z_ij - lse_i + H_i))

- ``_lse_fwd_kernel``: one program per ``BLOCK_M`` rows streams the vocabulary in
  ``BLOCK_V`` tiles; each logit tile is a ``tl.dot`` over ``BLOCK_H`` slices of H with an fp32
  accumulator; an online (running max, rescaled sum) log-sum-exp, the running ``sum p z`` for the
  entropy and the target logit are kept per row. Nothing of size [M, V] is ever written.
- ``_logit_grad_kernel``: grid (row tiles, vocab tiles) over one chunk of rows recomputes its
  logit tile and writes ``dz`` into the chunk's [rows, V] buffer; the launcher then forms
  ``d hidden = dz @ W * inv_temp`` and accumulates ``d W += dz^T @ h * inv_temp`` with GEMMs.

Precision: tiles are loaded and converted to fp32 right after the load (``DOT_FP32``; the
interpreter computes garbage on bf16 and fp32 ``tl.dot`` is IEEE fp32 here, so results are exact
fp32 math). On a GPU with bf16 inputs, ``DOT_FP32=False`` keeps the operands in bf16 for the
tensor cores with the same fp32 accumulation (exact products of bf16 values).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,  # hidden [M, H], weight [V, H], bias [V] (HAS_BIAS only)
    rows,
    cols,  # [BLOCK_M] row ids, [BLOCK_V] vocab ids
    num_rows,
    vocab,
    width,  # M, V, H
    stride_hm,
    stride_wv,  # row strides of hidden and weight (unit column stride)
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_V] tile of scaled logits z (out-of-range vocab columns: -inf)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    row_mask = rows < num_rows
    col_mask = cols < vocab
    for h0 in range(0, width, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        k_mask = k < width
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + k[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + k[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _lse_fwd_kernel(
    h_ptr,  # [M, H] hidden (fp32/bf16/fp16), unit column stride
    w_ptr,  # [V, H] weight, unit column stride
    b_ptr,  # [V] bias (HAS_BIAS only)
    t_ptr,  # [M] int targets in [0, V)
    logp_ptr,  # [M] fp32 out: log p of the target
    lse_ptr,  # [M] fp32 out: log-sum-exp of the scaled logits (saved for backward)
    ent_ptr,  # [M] fp32 out: entropy (WANT_ENTROPY only)
    num_rows,
    vocab,
    width,  # M, V, H
    stride_hm,  # row stride of hidden
    stride_wv,  # row stride of weight
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,  # bias given
    WANT_ENTROPY: tl.constexpr,  # compute the entropy
    DOT_FP32: tl.constexpr,  # convert tiles to fp32 before tl.dot (interpreter, fp32 inputs)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocab entries per tile
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    target = tl.load(t_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - run_max)
    run_pz = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - run_max) * z
    target_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            num_rows,
            vocab,
            width,
            stride_hm,
            stride_wv,
            inv_temp,
            HAS_BIAS,
            DOT_FP32,
            BLOCK_M,
            BLOCK_V,
            BLOCK_H,
        )
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if WANT_ENTROPY:
            pz = p * tl.where(cols[None, :] < vocab, z, 0.0)  # p = 0 on padded columns
            run_pz = run_pz * rescale + tl.sum(pz, axis=1)
        run_max = new_max
        target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(logp_ptr + rows, target_z - lse, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ent_ptr + rows, lse - run_pz / run_sum, mask=row_mask)


@triton.jit
def _logit_grad_kernel(
    h_ptr,  # [M, H] hidden of the chunk's rows (row 0 = chunk start)
    w_ptr,  # [V, H] weight
    b_ptr,  # [V] bias (HAS_BIAS only)
    t_ptr,  # [M] targets of the chunk's rows
    lse_ptr,  # [M] fp32 log-sum-exp from the forward
    ent_ptr,  # [M] fp32 entropy from the forward (HAS_ENT_GRAD only)
    g_ptr,  # [M] fp32 upstream gradient of logp
    e_ptr,  # [M] fp32 upstream gradient of the entropy (HAS_ENT_GRAD only)
    dz_ptr,  # [M, V] fp32 out: d loss / d z for the chunk (contiguous)
    num_rows,
    vocab,
    width,  # chunk rows, V, H
    stride_hm,  # row stride of hidden
    stride_wv,  # row stride of weight
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_ENT_GRAD: tl.constexpr,  # the entropy output receives a gradient
    DOT_FP32: tl.constexpr,  # as in _lse_fwd_kernel
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocab entries per program
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < num_rows
    col_mask = cols < vocab
    z = _logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        num_rows,
        vocab,
        width,
        stride_hm,
        stride_wv,
        inv_temp,
        HAS_BIAS,
        DOT_FP32,
        BLOCK_M,
        BLOCK_V,
        BLOCK_H,
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(t_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    log_p = tl.where(col_mask[None, :], z - lse[:, None], 0.0)  # finite on padded columns
    p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
    coef = g[:, None] + tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if HAS_ENT_GRAD:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        e = tl.load(e_ptr + rows, mask=row_mask, other=0.0)
        coef += e[:, None] * (log_p + ent[:, None])
    dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - p * coef
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(dz_ptr + rows[:, None] * vocab + cols[None, :], tl.where(mask, dz, 0.0), mask=mask)
