"""Exact linear log-probabilities: the readable spec of ``linear_logprobs``.

For rows i (e.g. the hidden states that predict action tokens) and vocabulary entries j::

    z_ij    = (hidden_i . weight_j + bias_j) / T                 scaled logits
    lse_i   = log sum_j exp(z_ij)
    logp_i  = z_{i, t_i} - lse_i                                 t_i = targets[i]
    H_i     = lse_i - sum_j p_ij z_ij = -sum_j p_ij log p_ij     p_ij = exp(z_ij - lse_i)

Gradients w.r.t. the logits, for upstream gradients g_i (of logp) and e_i (of H)::

    dz_ij = g_i [j == t_i] - p_ij (g_i + e_i (log p_ij + H_i))
    d hidden = dz @ weight / T,  d weight = dz^T @ hidden / T,  d bias = dz^T 1 / T

The [M, V] logits are never materialised: rows go in chunks of ``rows``
(:func:`steppo_fast._defs.default_chunk_rows` by default). The forward keeps the inputs, lse
(and H); the backward recomputes each chunk's logits and applies the formulas above with plain
torch ops. The backends' versions (Triton kernels, the tuned CPU one of the ``"cpp"`` backend)
are tested against this.

Dtypes: fp32/bf16/fp16 inputs are computed in fp32 and logp / entropy are fp32; fp64 stays
fp64. Gradients are returned in each input's dtype (accumulated in the compute dtype).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._defs import default_chunk_rows
from .._validate import compute_dtype


def _logits(hidden_rows, weight, bias, inv_temp: float) -> torch.Tensor:
    """z = (hidden_rows @ weight.T + bias) / T for one chunk, [n, V] (inputs in the compute
    dtype)."""
    z = hidden_rows @ weight.T
    if bias is not None:
        z = z + bias
    return z * inv_temp


class _LinearLogprobs(torch.autograd.Function):
    """Chunked forward (saves lse and H), chunked recomputing backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, want_entropy, rows):
        dtype = compute_dtype(hidden, weight, bias)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        num_rows = hidden.shape[0]
        logp = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if want_entropy else None
        for r0 in range(0, num_rows, rows):
            r1 = min(r0 + rows, num_rows)
            z = _logits(hidden[r0:r1].to(dtype), w, b, inv_temp)
            log_p = torch.log_softmax(z, dim=1)
            lse[r0:r1] = torch.logsumexp(z, dim=1)
            logp[r0:r1] = log_p.gather(1, targets[r0:r1].long().unsqueeze(1)).squeeze(1)
            if want_entropy:
                entropy[r0:r1] = -(log_p.exp() * log_p).sum(1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        ctx.set_materialize_grads(False)
        return (logp, entropy) if want_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        g = torch.zeros_like(lse) if g_logp is None else g_logp.to(dtype)
        e = None if g_ent is None else g_ent.to(dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if (need_b and b is not None) else None
        for r0 in range(0, hidden.shape[0], ctx.rows):
            r1 = min(r0 + ctx.rows, hidden.shape[0])
            h = hidden[r0:r1].to(dtype)
            log_p = _logits(h, w, b, ctx.inv_temp) - lse[r0:r1, None]
            coef = g[r0:r1, None]
            if e is not None:
                coef = coef + e[r0:r1, None] * (log_p + entropy[r0:r1, None])
            dz = -log_p.exp() * coef
            dz.scatter_add_(1, targets[r0:r1].long().unsqueeze(1), g[r0:r1, None])
            dz = dz * ctx.inv_temp
            if grad_h is not None:
                grad_h[r0:r1] = dz @ w
            if grad_w is not None:
                grad_w += dz.T @ h
            if grad_b is not None:
                grad_b += dz.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_logprobs(
    hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False, chunk_size=None
):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[targets]`` row by row, exact,
    without materialising [M, V]; returns logp [M] (and entropy [M] when ``return_entropy``).

    Inputs are validated by :func:`steppo_fast.ops.logprobs.linear_logprobs` (the public op,
    which documents shapes, dtypes and the math). ``chunk_size`` = rows per chunk (None: from
    the shapes); results do not depend on it beyond fp rounding.
    """
    rows = chunk_size
    if rows is None:
        itemsize = torch.finfo(compute_dtype(hidden, weight, bias)).bits // 8
        rows = default_chunk_rows(hidden.shape[0], weight.shape[0], itemsize)
    return _LinearLogprobs.apply(
        hidden, weight, bias, targets, 1.0 / float(temperature), bool(return_entropy), int(rows)
    )
