"""Launchers, registered ops (namespace ``steppo_fast_triton``) and the backend function of
``linear_logprobs``.

Forward: one fused kernel (GEMM tiles + online log-sum-exp + entropy), saving lse [M] (and the
entropy) only. Backward, per chunk of ``rows`` rows: one kernel recomputes the chunk's logit tiles
and writes dz into a reused [rows, V] fp32 buffer (extra memory O(chunk * V), as the public op
promises), then ``d hidden = dz @ W / T`` and ``d W += dz^T @ h / T`` (``addmm_``, in place) and
``d b += dz^T 1 / T`` run as vendor GEMMs. Exact: every vocabulary entry contributes (no
gradient filtering). bf16/fp16 weights are upcast once for the backward GEMMs (as the
reference); gradients are returned in each input's dtype.

fp64 inputs go to the torch reference (the gradcheck path).
"""

from __future__ import annotations

import torch
import triton

from . import logprobs as _k

_NS = "steppo_fast_triton"
BLOCK_M = 16  # rows per program (tl.dot needs >= 16)
BLOCK_V = 64  # vocab entries per tile
BLOCK_H = 32  # hidden slice per tl.dot


def _dot_fp32(*tensors) -> bool:
    """Convert tiles to fp32 before tl.dot: always for fp32 inputs and on CPU (the Triton
    interpreter computes garbage on bf16 values); bf16/fp16 on a GPU use the tensor cores."""
    return any(t.device.type == "cpu" or t.dtype == torch.float32 for t in tensors)


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """2-D with unit column stride (rows may be strided, e.g. a slice of a bigger buffer)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def lse_forward(hidden, weight, targets, bias, inv_temp: float, want_entropy: bool):
    """(logp [M], lse [M], entropy [M] or [0]) fp32."""
    hidden, weight = _rows_ready(hidden), _rows_ready(weight)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.empty(num_rows, **f32), torch.empty(num_rows, **f32)
    entropy = torch.empty(num_rows if want_entropy else 0, **f32)
    if num_rows == 0:
        return logp, lse, entropy
    bias_arg = bias.contiguous() if bias is not None else lse  # placeholder, never read
    _k._lse_fwd_kernel[(triton.cdiv(num_rows, BLOCK_M),)](
        hidden,
        weight,
        bias_arg,
        targets.contiguous(),
        logp,
        lse,
        entropy if want_entropy else lse,
        num_rows,
        vocab,
        width,
        hidden.stride(0),
        weight.stride(0),
        inv_temp,
        HAS_BIAS=bias is not None,
        WANT_ENTROPY=want_entropy,
        DOT_FP32=_dot_fp32(hidden, weight),
        BLOCK_M=BLOCK_M,
        BLOCK_V=BLOCK_V,
        BLOCK_H=BLOCK_H,
    )
    return logp, lse, entropy


def lse_backward(
    g_logp,
    g_ent,
    hidden,
    weight,
    targets,
    bias,
    lse,
    entropy,
    inv_temp: float,
    rows: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
):
    """(d hidden [M, H], d weight [V, H], d bias [V]) fp32; unneeded ones are [0]-shaped."""
    hidden, weight = _rows_ready(hidden), _rows_ready(weight)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    grad_h = torch.zeros(num_rows, width, **f32) if need_h else torch.empty(0, **f32)
    grad_w = torch.zeros(vocab, width, **f32) if need_w else torch.empty(0, **f32)
    grad_b = torch.zeros(vocab, **f32) if (need_b and bias is not None) else torch.empty(0, **f32)
    if num_rows == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    has_ent = g_ent is not None
    g_logp = g_logp.to(torch.float32).contiguous()
    g_ent = g_ent.to(torch.float32).contiguous() if has_ent else g_logp  # placeholder if None
    targets = targets.contiguous()
    bias_arg = bias.contiguous() if bias is not None else lse
    weight_f32 = weight.to(torch.float32)  # no copy for an fp32 weight
    rows = max(1, min(rows, num_rows))
    buffer = torch.empty(rows, vocab, **f32)
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        n = r1 - r0
        dz = buffer[:n]
        _k._logit_grad_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(vocab, BLOCK_V))](
            hidden[r0:r1],
            weight,
            bias_arg,
            targets[r0:r1],
            lse[r0:r1],
            entropy[r0:r1] if has_ent else lse[r0:r1],
            g_logp[r0:r1],
            g_ent[r0:r1],
            dz,
            n,
            vocab,
            width,
            hidden.stride(0),
            weight.stride(0),
            inv_temp,
            HAS_BIAS=bias is not None,
            HAS_ENT_GRAD=has_ent,
            DOT_FP32=_dot_fp32(hidden, weight),
            BLOCK_M=BLOCK_M,
            BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H,
        )
        if need_h:
            torch.mm(dz, weight_f32, out=grad_h[r0:r1])
            grad_h[r0:r1].mul_(inv_temp)
        if need_w:
            grad_w.addmm_(dz.t(), hidden[r0:r1].to(torch.float32), alpha=inv_temp)
        if need_b and bias is not None:
            grad_b.addmv_(dz.t(), dz.new_ones(n), alpha=inv_temp)
    return grad_h, grad_w, grad_b


# ---- registered ops ----


@torch.library.custom_op(f"{_NS}::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temp: float,
    want_entropy: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [M], lse [M], entropy [M] or [0]) fp32; ``chunk_rows`` is used by the backward."""
    return lse_forward(hidden, weight, targets, bias, inv_temp, want_entropy)


@linear_logprobs_op.register_fake
def _(hidden, weight, targets, bias, inv_temp, want_entropy, chunk_rows):
    m = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.empty(m, **f32),
        torch.empty(m, **f32),
        torch.empty(m if want_entropy else 0, **f32),
    )


@torch.library.custom_op(f"{_NS}::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temp: float,
    chunk_rows: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) fp32 (unneeded ones have shape [0])."""
    return lse_backward(
        g_logp,
        g_ent,
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        inv_temp,
        chunk_rows,
        need_h,
        need_w,
        need_b,
    )


@linear_logprobs_backward_op.register_fake
def _(
    g_logp,
    g_ent,
    hidden,
    weight,
    targets,
    bias,
    lse,
    entropy,
    inv_temp,
    chunk_rows,
    need_h,
    need_w,
    need_b,
):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.empty(tuple(hidden.shape) if need_h else (0,), **f32),
        torch.empty(tuple(weight.shape) if need_w else (0,), **f32),
        torch.empty(weight.shape[0] if (need_b and bias is not None) else 0, **f32),
    )


def _setup(ctx, inputs, output):
    hidden, weight, targets, bias, inv_temp, want_entropy, chunk_rows = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
    ctx.inv_temp, ctx.chunk_rows, ctx.want_entropy = inv_temp, chunk_rows, want_entropy
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    none = (None,) * 7
    if g_logp is None and g_ent is None:
        return none
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    g_ent = g_ent if ctx.want_entropy else None
    d_h, d_w, d_b = linear_logprobs_backward_op(
        g_logp,
        g_ent,
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        ctx.inv_temp,
        ctx.chunk_rows,
        need_h,
        need_w,
        need_b,
    )
    return (
        d_h.to(hidden.dtype) if need_h else None,
        d_w.to(weight.dtype) if need_w else None,
        None,
        d_b.to(bias.dtype) if (need_b and bias is not None) else None,
        None,
        None,
        None,
    )


linear_logprobs_op.register_autograd(_backward, setup_context=_setup)


# ---- backend function (reference signature) ----


def linear_logprobs(
    hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False, chunk_size=None
):
    """Triton backend of :func:`steppo_fast.linear_logprobs` (fp64 -> torch reference)."""
    if any(t is not None and t.dtype == torch.float64 for t in (hidden, weight, bias)):
        from steppo_fast.reference import linear_logprobs as ref

        return ref(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=temperature,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )
    from steppo_fast.reference.logprobs import default_chunk_rows

    rows = (
        chunk_size
        if chunk_size is not None
        else default_chunk_rows(*hidden.shape[:1], weight.shape[0])
    )
    logp, _, entropy = linear_logprobs_op(
        hidden, weight, targets, bias, 1.0 / float(temperature), bool(return_entropy), int(rows)
    )
    return (logp, entropy) if return_entropy else logp
