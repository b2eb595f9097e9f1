"""Exact fused linear log-probabilities: the spec of ``linear_logprobs`` and its CPU-fast path.

For rows i (e.g. the hidden states that predict action tokens) and vocabulary entries j::

    z_ij    = (hidden_i . weight_j + bias_j) / T                 scaled logits
    lse_i   = log sum_j exp(z_ij)
    logp_i  = z_{i, t_i} - lse_i                                 t_i = targets[i]
    H_i     = lse_i - sum_j p_ij z_ij = -sum_j p_ij log p_ij     p_ij = exp(z_ij - lse_i)

Gradients w.r.t. the logits, for upstream gradients g_i (of logp) and e_i (of H)::

    d logp_i / d z_ij = [j == t_i] - p_ij
    d H_i / d z_ij    = -p_ij (z_ij - sum_k p_ik z_ik) = -p_ij (log p_ij + H_i)
    dz_ij = g_i [j == t_i] - p_ij (g_i + e_i (log p_ij + H_i))
    d hidden = dz @ weight / T,  d weight = dz^T @ hidden / T,  d bias = dz^T 1 / T

The [M, V] logits are never materialised: rows are processed in chunks of ``rows`` (chosen from
the shapes by :func:`default_chunk_rows`), each chunk's logits living in one reused
[rows, V] buffer. Forward keeps only the inputs (and the entropy, when asked); backward
recomputes each chunk's logits with the same GEMM, turns the buffer into the logit gradient in
place (in-place softmax, one scatter for the one-hot), writes that chunk's d hidden and
accumulates d weight / d bias in place into one preallocated buffer (``addmm_``, beta = 1).
Per-row scalings (``-g_i / T``) are applied to the small [rows, H] operands, not to the
[rows, V] buffer. GEMMs are torch's (multi-threaded MKL/oneDNN on CPU, cuBLAS on GPU).

Dtypes: fp32/bf16/fp16 inputs are computed in fp32 (bf16/fp16 weights are upcast once per call,
so logits equal the fp32 logits of the same bf16 values up to summation order) and logp /
entropy are returned in fp32; fp64 is computed and returned in fp64. Gradients are returned in
each input's dtype (accumulated in fp32 first). Extra memory: one [rows, V] buffer of the compute
dtype (plus, for bf16/fp16 weights, an fp32 copy of the weight and an fp32 d weight accumulator).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._validate import compute_dtype

# Byte budget of the [rows, V] logits buffer when ``chunk_size`` is None. Measured on a 2-core
# AVX-512 CPU at V = 151936, H = 512..2048 (bench/NOTES_logprobs.md): fwd+bwd time is flat
# within noise from 128 rows up and every GEMM stays efficient, so the smallest budget that
# gives >= 128 rows wins.
WORKSPACE_BUDGET_BYTES = 96 << 20
# Row granularity of a chunk (GEMM-friendly multiple) and the smallest default chunk.
CHUNK_ROW_MULTIPLE = 64
# Byte budget of the small [rows, V] temporary used row-block-wise by the entropy path.
ENTROPY_BLOCK_BYTES = 8 << 20


def default_chunk_rows(num_rows: int, vocab: int, itemsize: int = 4) -> int:
    """Rows per chunk: as many as fit ``WORKSPACE_BUDGET_BYTES`` in a [rows, vocab] buffer of
    ``itemsize`` bytes, rounded down to a multiple of 64 when that many fit (GEMM-friendly),
    at least 1, and never more than ``num_rows``."""
    rows = WORKSPACE_BUDGET_BYTES // max(1, vocab * itemsize)
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, num_rows))


def _chunk_logits(out, hidden_chunk, weight_t, bias, inv_temp: float) -> None:
    """``out[n, V] <- (hidden_chunk @ weight_t + bias) * inv_temp`` in one GEMM, in place.

    out: [n, V] buffer (compute dtype, contents ignored); hidden_chunk: [n, H] compute dtype;
    weight_t: [H, V] (a transposed view of the [V, H] weight); bias: [V] or None.
    """
    if bias is None:
        out.addmm_(hidden_chunk, weight_t, beta=0.0, alpha=inv_temp)
    else:
        torch.addmm(bias, hidden_chunk, weight_t, beta=inv_temp, alpha=inv_temp, out=out)


def _log_softmax_rows_(z) -> None:
    """``z <- log_softmax(z, dim=1)`` in place (the fused row kernel: max, sum-exp, write)."""
    torch.ops.aten._log_softmax.out(z, 1, False, out=z)


def _softmax_rows_(z) -> None:
    """``z <- softmax(z, dim=1)`` in place (the fused row kernel)."""
    torch.ops.aten._softmax.out(z, 1, False, out=z)


def _sum_p_logp_rows(log_p, out, scratch) -> None:
    """``out[i] = sum_j p_ij log p_ij`` (= -entropy) from log-probabilities ``log_p`` [n, V],
    row block by row block through ``scratch`` [b, V] (``log_p`` is not modified)."""
    block = scratch.shape[0]
    for r0 in range(0, log_p.shape[0], block):
        r1 = min(r0 + block, log_p.shape[0])
        p = torch.exp(log_p[r0:r1], out=scratch[: r1 - r0])
        out[r0:r1] = p.mul_(log_p[r0:r1]).sum(1)


def _entropy_logit_grad_(log_p, entropy, g_logp, g_ent, scratch) -> None:
    """``log_p <- -p * (g + e * (log p + H))`` in place (the logit gradient without its one-hot
    part), row block by row block through ``scratch`` [b, V].

    log_p: [n, V] log-probabilities; entropy, g_logp, g_ent: [n] (H_i, g_i, e_i).
    """
    neg_offset = (g_logp + g_ent * entropy).neg_().unsqueeze(1)  # -(g + e H), [n, 1]
    neg_e = g_ent.neg().unsqueeze(1)  # -e, [n, 1]
    block = scratch.shape[0]
    for r0 in range(0, log_p.shape[0], block):
        r1 = min(r0 + block, log_p.shape[0])
        y = log_p[r0:r1]
        p = torch.exp(y, out=scratch[: r1 - r0])
        torch.addcmul(neg_offset[r0:r1], y, neg_e[r0:r1], out=y)  # y <- -(g + e H) - e y
        y.mul_(p)


def _forward(hidden, weight, bias, targets, inv_temp: float, want_entropy: bool, rows: int):
    """logp [M] (and entropy [M] or None), compute dtype. Inputs already validated."""
    dtype = compute_dtype(hidden, weight, bias)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(num_rows, dtype=dtype, device=hidden.device)
    entropy = torch.empty_like(logp) if want_entropy else None
    if num_rows == 0:
        return logp, entropy
    weight_t = weight.to(dtype).t()  # no copy for an fp32/fp64 weight
    bias = None if bias is None else bias.to(dtype)
    targets = targets.long().unsqueeze(1)
    buffer = torch.empty(min(rows, num_rows), vocab, dtype=dtype, device=hidden.device)
    scratch = _entropy_scratch(buffer) if want_entropy else None
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        z = buffer[: r1 - r0]
        _chunk_logits(z, hidden[r0:r1].to(dtype), weight_t, bias, inv_temp)
        _log_softmax_rows_(z)  # z <- log p
        logp[r0:r1] = z.gather(1, targets[r0:r1]).squeeze(1)
        if want_entropy:
            _sum_p_logp_rows(z, entropy[r0:r1], scratch)
            entropy[r0:r1].neg_()
    return logp, entropy


def _entropy_scratch(buffer):
    vocab = buffer.shape[1]
    block = max(1, ENTROPY_BLOCK_BYTES // max(1, vocab * buffer.element_size()))
    return torch.empty(min(block, buffer.shape[0]), vocab, dtype=buffer.dtype, device=buffer.device)


def _backward(saved, entropy, g_logp, g_ent, inv_temp, rows, need):
    """(d hidden, d weight, d bias) for upstream g_logp [M] / g_ent [M] (either may be None).

    ``need`` = (hidden, weight, bias) flags; a gradient not needed is returned as None.
    """
    hidden, weight, bias, targets = saved
    dtype = compute_dtype(hidden, weight, bias)
    num_rows, vocab, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
    device = hidden.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.empty(vocab, width, dtype=dtype, device=device) if need_w else None
    grad_b = torch.empty(vocab, dtype=dtype, device=device) if need_b else None
    if num_rows == 0 or not (need_h or need_w or need_b):
        return _finish(grad_h, grad_w, grad_b, hidden, weight, bias, empty=True)

    weight_c = weight.to(dtype)  # [V, H]; no copy for an fp32/fp64 weight
    bias_c = None if bias is None else bias.to(dtype)
    targets = targets.long().unsqueeze(1)
    use_entropy = g_ent is not None
    if use_entropy:
        g_ent = g_ent.to(dtype)
        g_logp = torch.zeros_like(g_ent) if g_logp is None else g_logp.to(dtype)
    else:
        g_logp = g_logp.to(dtype)
    buffer = torch.empty(min(rows, num_rows), vocab, dtype=dtype, device=device)
    scratch = _entropy_scratch(buffer) if use_entropy else None
    grad_h_scratch = None
    if need_h and hidden.dtype != dtype:
        grad_h_scratch = torch.empty(buffer.shape[0], width, dtype=dtype, device=device)

    first = True
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        n = r1 - r0
        z = buffer[:n]
        hidden_c = hidden[r0:r1].to(dtype)
        _chunk_logits(z, hidden_c, weight_c.t(), bias_c, inv_temp)
        # Build D and a row scale s with dz = s[:, None] * D, so that the scale touches only
        # [n, H]-sized operands: logp only: D = p - onehot, s = -g; with entropy: D = dz, s = 1.
        if use_entropy:
            _log_softmax_rows_(z)  # z <- log p
            _entropy_logit_grad_(z, entropy[r0:r1], g_logp[r0:r1], g_ent[r0:r1], scratch)
            z.scatter_add_(1, targets[r0:r1], g_logp[r0:r1].unsqueeze(1))
            scale = torch.full((n, 1), inv_temp, dtype=dtype, device=device)
        else:
            _softmax_rows_(z)  # z <- p
            z.scatter_add_(1, targets[r0:r1], z.new_full((n, 1), -1.0))
            scale = g_logp[r0:r1].unsqueeze(1) * -inv_temp
        if need_h:
            out = grad_h[r0:r1] if grad_h_scratch is None else grad_h_scratch[:n]
            torch.mm(z, weight_c, out=out)
            out.mul_(scale)
            if grad_h_scratch is not None:
                grad_h[r0:r1].copy_(out)
        beta = 0.0 if first else 1.0  # the first chunk initialises the accumulators
        if need_w:
            grad_w.addmm_(z.t(), hidden_c * scale, beta=beta)
        if need_b:
            grad_b.addmv_(z.t(), scale.squeeze(1), beta=beta)
        first = False
    return _finish(grad_h, grad_w, grad_b, hidden, weight, bias, empty=False)


def _finish(grad_h, grad_w, grad_b, hidden, weight, bias, *, empty: bool):
    """Zero-fill (no rows) and cast the accumulators to the inputs' dtypes."""
    if empty:
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.zero_()
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves only the inputs (and entropy); backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, want_entropy, rows):
        logp, entropy = _forward(hidden, weight, bias, targets, inv_temp, want_entropy, rows)
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        ctx.set_materialize_grads(False)
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        need = ctx.needs_input_grad[:3]
        grads = _backward(
            (hidden, weight, bias, targets),
            entropy,
            grad_logp,
            grad_entropy,
            ctx.inv_temp,
            ctx.rows,
            need,
        )
        return grads[0], grads[1], grads[2], None, None, None, None


def linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    return_entropy=False,
    chunk_size=None,
):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` row by row, exact,
    without materialising [M, V]; returns logp [M] (and entropy [M] when ``return_entropy``).

    Inputs are validated by :func:`steppo_fast.ops.logprobs.linear_logprobs` (the public op,
    which documents shapes, dtypes and the math). ``chunk_size`` = rows per chunk (None: from
    the shapes, :func:`default_chunk_rows`); results do not depend on it beyond fp rounding.
    """
    dtype = compute_dtype(hidden, weight, bias)
    rows = chunk_size
    if rows is None:
        rows = default_chunk_rows(hidden.shape[0], weight.shape[0], torch.finfo(dtype).bits // 8)
    return LinearLogprobsFunction.apply(
        hidden, weight, bias, targets, 1.0 / float(temperature), bool(return_entropy), int(rows)
    )
