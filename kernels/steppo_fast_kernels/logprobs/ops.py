"""Launchers, registered ops (namespace ``steppo_fast_triton``) and the backend function of
``linear_logprobs``.

Forward: one fused kernel (GEMM tiles + online log-sum-exp + entropy), saving lse [M] (and the
entropy) only. Backward, per chunk of ``rows`` rows (all Triton, 1-3 launches per chunk):
``logit_grad_kernel`` recomputes the chunk's logit tiles and writes ``dz / T`` into a reused
[rows, V] buffer **of the GEMM dtype** (extra memory O(chunk * V), as the public op promises)
and adds its fp32 column sums to d bias; ``matmul_kernel`` then forms ``d hidden[chunk] =
(dz / T) @ W`` and accumulates ``d W += (dz / T)^T @ h[chunk]`` in one fp32 [V, H] buffer.
Every vocabulary entry contributes (no gradient filtering); no atomics (deterministic).

GEMM dtype (decided here from the inputs, no keyword): bf16 (fp16) when hidden and weight are
both bf16 (fp16): dz is computed in fp32 and rounded once to that dtype (to nearest even), the
GEMMs run on the tensor cores with fp32 accumulation. What is exact: logp, lse and entropy
(fp32 accumulation, no rounding of any intermediate), d bias (fp32 column sums of the unrounded
dz) and every GEMM product and sum (fp32); the one approximation is the rounding of each
``dz_ij / T`` (relative <= 2^-8 for bf16, so ``|d hidden - exact| <= 2^-8 (|dz| @ |W|) / T``
elementwise, likewise d W with ``|dz|^T @ |h|``). This is what Liger-Kernel and
cut-cross-entropy do (their logit gradient is in the input dtype too). fp32 or mixed-dtype
inputs use an fp32 dz and IEEE fp32 GEMMs: exact fp32 math. Gradients are accumulated in fp32
and cast once to each input's dtype.

Why materialise dz per chunk and not fuse the GEMMs (bench/ROOFLINE.md section 4 has the
numbers): a program cannot hold d hidden [BLOCK_M, H] or d W [BLOCK_V, H] at H = 4096, so a
fused kernel needs fp32 atomics (~2.5 TB of read-modify-write at the target shape,
non-deterministic) or a second logit recomputation (+2MVH FLOPs); the bf16 dz round trip is
``6-8 MV`` bytes, 20-27 ms against ~200 ms of GEMMs. The GEMMs are Triton (``matmul_kernel``)
because cuBLAS' bf16-in / fp32-out accumulation (``out_dtype``) exists only in CUDA builds of
torch and could not be run here.

fp64 calls never reach this backend: steppo_fast._dispatch routes them to the reference.
"""

from __future__ import annotations

import torch
import triton

from steppo_fast._defs import default_chunk_rows

from .. import _configs
from . import kernel as _k

_NS = "steppo_fast_triton"
# Tile sizes (BLOCK_M rows, BLOCK_V vocabulary entries, BLOCK_H hidden slice; GEMM BLOCK_P x
# BLOCK_Q x BLOCK_K, GROUP_P), num_warps and num_stages come from _configs: small on CPU (the
# interpreter), tensor-core sized on CUDA.


def _dot_fp32(*tensors) -> bool:
    """Convert tiles to fp32 before tl.dot: for fp32 or mixed-dtype operands and always on CPU
    (the Triton interpreter computes garbage on bf16 values; its fp32 dot of upcast bf16 values
    is exact per product, like the tensor cores); same-dtype bf16/fp16 on a GPU use the tensor
    cores."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) > 1 or any(
        t.device.type == "cpu" or t.dtype == torch.float32 for t in tensors
    )


def _sixteen_bit(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both operands bf16 or both fp16: the tensor-core launch configurations apply."""
    return a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype of the backward's logit-gradient buffer and GEMM operands: the inputs' dtype when
    hidden and weight are both bf16 or both fp16 (tensor cores), else fp32 (exact fp32 GEMMs)."""
    if hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return torch.float32


def gemm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with ``matmul_kernel``: a [P, K], b [K, Q] (any strides, GEMM dtype),
    out [P, Q] fp32; fp32 accumulation."""
    size_p, size_k = a.shape
    size_q = b.shape[1]
    launch = _configs.matmul(_configs.gpu_of(out.device), size_p, size_q, _sixteen_bit(a, b))
    grid = (triton.cdiv(size_p, launch["BLOCK_P"]) * triton.cdiv(size_q, launch["BLOCK_Q"]),)
    _k.matmul_kernel[grid](
        a,
        b,
        out,
        size_p,
        size_q,
        size_k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        ACCUMULATE=accumulate,
        DOT_FP32=_dot_fp32(a, b),
        **launch.kwargs(),
    )


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """2-D with unit column stride (rows may be strided, e.g. a slice of a bigger buffer)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_operands(hidden, weight, bias, targets, placeholder):
    """The leading pointer arguments of the LM-head kernels: hidden, weight, bias (``placeholder``
    when None: never read), targets."""
    return hidden, weight, bias.contiguous() if bias is not None else placeholder, targets


def _head_scalars(hidden, weight, inv_temp):
    """The scalar arguments of the LM-head kernels: rows, vocabulary, width, the row strides of
    hidden and weight, 1 / temperature."""
    num_rows, width = hidden.shape
    return num_rows, weight.shape[0], width, hidden.stride(0), weight.stride(0), inv_temp


def _head_flags(hidden, weight, bias, launch: _configs.Launch) -> dict:
    """The launch constants shared by the LM-head kernels (bias, dot precision) and the
    launch configuration (tile sizes, num_warps, num_stages)."""
    return dict(HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(hidden, weight), **launch.kwargs())


def lse_forward(hidden, weight, targets, bias, inv_temp: float, want_entropy: bool):
    """(logp [M], lse [M], entropy [M] or [0]) fp32."""
    hidden, weight = _rows_ready(hidden), _rows_ready(weight)
    num_rows = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.empty(num_rows, **f32), torch.empty(num_rows, **f32)
    entropy = torch.empty(num_rows if want_entropy else 0, **f32)
    if num_rows == 0:
        return logp, lse, entropy
    gpu = _configs.gpu_of(hidden.device)
    launch = _configs.lse_fwd(gpu, num_rows, _sixteen_bit(hidden, weight))
    _k.lse_fwd_kernel[(triton.cdiv(num_rows, launch["BLOCK_M"]),)](
        *_head_operands(hidden, weight, bias, targets.contiguous(), placeholder=lse),
        logp,
        lse,
        entropy if want_entropy else lse,
        *_head_scalars(hidden, weight, inv_temp),
        WANT_ENTROPY=want_entropy,
        **_head_flags(hidden, weight, bias, launch),
    )
    return logp, lse, entropy


def logit_grad_chunk(
    hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, inv_temp, dz_out, grad_b=None
) -> None:
    """One chunk's logit gradient: ``dz_out [n, V] <- dz / T`` (``logit_grad_kernel``),
    rounded once to ``dz_out``'s dtype (to nearest even), and ``grad_b [V] += sum_rows dz / T``
    in fp32 when ``grad_b`` is given.

    hidden [n, H] (unit column stride), weight [V, H], bias [V] or None, targets [n], lse [n]
    fp32, entropy [n] fp32 and g_ent [n] fp32 (both None: no entropy gradient), g_logp [n]
    fp32; dz_out contiguous fp32/bf16/fp16."""
    has_ent = g_ent is not None
    launch = _configs.logit_grad(_configs.gpu_of(hidden.device), _sixteen_bit(hidden, weight))
    _k.logit_grad_kernel[(triton.cdiv(weight.shape[0], launch["BLOCK_V"]),)](
        *_head_operands(hidden, weight, bias, targets, placeholder=lse),
        lse,
        entropy if has_ent else lse,
        g_logp,
        g_ent if has_ent else g_logp,
        dz_out,
        grad_b if grad_b is not None else lse,
        *_head_scalars(hidden, weight, inv_temp),
        HAS_ENT_GRAD=has_ent,
        NEED_DB=grad_b is not None,
        ROUND_BF16=dz_out.dtype == torch.bfloat16,
        **_head_flags(hidden, weight, bias, launch),
    )


@torch.library.custom_op(f"{_NS}::linear_logprobs_backward", mutates_args=())
def lse_backward(
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temp: float,
    rows: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden [M, H], d weight [V, H], d bias [V]) fp32; unneeded ones are [0]-shaped. The
    registered backward op of ``linear_logprobs`` (its fake kernel is below).

    The logit gradient of each chunk goes through a [rows, V] buffer of ``gemm_dtype``."""
    hidden, weight = _rows_ready(hidden), _rows_ready(weight)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    need_b = need_b and bias is not None
    if num_rows == 0 or not (need_h or need_w or need_b):
        return (
            torch.zeros(num_rows, width, **f32) if need_h else torch.empty(0, **f32),
            torch.zeros(vocab, width, **f32) if need_w else torch.empty(0, **f32),
            torch.zeros(vocab, **f32) if need_b else torch.empty(0, **f32),
        )
    grad_h = torch.empty(num_rows, width, **f32) if need_h else torch.empty(0, **f32)
    grad_w = torch.empty(vocab, width, **f32) if need_w else torch.empty(0, **f32)  # 1st chunk sets
    grad_b = torch.zeros(vocab, **f32) if need_b else torch.empty(0, **f32)  # kernel adds to it
    has_ent = g_ent is not None
    g_logp = g_logp.to(torch.float32).contiguous()
    g_ent = g_ent.to(torch.float32).contiguous() if has_ent else None
    targets = targets.contiguous()
    dz_dtype = gemm_dtype(hidden, weight)
    rows = max(1, min(rows, num_rows))
    buffer = torch.empty(rows, vocab, dtype=dz_dtype, device=device)
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        n = r1 - r0
        dz = buffer[:n]  # dz / T of rows [r0, r1)
        logit_grad_chunk(
            hidden[r0:r1],
            weight,
            bias,
            targets[r0:r1],
            lse[r0:r1],
            entropy[r0:r1] if has_ent else None,
            g_logp[r0:r1],
            g_ent[r0:r1] if has_ent else None,
            inv_temp,
            dz,
            grad_b if need_b else None,
        )
        if need_h:  # d hidden[r0:r1] = (dz / T) @ W
            gemm_into(dz, weight, grad_h[r0:r1], accumulate=False)
        if need_w:  # d W += (dz / T)^T @ h[r0:r1]
            gemm_into(dz.t(), hidden[r0:r1], grad_w, accumulate=r0 > 0)
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


@lse_backward.register_fake
def _(g_logp, g_ent, hidden, weight, targets, bias, *rest):
    need_h, need_w, need_b = rest[-3:]
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
    saved = (hidden, weight, targets, bias, lse, entropy)
    flags = (ctx.inv_temp, ctx.chunk_rows, need_h, need_w, need_b)
    d_h, d_w, d_b = lse_backward(g_logp, g_ent, *saved, *flags)
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
    """Triton backend of :func:`steppo_fast.linear_logprobs` (fp32 math)."""
    rows = chunk_size
    if rows is None:  # the budget holds the backward's [rows, V] buffer of the GEMM dtype
        itemsize = gemm_dtype(hidden, weight).itemsize
        rows = default_chunk_rows(hidden.shape[0], weight.shape[0], itemsize)
    logp, _, entropy = linear_logprobs_op(
        hidden, weight, targets, bias, 1.0 / float(temperature), bool(return_entropy), int(rows)
    )
    return (logp, entropy) if return_entropy else logp
