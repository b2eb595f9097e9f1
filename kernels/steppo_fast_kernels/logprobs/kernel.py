"""Triton kernels for exact fused linear log-probabilities (forward with online log-sum-exp,
backward logit gradient recomputed tile by tile, then two GEMMs).

With ``z_ij = (h_i . w_j + b_j) * inv_temp`` (rows i of hidden [M, H], vocab rows j of weight
[V, H])::

    lse_i  = log sum_j exp(z_ij),   logp_i = z_{i,t_i} - lse_i,
    H_i    = lse_i - sum_j p_ij z_ij = log S_i - Q_i / S_i,   p_ij = exp(z_ij - lse_i)
    dz_ij  = g_i [j == t_i] - p_ij (g_i + e_i (z_ij - lse_i + H_i))

- ``lse_fwd_kernel``: one program per ``BLOCK_M`` rows streams the vocabulary in
  ``BLOCK_V`` tiles; each logit tile is a ``tl.dot`` over ``BLOCK_H`` slices of H with an fp32
  accumulator; an online (running max m, rescaled sum S = sum exp(z - m)) log-sum-exp, the
  running Q = sum exp(z - m) (z - m) for the entropy (about the running max, so H = log S - Q / S
  has no cancellation of two ~|z| terms when logits are large) and the target logit are kept per
  row. Nothing of size [M, V] is ever written.
- ``logit_grad_kernel``: one program per ``BLOCK_V`` vocabulary entries walks the rows of one
  chunk ``BLOCK_M`` at a time, recomputes the logit tile, forms ``dz * inv_temp`` in fp32, writes
  it into the chunk's [rows, V] buffer **in the GEMM dtype** (rounded once, to nearest even) and
  adds the fp32 column sums of ``dz * inv_temp`` to d bias (exact fp32, deterministic: a program
  owns its columns).
- ``matmul_kernel``: ``C (+)= A @ B`` with an fp32 C and fp32 accumulation, operands in the GEMM
  dtype (bf16/fp16 on the tensor cores, fp32 as IEEE fp32). The launcher calls it twice per
  chunk: ``d hidden[chunk] = dz @ W`` and ``d W += dz^T @ h[chunk]`` (accumulated across chunks
  in the fp32 d W buffer, cast once at the end).

Precision: logits, log-sum-exp, entropy and dz are computed with fp32 accumulation for every
input dtype. For bf16/fp16 hidden and weight (same dtype) the GEMM dtype is that dtype: the
only approximation is one rounding of each ``dz_ij * inv_temp`` to it (relative error <= 2^-8
for bf16, 2^-11 for fp16, plus fp16's subnormal range below 6.1e-5); the GEMM products of
16-bit values are exact in fp32 and accumulate in fp32. fp32 (or mixed) inputs keep fp32 dz and
IEEE fp32 GEMMs: exact fp32 math. ``DOT_FP32`` converts tiles to fp32 right after the load (fp32
inputs, and always under the interpreter, which computes garbage on bf16 and whose fp32
``tl.dot`` is IEEE: products of bf16 values are exact there too, so the interpreter reproduces
the GPU arithmetic up to summation order). The bf16 rounding is done with integer ops
(``_round_bf16``) because the interpreter truncates fp32 -> bf16 conversions.
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
def lse_fwd_kernel(
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
    run_q = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - run_max) * (z - run_max)
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
        run_sum_old = run_sum
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if WANT_ENTROPY:
            # Q about the new max: rescale * (Q + (old max - new max) S) + this tile's terms
            shift = tl.where(run_sum_old > 0, run_max - new_max, 0.0) * run_sum_old  # no -inf*0
            zc = tl.where(cols[None, :] < vocab, z - new_max[:, None], 0.0)  # p = 0 on padding
            run_q = (run_q + shift) * rescale + tl.sum(p * zc, axis=1)
        run_max = new_max
        target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(logp_ptr + rows, target_z - lse, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ent_ptr + rows, tl.log(run_sum) - run_q / run_sum, mask=row_mask)


@triton.jit
def _round_bf16(x):
    """fp32 tile -> the nearest bf16 value (ties to even), still as fp32: exactly representable,
    so the later ``.to(tl.bfloat16)`` is exact on the GPU and under the interpreter (which
    truncates). Finite inputs only (dz is finite)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round the low 16 bits away
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def logit_grad_kernel(
    h_ptr,  # [M, H] hidden of the chunk's rows (row 0 = chunk start)
    w_ptr,  # [V, H] weight
    b_ptr,  # [V] bias (HAS_BIAS only)
    t_ptr,  # [M] targets of the chunk's rows
    lse_ptr,  # [M] fp32 log-sum-exp from the forward
    ent_ptr,  # [M] fp32 entropy from the forward (HAS_ENT_GRAD only)
    g_ptr,  # [M] fp32 upstream gradient of logp
    e_ptr,  # [M] fp32 upstream gradient of the entropy (HAS_ENT_GRAD only)
    dz_ptr,  # [M, V] out: dz * inv_temp for the chunk (contiguous), in the GEMM dtype
    db_ptr,  # [V] fp32 in/out: d bias, += the chunk's column sums (NEED_DB only)
    num_rows,
    vocab,
    width,  # chunk rows, V, H
    stride_hm,  # row stride of hidden
    stride_wv,  # row stride of weight
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_ENT_GRAD: tl.constexpr,  # the entropy output receives a gradient
    NEED_DB: tl.constexpr,  # accumulate d bias
    ROUND_BF16: tl.constexpr,  # dz buffer is bf16: round to nearest even before the store
    DOT_FP32: tl.constexpr,  # as in lse_fwd_kernel
    BLOCK_M: tl.constexpr,  # rows per inner step
    BLOCK_V: tl.constexpr,  # vocab entries per program
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab
    col_sum = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum over rows of dz * inv_temp
    for m0 in range(0, num_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < num_rows
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
        dz = tl.where(mask, dz * inv_temp, 0.0)
        if NEED_DB:
            col_sum += tl.sum(dz, axis=0)
        if ROUND_BF16:
            dz = _round_bf16(dz)
        dz_at = dz_ptr + rows[:, None] * vocab + cols[None, :]
        tl.store(dz_at, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        db = tl.load(db_ptr + cols, mask=col_mask, other=0.0)
        tl.store(db_ptr + cols, db + col_sum, mask=col_mask)


@triton.jit
def matmul_kernel(
    a_ptr,  # [P, K] left operand (GEMM dtype), any strides
    b_ptr,  # [K, Q] right operand (GEMM dtype), any strides
    c_ptr,  # [P, Q] fp32 out (ACCUMULATE: in/out), any strides
    size_p,
    size_q,
    size_k,  # P, Q, K
    stride_ap,
    stride_ak,  # strides of A
    stride_bk,
    stride_bq,  # strides of B
    stride_cp,
    stride_cq,  # strides of C
    ACCUMULATE: tl.constexpr,  # C += A @ B (else C = A @ B)
    DOT_FP32: tl.constexpr,  # as in lse_fwd_kernel
    BLOCK_P: tl.constexpr,  # output rows per program
    BLOCK_Q: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction slice per tl.dot
    GROUP_P: tl.constexpr,  # output row tiles per launch group (L2 reuse of A)
):
    """One [BLOCK_P, BLOCK_Q] tile of C per program (1-D grid), fp32 accumulator over K.

    Programs are ordered in groups of GROUP_P row tiles x all column tiles, so programs running
    together share A's row tiles (and B's column tiles) through L2: A is read from memory about
    once instead of once per column tile (for d W = dz^T @ h that is the whole dz buffer,
    otherwise re-read H / BLOCK_Q times)."""
    num_p = tl.cdiv(size_p, BLOCK_P)
    num_q = tl.cdiv(size_q, BLOCK_Q)
    pid = tl.program_id(0)
    group_size = GROUP_P * num_q
    first_p = (pid // group_size) * GROUP_P
    group_rows = tl.minimum(num_p - first_p, GROUP_P)
    tile_p = first_p + (pid % group_size) % group_rows
    tile_q = (pid % group_size) // group_rows
    p = tile_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tile_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = p < size_p
    q_mask = q < size_q
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for k0 in range(0, size_k, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < size_k
        a = tl.load(
            a_ptr + p[:, None] * stride_ap + k[None, :] * stride_ak,
            mask=p_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + k[:, None] * stride_bk + q[None, :] * stride_bq,
            mask=k_mask[:, None] & q_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    c_at = c_ptr + p[:, None] * stride_cp + q[None, :] * stride_cq
    mask = p_mask[:, None] & q_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_at, mask=mask, other=0.0)
    tl.store(c_at, acc, mask=mask)
