"""The tuned CPU ``linear_logprobs`` of the ``"cpp"`` backend (torch ops only: oneDNN products,
in-place row kernels, preallocated buffers); the readable spec is
:mod:`steppo_fast.reference.logprobs`, which it is tested against.

The math and notation (z, lse, logp, H, the logit gradient dz) are the reference's; this module
computes the same quantities with fewer passes over memory.

The [M, V] logits are never materialised: rows are processed in chunks of ``rows`` (chosen from
the shapes by :func:`steppo_fast._defs.default_chunk_rows`); one chunk's [rows, V] logits is the
only large temporary alive at a time. Forward keeps only the inputs (and the entropy, when
asked); backward recomputes each chunk's logits with the same GEMM, turns that buffer into the
logit gradient in place (in-place row softmax, one scatter for the one-hot), writes that chunk's
d hidden and accumulates d weight / d bias in place into one preallocated buffer (``addmm_``,
beta = 1; the first chunk uses beta = 0, so nothing is zero-filled). Per-row scalings (``-g_i /
T``) are applied to the small [rows, H] operands, never to the [rows, V] buffer.

GEMMs are torch's, multi-threaded: for fp32 CPU tensors the two products with a [rows, V]
output or input (logits, d hidden) run on oneDNN (``torch.ops.mkldnn._linear_pointwise``, IEEE
fp32), which measured about 2x faster than ``torch.mm`` (MKL sgemm) on the 2-core AVX-512 AMD
CPU used here; d weight stays on MKL ``addmm_`` (in-place accumulation). fp64 and GPU tensors
use ``addmm`` / ``mm`` (cuBLAS on GPU).

Dtypes: fp32/bf16/fp16 inputs are computed in fp32 (bf16/fp16 weights are upcast once per call,
so logits equal the fp32 logits of the same bf16 values up to summation order) and logp /
entropy are returned in fp32; fp64 is computed and returned in fp64. Gradients are returned in
each input's dtype (accumulated in fp32 first). Extra memory: one [rows, V] buffer of the compute
dtype and [rows, H]-sized temporaries (plus, for bf16/fp16 weights, an fp32 copy of the weight
per call and an fp32 d weight accumulator).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._defs import default_chunk_rows
from .._validate import compute_dtype

# Rows of a backward tile (d weight is read and written once per this many rows).
BACKWARD_TILE_ROWS = 1024
# Byte budget of the small [rows, V] temporary used row-block-wise by the entropy path.
ENTROPY_BLOCK_BYTES = 8 << 20


def _onednn_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN runs the [chunk, V] products for fp32 CPU tensors (IEEE fp32, about 2x faster than
    torch.mm's MKL sgemm on the AVX-512 AMD CPUs measured here); fp64 and GPUs use mm/addmm."""
    return (
        not torch.compiler.is_compiling()  # Dynamo cannot trace the availability query
        and device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class _Products:
    """The two matrix products whose output or input is a [n, V'] logits tile (V' = a vocabulary
    slice ``[v0, v1)``, the whole vocabulary by default), in the compute dtype.

    ``logits(h, v0, v1)`` = (h @ weight[v0:v1].T + bias[v0:v1]) / T, a new contiguous [n, V']
    tensor (the only large temporary); ``times_weight(d, v0, v1)`` = d @ weight[v0:v1], [n, H].
    Forward and backward call the same code, so recomputed logits equal the forward's.
    """

    def __init__(self, weight, bias, inv_temp: float, dtype: torch.dtype):
        self.weight = weight.to(dtype)  # [V, H]; no copy for an fp32/fp64 weight
        self.inv_temp = inv_temp
        self.bias = None if bias is None else bias.to(dtype) * inv_temp  # [V], pre-scaled
        self.onednn = _onednn_ok(dtype, weight.device)

    def logits(self, hidden_chunk, v0: int = 0, v1: int | None = None):
        weight = self.weight[v0:v1]
        bias = None if self.bias is None else self.bias[v0:v1]
        if self.onednn:
            x = hidden_chunk if self.inv_temp == 1.0 else hidden_chunk * self.inv_temp
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        z = weight.new_empty(hidden_chunk.shape[0], weight.shape[0])
        if bias is None:
            return z.addmm_(hidden_chunk, weight.t(), beta=0.0, alpha=self.inv_temp)
        return torch.addmm(bias, hidden_chunk, weight.t(), alpha=self.inv_temp, out=z)

    def times_weight(self, d, v0: int = 0, v1: int | None = None):
        weight = self.weight[v0:v1]
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(d, weight.t(), None, "none", [], "")
        return torch.mm(d, weight)


def _log_softmax_rows_(z) -> None:
    """``z <- log_softmax(z, dim=1)`` in place (the fused row kernel: max, sum-exp, write)."""
    torch.ops.aten._log_softmax.out(z, 1, False, out=z)


def _row_blocks(x, scratch):
    """Yield (row slice of ``x`` [n, C], a contiguous [rows, C] view of the 1-D ``scratch``)
    for consecutive row blocks that fit ``scratch``."""
    cols = max(1, x.shape[1])
    block = max(1, scratch.numel() // cols)
    for r0 in range(0, x.shape[0], block):
        r1 = min(r0 + block, x.shape[0])
        yield slice(r0, r1), scratch[: (r1 - r0) * x.shape[1]].view(r1 - r0, x.shape[1])


def _sum_p_logp_rows(log_p, out, scratch) -> None:
    """``out[i] = sum_j p_ij log p_ij`` (= -entropy) from log-probabilities ``log_p`` [n, C],
    row block by row block through the 1-D ``scratch`` (``log_p`` is not modified)."""
    for rows, tmp in _row_blocks(log_p, scratch):
        p = torch.exp(log_p[rows], out=tmp)
        out[rows] = p.mul_(log_p[rows]).sum(1)


def _entropy_logit_grad_(log_p, entropy, g_logp, g_ent, scratch) -> None:
    """``log_p <- -p * (g + e * (log p + H))`` in place (the logit gradient without its one-hot
    part), row block by row block through the 1-D ``scratch``.

    log_p: [n, C] log-probabilities (C = the whole vocabulary or a slice of it);
    entropy, g_logp, g_ent: [n] (H_i, g_i, e_i).
    """
    neg_offset = (g_logp + g_ent * entropy).neg_().unsqueeze(1)  # -(g + e H), [n, 1]
    neg_e = g_ent.neg().unsqueeze(1)  # -e, [n, 1]
    for rows, tmp in _row_blocks(log_p, scratch):
        y = log_p[rows]
        p = torch.exp(y, out=tmp)
        torch.addcmul(neg_offset[rows], y, neg_e[rows], out=y)  # y <- -(g + e H) - e y
        y.mul_(p)


def _forward(hidden, weight, bias, targets, inv_temp: float, want_entropy: bool, rows: int):
    """(logp [M], lse [M], entropy [M] or None) in the compute dtype; inputs already validated.

    One [n, V] logits chunk at a time: GEMM, row max, in-place log_softmax, gathers.
    """
    dtype = compute_dtype(hidden, weight, bias)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(num_rows, dtype=dtype, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else None
    if num_rows == 0:
        return logp, lse, entropy
    products = _Products(weight, bias, inv_temp, dtype)
    targets = targets.long().unsqueeze(1)
    scratch = None
    if want_entropy:
        scratch = _entropy_scratch(min(rows, num_rows), vocab, dtype, hidden.device)
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        z = products.logits(hidden[r0:r1].to(dtype))  # [n, V]
        row_max = z.amax(1)
        _log_softmax_rows_(z)  # z <- log p = z - lse
        # The row's largest logit has log p = max - lse exactly as the kernel computed it.
        torch.sub(row_max, z.amax(1), out=lse[r0:r1])
        logp[r0:r1] = z.gather(1, targets[r0:r1]).squeeze(1)
        if want_entropy:
            _sum_p_logp_rows(z, entropy[r0:r1], scratch)
            entropy[r0:r1].neg_()
        del z  # free this chunk's logits before the next chunk allocates its own
    return logp, lse, entropy


def _entropy_scratch(rows: int, cols: int, dtype, device):
    """1-D temporary of the entropy helpers: ``min(rows, b) * cols`` elements with b the rows
    of ``cols`` entries that fit ENTROPY_BLOCK_BYTES (at least one row)."""
    block = max(1, ENTROPY_BLOCK_BYTES // max(1, cols * torch.finfo(dtype).bits // 8))
    return torch.empty(min(block, rows) * cols, dtype=dtype, device=device)


def backward_tile(num_rows: int, vocab: int, chunk_rows: int) -> tuple[int, int]:
    """(rows, vocabulary columns) of a backward tile: at least ``BACKWARD_TILE_ROWS`` rows (so
    that weight and d weight are streamed once per 1024 rows, not once per chunk), and the same
    element count as the forward's [chunk_rows, V] buffer (columns a multiple of 256 when that
    many fit)."""
    rows = max(1, min(num_rows, max(chunk_rows, BACKWARD_TILE_ROWS)))
    cols = chunk_rows * vocab // rows
    if cols >= vocab:
        return rows, vocab
    if cols >= 256:
        cols -= cols % 256
    return rows, max(1, cols)


def _backward(saved, g_logp, g_ent, inv_temp, rows, need):
    """(d hidden, d weight, d bias) for upstream g_logp [M] / g_ent [M] (either may be None).

    ``saved`` = (hidden, weight, bias, targets, lse, entropy); ``need`` = (hidden, weight,
    bias) flags, a gradient not needed is None. Tiles of [row block, vocabulary block]: the
    recomputed logits z become log p = z - lse (lse saved by forward), then the logit gradient
    in place; d hidden accumulates over the row block's vocabulary tiles, d weight / d bias over
    row blocks (``addmm_`` / ``addmv_`` into their final buffers).
    """
    hidden, weight, bias, targets, lse, entropy = saved
    dtype = compute_dtype(hidden, weight, bias)
    num_rows, vocab, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
    device = hidden.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.empty(vocab, width, dtype=dtype, device=device) if need_w else None
    grad_b = torch.empty(vocab, dtype=dtype, device=device) if need_b else None
    if num_rows == 0 or not (need_h or need_w or need_b):
        return _finish(grad_h, grad_w, grad_b, hidden, weight, bias, empty=True)

    products = _Products(weight, bias, inv_temp, dtype)
    use_entropy = g_ent is not None
    if use_entropy:
        g_ent = g_ent.to(dtype)
        g_logp = torch.zeros_like(g_ent) if g_logp is None else g_logp.to(dtype)
    else:
        g_logp = g_logp.to(dtype)
    tile_rows, tile_cols = backward_tile(num_rows, vocab, rows)
    scratch = _entropy_scratch(tile_rows, tile_cols, dtype, device) if use_entropy else None
    grad_h_rows = torch.empty(tile_rows, width, dtype=dtype, device=device) if need_h else None

    for r0 in range(0, num_rows, tile_rows):
        r1 = min(r0 + tile_rows, num_rows)
        n = r1 - r0
        hidden_c = hidden[r0:r1].to(dtype)
        lse_c = lse[r0:r1].unsqueeze(1)
        targets_c = targets[r0:r1].long()
        # The logit gradient is dz = s[:, None] * D with a row scale s applied to [n, H]-sized
        # operands only: logp only: D = p - onehot, s = -g / T; with entropy: D = dz, s = 1 / T.
        if use_entropy:
            scale = torch.full((n, 1), inv_temp, dtype=dtype, device=device)
            onehot_value = g_logp[r0:r1]
        else:
            scale = g_logp[r0:r1].unsqueeze(1) * -inv_temp
            onehot_value = torch.full((n,), -1.0, dtype=dtype, device=device)
        scaled_hidden = hidden_c * scale if need_w else None
        beta = 0.0 if r0 == 0 else 1.0  # the first row block initialises d weight / d bias
        for v0 in range(0, vocab, tile_cols):
            v1 = min(v0 + tile_cols, vocab)
            z = products.logits(hidden_c, v0, v1).sub_(lse_c)  # [n, v1 - v0] log p
            if use_entropy:
                _entropy_logit_grad_(z, entropy[r0:r1], g_logp[r0:r1], g_ent[r0:r1], scratch)
            else:
                z.exp_()  # p
            _add_at_targets_(z, targets_c, onehot_value, v0)
            if need_h:  # d hidden rows accumulate D @ W over vocabulary tiles
                part = products.times_weight(z, v0, v1)
                if v0 == 0:
                    grad_h_rows[:n] = part
                else:
                    grad_h_rows[:n] += part
                del part
            if need_w:  # d W[v0:v1] += D^T @ (s * h), in place
                grad_w[v0:v1].addmm_(z.t(), scaled_hidden, beta=beta)
            if need_b:  # d b[v0:v1] += D^T @ s, in place
                grad_b[v0:v1].addmv_(z.t(), scale.squeeze(1), beta=beta)
            del z  # free this tile before the next one allocates its own
        if need_h:
            grad_h[r0:r1] = grad_h_rows[:n].mul_(scale)
    return _finish(grad_h, grad_w, grad_b, hidden, weight, bias, empty=False)


def _add_at_targets_(z, targets, values, v0: int) -> None:
    """``z[i, targets[i] - v0] += values[i]`` for the rows whose target lies in this tile's
    vocabulary slice ``[v0, v0 + z.shape[1])`` (no host sync: other rows add 0)."""
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    src = torch.where(inside, values, torch.zeros_like(values)).unsqueeze(1)
    z.scatter_add_(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1), src)


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
        logp, lse, entropy = _forward(hidden, weight, bias, targets, inv_temp, want_entropy, rows)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        ctx.set_materialize_grads(False)
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        need = ctx.needs_input_grad[:3]
        grads = _backward(ctx.saved_tensors, grad_logp, grad_entropy, ctx.inv_temp, ctx.rows, need)
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
    the shapes, :func:`steppo_fast._defs.default_chunk_rows`); results do not depend on it
    beyond fp rounding.
    """
    dtype = compute_dtype(hidden, weight, bias)
    rows = chunk_size
    if rows is None:
        rows = default_chunk_rows(hidden.shape[0], weight.shape[0], torch.finfo(dtype).bits // 8)
    return LinearLogprobsFunction.apply(
        hidden, weight, bias, targets, 1.0 / float(temperature), bool(return_entropy), int(rows)
    )
