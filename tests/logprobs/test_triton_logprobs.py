"""Triton linear_logprobs under the interpreter: forward (online log-sum-exp, entropy) and
backward (recomputed logit tiles, logit gradient in the GEMM dtype, Triton GEMMs) against the
torch reference; fp32 exact, bf16/fp16 within one rounding of the logit gradient; bias,
temperature, chunking, odd shapes, empty input; registered-op checks."""

import pytest
import torch
from _tolerance import assert_close_to_oracle, assert_within, sum_error, unit_roundoff
from steppo_fast.kernels.logprobs import ops as logprobs_ops

from steppo_fast import linear_logprobs

# odd sizes: not multiples of BLOCK_M = 16, BLOCK_V = 64, BLOCK_H = 32
ROWS, WIDTH, VOCAB = 37, 40, 203


def inputs(dtype, rows=ROWS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, WIDTH, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(VOCAB, WIDTH, generator=gen)).to(dtype)
    bias = torch.randn(VOCAB, generator=gen).to(dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    g_logp, g_ent = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    return hidden, weight, bias, targets, g_logp, g_ent


def run(impl, hidden, weight, bias, targets, g_logp, g_ent, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    out = linear_logprobs(h, w, targets, bias=b, impl=impl, **kw)
    logp, ent = out if kw.get("return_entropy") else (out, None)
    total = (logp * g_logp).sum() + (0.0 if ent is None else (ent * g_ent).sum())
    total.backward()
    outs = [logp.detach(), None if ent is None else ent.detach()]
    return outs, [h.grad, w.grad, None if b is None else b.grad]


def oracle_run(impl_args, **kw):
    """(outputs, gradients) of the torch reference in fp64 on the same input values: the oracle
    the fp32 results are measured against (``assert_close_to_oracle``)."""
    hidden, weight, bias, targets, g_logp, g_ent = impl_args
    f64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    return run("torch", *f64, targets, g_logp.double(), g_ent.double(), **kw)


def all_close_to_oracle(got, ref, oracle, what):
    """Each fp32 result within ORACLE_FACTOR x torch's own fp32 error (``ref``) of the fp64
    ``oracle`` (exp / log-sum-exp over GEMMs: no tighter a-priori bound is practical)."""
    for i, (g, r, o) in enumerate(zip(got, ref, oracle)):
        if r is not None:
            assert_close_to_oracle(g, o, r, msg=f"{what}[{i}]")


# Unit roundoff (max relative error of one round-to-nearest) of the 16-bit GEMM dtypes, and the
# largest absolute error of rounding into their subnormal range (half the smallest spacing).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL_HALF_SPACING = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def logit_grad_oracle(
    hidden, weight, bias, targets, g_logp, g_ent, temperature, dtype=torch.float64
):
    """dz / T [M, V] from the math (full softmax, small shapes only), computed in ``dtype``
    (fp64: the oracle; fp32: torch's own fp32 error on the same inputs)."""
    h, w = hidden.to(dtype), weight.to(dtype)
    z = h @ w.T + (0.0 if bias is None else bias.to(dtype))
    log_p = torch.log_softmax(z / temperature, dim=1)
    p = log_p.exp()
    g = g_logp.to(dtype)[:, None]
    coef = g.expand_as(p).clone()
    if g_ent is not None:
        entropy = -(p * log_p).sum(1, keepdim=True)
        coef += g_ent.to(dtype)[:, None] * (log_p + entropy)
    onehot = torch.nn.functional.one_hot(targets, weight.shape[0]).to(dtype)
    return (g * onehot - p * coef) / temperature


def assert_within_one_dz_rounding(got, want, oracle, bound):
    """got: the 16-bit gradient of the Triton path; want: the fp32 reference on the same 16-bit
    values; oracle: the same in fp64; bound: elementwise error bound of the rounded logit
    gradient. The Triton fp32 gradient g32 satisfies |g32 - oracle| <= bound + fp32 slack, the
    slack being ORACLE_FACTOR x the fp32 reference's own max error + one fp32 rounding (the rule
    of ``assert_close_to_oracle``); got = round(g32) adds one unit roundoff of
    |g32| <= |oracle| + that."""
    from _tolerance import ORACLE_FACTOR

    unit = UNIT_ROUNDOFF.get(got.dtype, 0.0)
    oracle = oracle.double()
    fp32_err = (want.double() - oracle).abs().max().item() if oracle.numel() else 0.0
    fp32_floor = unit_roundoff(torch.float32) * (oracle.abs().max().item() if oracle.numel() else 0)
    slack = bound + ORACLE_FACTOR * fp32_err + fp32_floor
    allowed = slack + unit * (oracle.abs() + slack)
    err = (got.double() - oracle).abs()
    worst = (err - allowed).max()
    assert worst <= 0, f"error exceeds the one-rounding bound by {worst.item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "use_bias, temperature, entropy, chunk",
    [
        (True, 0.7, True, 16),
        (False, 1.0, False, None),
        (True, 1.3, False, 5),
        (False, 0.5, True, 64),
    ],
)
def test_forward_backward_match_reference(dtype, use_bias, temperature, entropy, chunk):
    hidden, weight, bias, targets, g_logp, g_ent = inputs(dtype)
    bias = bias if use_bias else None
    kw = dict(temperature=temperature, return_entropy=entropy, chunk_size=chunk)
    outs_t, grads_t = run("triton", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    outs_r, grads_r = run("torch", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    outs_o, grads_o = oracle_run((hidden, weight, bias, targets, g_logp, g_ent), **kw)
    for got in outs_t:
        assert got is None or got.dtype == torch.float32
    all_close_to_oracle(outs_t, outs_r, outs_o, "outputs")
    for got, want in zip(grads_t, grads_r):
        if want is not None:
            assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:  # bf16 gradients: test_low_precision_gradients_...
        all_close_to_oracle(grads_t, grads_r, grads_o, "gradients")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "use_bias, temperature, entropy, chunk",
    [(True, 0.7, True, 16), (False, 1.0, False, None), (True, 1.3, False, 5)],
)
def test_low_precision_gradients_within_one_rounding_of_dz(
    dtype, use_bias, temperature, entropy, chunk
):
    """bf16/fp16 hidden and weight: the backward rounds dz / T once to the input dtype, then
    GEMMs with exact products and fp32 sums. Rounding dz_ij (1 + d_ij), |d_ij| <= u, moves
    d hidden_ik = sum_j dz_ij w_jk / T by at most u sum_j |dz_ij / T| |w_jk| (+ the subnormal
    absolute error s per term), i.e. bound = (u |dz / T| + s) @ |W|; d weight likewise with
    |h|; d bias is summed from the unrounded fp32 dz (bound 0). Compared with the fp32
    reference fed the same 16-bit values."""
    hidden, weight, bias, targets, g_logp, g_ent = inputs(dtype)
    bias = bias if use_bias else None
    kw = dict(temperature=temperature, return_entropy=entropy, chunk_size=chunk)
    _, grads_t = run("triton", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    f32 = [None if t is None else t.float() for t in (hidden, weight, bias)]
    _, grads_r = run("torch", *f32, targets, g_logp, g_ent, **kw)
    _, grads_o = oracle_run((*f32, targets, g_logp, g_ent), **kw)
    dz = logit_grad_oracle(*f32, targets, g_logp, g_ent if entropy else None, temperature)
    per_entry = UNIT_ROUNDOFF[dtype] * dz.abs() + SUBNORMAL_HALF_SPACING[dtype]
    bounds = [per_entry @ f32[1].double().abs(), per_entry.T @ f32[0].double().abs(), 0.0]
    for got, want, oracle, bound in zip(grads_t, grads_r, grads_o, bounds):
        if want is not None:
            assert got.dtype == dtype
            assert_within_one_dz_rounding(got, want, oracle, bound)
    # the bound is informative: well below the gradients' own size
    assert bounds[0].max() < 0.02 * grads_r[0].abs().max()


def test_low_precision_backward_really_rounds_dz():
    """The fp32 gradients of the bf16 path differ from the exact fp32 path (same values) by more
    than fp32 rounding: dz goes through bf16 (so the test above is not vacuous)."""
    hidden, weight, _, targets, g_logp, _ = inputs(torch.bfloat16)
    logp, lse, ent = logprobs_ops.lse_forward(hidden, weight, targets, None, 1.0, False)
    args = (g_logp, None)
    rest = (targets, None, lse, ent, 1.0, 16, True, True, False)
    low = logprobs_ops.lse_backward(*args, hidden, weight, *rest)
    exact = logprobs_ops.lse_backward(*args, hidden.float(), weight.float(), *rest)
    for got, want in zip(low[:2], exact[:2]):
        # fp32 alone (V-term sums of |dz w| <= ~1 per term) differs by at most 2 sum_error;
        # the bf16 dz rounding moves some entry by far more.
        fp32_bound = 2 * sum_error(torch.float32, VOCAB, want.abs().max().item() * VOCAB)
        assert (got - want).abs().max() > fp32_bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logit_gradient_is_rounded_once_to_nearest_even(dtype):
    """The low-precision dz buffer equals the fp32 dz buffer of the same kernel rounded by
    torch (round to nearest, ties to even) bit for bit; d bias is the fp32 column sum."""
    hidden, weight, bias, targets, g_logp, g_ent = inputs(dtype)
    lse = torch.logsumexp((hidden.float() @ weight.float().T + bias.float()) / 0.7, dim=1)
    probs = torch.softmax((hidden.float() @ weight.float().T + bias.float()) / 0.7, dim=1)
    entropy = -(probs * probs.log()).sum(1)
    buffers, bias_grads = {}, {}
    for buffer_dtype in (torch.float32, dtype):
        buffers[buffer_dtype] = torch.empty(ROWS, VOCAB, dtype=buffer_dtype)
        bias_grads[buffer_dtype] = torch.zeros(VOCAB)
        logprobs_ops.logit_grad_chunk(
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            g_logp,
            g_ent,
            1 / 0.7,
            buffers[buffer_dtype],
            bias_grads[buffer_dtype],
        )
    assert torch.equal(buffers[dtype], buffers[torch.float32].to(dtype))
    assert not torch.equal(buffers[dtype].float(), buffers[torch.float32])
    assert torch.equal(bias_grads[dtype], bias_grads[torch.float32])
    args = (hidden, weight, bias, targets, g_logp, g_ent, 0.7)
    oracle = logit_grad_oracle(*args)
    bound = dz_error_bound(*args, lse, entropy)
    assert_within(buffers[torch.float32], oracle, bound, "fp32 dz buffer")
    # d bias: the column sums of the fp32 dz (each off by <= bound) summed over ROWS in fp32
    col_bound = bound.sum(0) + sum_error(torch.float32, ROWS, (oracle.abs() + bound).sum(0))
    assert_within(bias_grads[dtype], oracle.sum(0), col_bound, "d bias")


# Relative error of one fp32 exp as implemented by numpy / torch's vectorised paths (they claim
# <= 1-4 ulp; 4 ulp = 8 u).
EXP_REL_ERR = 8 * unit_roundoff(torch.float32)


def dz_error_bound(hidden, weight, bias, targets, g_logp, g_ent, temperature, lse, entropy):
    """Elementwise a-priori bound on |dz32 - dz| for the kernel's fp32 ``dz / T`` [M, V] given
    fp32 ``lse`` and ``entropy`` inputs (their own errors, measured against fp64, are inputs
    to the bound, not tolerances).

    z = (h . w + b) / T: an (H + 1)-term fp32 sum of products plus the scaling, error
    e_z = sum_error(fp32, 2H + 2, (|h| . |w| + |b|) / T) + u |z|; s = z - lse: e_s = e_z +
    |lse32 - lse| + u |s|; p = exp(s): e_p = p (e^{e_s} - 1 + EXP_REL_ERR); coef = g + e (s + H):
    e_c = |e| (e_s + |H32 - H| + u (|s| + |H|)) + 2u |coef|; dz = (g 1[j = t] - p coef) / T:
    e_dz = (e_p |coef| + (p + e_p) e_c) / T + 3u |dz| (product, difference, scaling)."""
    u = unit_roundoff(torch.float32)
    h, w, b = hidden.double(), weight.double(), bias.double()
    z = (h @ w.T + b) / temperature
    e_z = sum_error(
        torch.float32, 2 * h.shape[1] + 2, (h.abs() @ w.abs().T + b.abs()) / temperature
    )
    e_z = e_z + u * z.abs()
    lse64 = torch.logsumexp(z, 1, keepdim=True)
    s = z - lse64
    p = s.exp()
    ent64 = -(p * s).sum(1, keepdim=True)
    e_s = e_z + (lse.double()[:, None] - lse64).abs() + u * s.abs()
    e_p = p * (torch.expm1(e_s) + EXP_REL_ERR)
    e, g = g_ent.double()[:, None], g_logp.double()[:, None]
    coef = g + e * (s + ent64)
    e_h = (entropy.double()[:, None] - ent64).abs()
    e_c = e.abs() * (e_s + e_h + u * (s.abs() + ent64.abs())) + 2 * u * coef.abs()
    onehot = torch.nn.functional.one_hot(targets, w.shape[0]).double()
    dz = (g * onehot - p * coef) / temperature
    return (e_p * coef.abs() + (p + e_p) * e_c) / temperature + 3 * u * dz.abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("size_p, size_k, size_q", [(70, 45, 81), (600, 7, 130)])
def test_gemm_into_matches_fp32_products(dtype, transpose_a, size_p, size_k, size_q):
    """C (+)= A @ B with fp32 accumulation, strided operands, sizes not multiples of the
    blocks (600 rows = 10 row tiles: one full launch group of GROUP_P = 8 and a partial
    one); 16-bit operands: products of the same values in fp32 (exact per product)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(size_p, size_k, generator=gen).to(dtype)
    a = a.t().contiguous().t() if transpose_a else a  # column-major view, same values
    b = torch.randn(size_k, size_q, generator=gen).to(dtype)
    c0 = torch.randn(size_p, size_q, generator=gen)
    expected = a.double() @ b.double()
    abs_sum = a.double().abs() @ b.double().abs()  # sum_k |a_ik b_kj| per entry
    out = torch.full((size_p, size_q), float("nan"))
    logprobs_ops.gemm_into(a, b, out, accumulate=False)  # overwrites (nan never read)
    # size_k products (rounded in fp32 unless 16-bit) summed in fp32, any order
    assert_within(out, expected, sum_error(torch.float32, 2 * size_k, abs_sum), "C = A @ B")
    out = c0.clone()
    logprobs_ops.gemm_into(a, b, out, accumulate=True)
    bound = sum_error(torch.float32, 2 * size_k + 1, abs_sum + c0.double().abs())
    assert_within(out, c0.double() + expected, bound, "C += A @ B")


def test_mixed_dtypes_keep_fp32_gemms():
    """bf16 hidden with an fp32 weight: fp32 dz and GEMMs, so only the final cast of d hidden
    to bf16 rounds (bound 0 for the logit gradient)."""
    hidden, weight, bias, targets, g_logp, g_ent = inputs(torch.float32)
    hidden = hidden.to(torch.bfloat16)
    kw = dict(temperature=0.9, return_entropy=True, chunk_size=16)
    _, grads_t = run("triton", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    _, grads_r = run("torch", hidden.float(), weight, bias, targets, g_logp, g_ent, **kw)
    assert grads_t[0].dtype == torch.bfloat16 and grads_t[1].dtype == torch.float32
    _, grads_o = oracle_run((hidden.float(), weight, bias, targets, g_logp, g_ent), **kw)
    for got, want, oracle in zip(grads_t, grads_r, grads_o):
        assert_within_one_dz_rounding(got, want, oracle, 0.0)


def test_gemm_dtype_follows_inputs():
    x = {d: torch.zeros(2, 2, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16)}
    assert logprobs_ops.gemm_dtype(x[torch.bfloat16], x[torch.bfloat16]) == torch.bfloat16
    assert logprobs_ops.gemm_dtype(x[torch.float16], x[torch.float16]) == torch.float16
    assert logprobs_ops.gemm_dtype(x[torch.float32], x[torch.float32]) == torch.float32
    assert logprobs_ops.gemm_dtype(x[torch.bfloat16], x[torch.float32]) == torch.float32
    assert logprobs_ops.gemm_dtype(x[torch.bfloat16], x[torch.float16]) == torch.float32


def test_entropy_only_gradient_and_uniform_logits():
    """Zero weight: uniform distribution, logp = -log V and entropy = log V exactly-ish."""
    hidden, _, _, targets, _, g_ent = inputs(torch.float32, rows=20)
    weight = torch.zeros(VOCAB, WIDTH)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    expected = torch.full((20,), torch.log(torch.tensor(float(VOCAB))).item())
    torch.testing.assert_close(-logp, expected)
    torch.testing.assert_close(ent, expected)
    hidden, weight, bias, targets, g_logp, g_ent = inputs(torch.float32, rows=20)
    h_t, h_r = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    linear_logprobs(h_t, weight, targets, return_entropy=True, impl="triton")[1].sum().backward()
    linear_logprobs(h_r, weight, targets, return_entropy=True, impl="torch")[1].sum().backward()
    h_o = hidden.double().requires_grad_()
    linear_logprobs(h_o, weight.double(), targets, return_entropy=True)[1].sum().backward()
    assert_close_to_oracle(h_t.grad, h_o.grad, h_r.grad, msg="d hidden")


def test_large_logits_are_stable():
    hidden, weight, bias, targets, g_logp, g_ent = inputs(torch.float32, rows=16)
    kw = dict(return_entropy=True, temperature=0.05)  # logits ~ 1e2: exp overflows without max
    outs_t, grads_t = run("triton", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    outs_r, grads_r = run("torch", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    outs_o, grads_o = oracle_run((hidden, weight, bias, targets, g_logp, g_ent), **kw)
    for got in outs_t + grads_t:
        assert torch.isfinite(got).all()
    all_close_to_oracle(outs_t + grads_t, outs_r + grads_r, outs_o + grads_o, "logits ~1e2")


def test_fp64_runs_the_reference():
    hidden, weight, _, targets, _, _ = inputs(torch.float64, rows=3)
    h = hidden[:, :8].clone().requires_grad_()
    w = weight[:11, :8].clone()
    t = targets % 11
    assert torch.autograd.gradcheck(lambda x: linear_logprobs(x, w, t, impl="triton"), (h,))


def test_registered_ops_pass_opcheck_and_trace_fullgraph():
    hidden, weight, bias, targets, _, _ = inputs(torch.float32, rows=18)
    hidden, weight = hidden[:, :16], weight[:70, :16]
    targets = targets % 70
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias[:70]))
    torch.library.opcheck(logprobs_ops.linear_logprobs_op, (h, w, targets, b, 0.8, True, 8))
    torch.library.opcheck(logprobs_ops.linear_logprobs_op, (h, w, targets, None, 1.0, False, 32))

    def f(x):
        logp, _, ent = logprobs_ops.linear_logprobs_op(x, w, targets, b, 0.8, True, 8)
        return logp.sum() + 0.5 * ent.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(h).backward()
    leaves = []
    for dtype in (torch.float32, torch.float64):  # torch's fp32 reference and the fp64 oracle
        leaf = hidden.detach().to(dtype).clone().requires_grad_()
        logp, ent = linear_logprobs(
            leaf,
            w.detach().to(dtype),
            targets,
            bias=b.detach().to(dtype),
            temperature=1.25,
            return_entropy=True,
            impl="torch",
        )
        (logp.sum() + 0.5 * ent.sum()).backward()
        leaves.append(leaf)
    assert_close_to_oracle(h.grad, leaves[1].grad, leaves[0].grad, msg="d hidden")
