"""linear_logprobs on every backend with the op (tests/_impls.py) vs the naive log_softmax +
gather (fp64 truth): hand-checked gradients, gradcheck, bf16, extreme logits, empty input; the
chunked implementation's chunk-size independence and memory (never [M, V]). Every ValueError:
test_logprobs_errors.py."""

import math

import pytest
import torch
from _impls import impl_or_skip, impls_for
from _tolerance import ORACLE_FACTOR, assert_close_to_oracle, pair_tol, unit_roundoff
from conftest import TOL

from steppo_fast import linear_logprobs
from steppo_fast._defs import WORKSPACE_BUDGET_BYTES, default_chunk_rows
from steppo_fast.cpp import logprobs as cpp_logprobs

F64 = torch.float64


def naive(hidden, weight, targets, bias=None, temperature=1.0, dtype=F64):
    """Materialised truth: log_softmax((h @ W.T + b) / T) gathered at targets, and entropy."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    log_p = torch.log_softmax(z, -1)
    logp = log_p.gather(-1, targets.long()[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def make(m=29, h=24, v=77, dtype=torch.float32, scale=1.0, bias=True, grad=False):
    hidden = (torch.randn(m, h) * scale).to(dtype)
    weight = (torch.randn(v, h) / math.sqrt(h)).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    targets = torch.randint(0, v, (m,))
    if grad:
        for x in (hidden, weight, b):
            if x is not None:
                x.requires_grad_(True)
    return hidden, weight, targets, b


def assert_close(actual, expected, dtype):
    """TOL of the dtype (short reductions: H = 24 products, V = 77 classes, <= 37 rows)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_matches_naive(impl, dtype, with_bias, temperature):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(dtype=dtype, bias=with_bias)
    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True, impl=impl
    )
    assert logp.dtype == dtype and entropy.dtype == dtype and logp.shape == (29,)
    want_logp, want_entropy = naive(hidden, weight, targets, bias, temperature)
    assert_close(logp, want_logp, dtype)
    assert_close(entropy, want_entropy, dtype)
    only_logp = linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, impl=impl
    )
    assert isinstance(only_logp, torch.Tensor)
    assert_close(only_logp, want_logp, dtype)


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_hand_computed_case(impl):
    """Two tokens, V = 3, H = 1: logits written out by hand."""
    impl = impl_or_skip("linear_logprobs", impl)
    hidden = torch.tensor([[1.0], [2.0]], dtype=F64)
    weight = torch.tensor([[0.0], [1.0], [-1.0]], dtype=F64)
    targets = torch.tensor([1, 2])
    logp, entropy = linear_logprobs(
        hidden, weight, targets, temperature=2.0, return_entropy=True, chunk_size=1, impl=impl
    )
    z0 = torch.tensor([0.0, 0.5, -0.5], dtype=F64)  # (1 * [0, 1, -1]) / 2
    z1 = torch.tensor([0.0, 1.0, -1.0], dtype=F64)  # (2 * [0, 1, -1]) / 2
    lse0, lse1 = torch.logsumexp(z0, 0), torch.logsumexp(z1, 0)
    assert_close(logp, torch.stack([0.5 - lse0, -1.0 - lse1]), F64)
    p0, p1 = torch.softmax(z0, 0), torch.softmax(z1, 0)
    assert_close(entropy, torch.stack([lse0 - (p0 * z0).sum(), lse1 - (p1 * z1).sum()]), F64)


@pytest.mark.parametrize(
    "hidden_dtype, weight_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
# not triton: its GEMMs take the logit gradient in the input dtype (one more rounding, bounded in
# logprobs/test_triton_logprobs.py::test_low_precision_gradients_within_one_rounding_of_dz)
@pytest.mark.parametrize("impl", [i for i in impls_for("linear_logprobs") if i != "triton"])
def test_low_precision_inputs_match_fp32_truth_on_same_values(impl, hidden_dtype, weight_dtype):
    """bf16/fp16 values are upcast (not rounded), so outputs match the fp32 truth on the same
    low-precision values to fp32 accuracy; gradients are returned in the input dtypes, i.e.
    the truth rounded to nearest: within one ulp of that dtype (2^-7 bf16, 2^-10 fp16)."""
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make()
    hidden = hidden.to(hidden_dtype).requires_grad_(True)
    weight = weight.to(weight_dtype).requires_grad_(True)
    bias = bias.to(weight_dtype).requires_grad_(True)
    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, impl=impl
    )
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    want_logp, want_entropy = naive(hidden.detach(), weight.detach(), targets, bias.detach())
    assert_close(logp, want_logp, torch.bfloat16)
    assert_close(entropy, want_entropy, torch.bfloat16)

    g_logp, g_ent = torch.randn(29), torch.randn(29)
    got = torch.autograd.grad(
        (logp * g_logp).sum() + (entropy * g_ent).sum(), (hidden, weight, bias)
    )
    leaves = [x.detach().to(F64).requires_grad_(True) for x in (hidden, weight, bias)]
    t_logp, t_ent = naive(leaves[0], leaves[1], targets, leaves[2])
    want = torch.autograd.grad((t_logp * g_logp).sum() + (t_ent * g_ent).sum(), leaves)
    # fp32 math first: its error, measured as in assert_close_to_oracle on an fp32 run on the
    # same values, then one rounding to the input dtype (u relative; eps = 2u allowed).
    leaves32 = [x.detach().float().requires_grad_(True) for x in (hidden, weight, bias)]
    logp32, ent32 = linear_logprobs(
        *leaves32[:2], targets, bias=leaves32[2], return_entropy=True, impl=impl
    )
    got32 = torch.autograd.grad((logp32 * g_logp).sum() + (ent32 * g_ent).sum(), leaves32)
    for g, w, x, g32 in zip(got, want, (hidden, weight, bias), got32):
        assert g.dtype == x.dtype
        fp32_err = ORACLE_FACTOR * (g32.double() - w).abs().max().item()
        fp32_err += unit_roundoff(torch.float32) * w.abs().max().item()
        ulp = torch.finfo(x.dtype).eps
        torch.testing.assert_close(g.to(F64), w, rtol=ulp, atol=fp32_err * (1 + ulp))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunk_size_independence(dtype):
    hidden, weight, targets, bias = make(m=37, dtype=dtype, grad=True)
    g_logp, g_ent = torch.randn(37, dtype=dtype), torch.randn(37, dtype=dtype)
    results = []
    for chunk in (1, 3, 16, 37, 64, None):
        logp, entropy = linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            return_entropy=True,
            chunk_size=chunk,
            temperature=1.3,
        )
        grads = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), (hidden, weight, bias))
        results.append((logp, entropy, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, dtype)


@pytest.mark.parametrize("chunk", [300, None])
def test_several_backward_row_blocks_and_vocab_tiles(chunk):
    """M > BACKWARD_TILE_ROWS: d weight / d bias accumulate over row blocks (beta = 1 after the
    first), d hidden over vocabulary tiles."""
    m = cpp_logprobs.BACKWARD_TILE_ROWS + 77
    hidden, weight, targets, bias = make(m=m, h=4, v=50, dtype=F64, grad=True)
    rows, cols = cpp_logprobs.backward_tile(m, 50, chunk or m)
    assert rows == (cpp_logprobs.BACKWARD_TILE_ROWS if chunk else m)
    assert cols < 50 if chunk else cols == 50
    g_logp, g_ent = torch.randn(m, dtype=F64), torch.randn(m, dtype=F64)
    logp, ent = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=chunk
    )
    got = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), (hidden, weight, bias))
    t_logp, t_ent = naive(hidden, weight, targets, bias)
    want = torch.autograd.grad((t_logp * g_logp + t_ent * g_ent).sum(), (hidden, weight, bias))
    assert_close(logp, t_logp, F64)
    for g, w in zip(got, want):  # d weight sums over m > 1000 rows: beyond TOL's 400 roundings
        atol, rtol = pair_tol(F64, m + 50, w.abs().max().item())
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def test_default_chunk_rows_rule():
    budget = WORKSPACE_BUDGET_BYTES
    rows = default_chunk_rows(10**6, 151936)
    assert rows % 64 == 0 and 64 <= rows and rows * 151936 * 4 <= budget
    assert default_chunk_rows(10, 151936) == 10  # never more than M
    assert default_chunk_rows(10**6, 100) * 100 * 4 <= budget
    huge_vocab = budget // 4 // 3  # only 3 rows fit: not rounded up past the budget
    assert default_chunk_rows(10**6, huge_vocab) == 3
    assert default_chunk_rows(10**6, 10 * budget) == 1
    assert default_chunk_rows(10**6, 151936, itemsize=8) * 151936 * 8 <= budget
    # Backward tiles: >= BACKWARD_TILE_ROWS rows (or all), never more elements than the chunk.
    big = cpp_logprobs.BACKWARD_TILE_ROWS
    for m, v, chunk in [(10**5, 151936, 128), (100, 151936, 100), (37, 77, 1), (5000, 50, 2048)]:
        tile_rows, tile_cols = cpp_logprobs.backward_tile(m, v, chunk)
        assert tile_rows == min(m, max(chunk, big))
        assert 1 <= tile_cols <= v and tile_rows * tile_cols <= max(chunk * v, tile_rows)
        assert tile_cols == v or tile_cols < 256 or tile_cols % 256 == 0
    assert cpp_logprobs.backward_tile(100, 151936, 100) == (100, 151936)


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_gradcheck_fp64(impl, return_entropy):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(m=5, h=3, v=7, dtype=F64, grad=True)

    def fn(h, w, b):
        return linear_logprobs(
            h,
            w,
            targets,
            bias=b,
            temperature=0.8,
            return_entropy=return_entropy,
            chunk_size=2,
            impl=impl,
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_gradcheck_entropy_only_fp64(impl):
    """Only the entropy output reaches the loss (grad_logp is None inside backward)."""
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(m=5, h=3, v=7, dtype=F64, grad=True)

    def fn(h, w, b):
        return linear_logprobs(h, w, targets, bias=b, return_entropy=True, chunk_size=2, impl=impl)[
            1
        ]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("use", ["both", "logp", "entropy"])
@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_gradients_vs_naive_autograd(impl, dtype, use):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(m=33, dtype=dtype, grad=True)
    g_logp = torch.randn(33, dtype=dtype)
    g_ent = torch.randn(33, dtype=dtype)
    logp, entropy = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=0.9,
        return_entropy=True,
        chunk_size=8,
        impl=impl,
    )
    leaves = [x.detach().to(F64).requires_grad_(True) for x in (hidden, weight, bias)]
    t_logp, t_ent = naive(*leaves[:2], targets, leaves[2], 0.9)
    got_terms, want_terms = [], []
    if use in ("both", "logp"):
        got_terms.append((logp * g_logp).sum())
        want_terms.append((t_logp * g_logp.to(F64)).sum())
    if use in ("both", "entropy"):
        got_terms.append((entropy * g_ent).sum())
        want_terms.append((t_ent * g_ent.to(F64)).sum())
    got = torch.autograd.grad(sum(got_terms), (hidden, weight, bias))
    want = torch.autograd.grad(sum(want_terms), leaves)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, w, dtype)


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_frozen_weight_and_frozen_hidden(impl):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(grad=False)
    hidden.requires_grad_(True)
    linear_logprobs(hidden, weight, targets, bias=bias, impl=impl).sum().backward()
    assert weight.grad is None and bias.grad is None
    leaf = hidden.detach().to(F64).requires_grad_(True)
    naive(leaf, weight, targets, bias)[0].sum().backward()
    assert_close(hidden.grad, leaf.grad, torch.float32)

    hidden.requires_grad_(False)
    weight.requires_grad_(True)
    linear_logprobs(hidden, weight, targets, chunk_size=5, impl=impl).sum().backward()
    w_leaf = weight.detach().to(F64).requires_grad_(True)
    naive(hidden, w_leaf, targets)[0].sum().backward()
    assert_close(weight.grad, w_leaf.grad, torch.float32)


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_extreme_logits_stay_finite(impl):
    """Logits of magnitude ~1e3 (saturated softmax): no NaN/inf anywhere, matches fp64 truth."""
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(scale=1e3, grad=True)
    targets[::2] = (hidden.detach() @ weight.detach().T).argmax(-1)[::2]  # some near-certain
    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, impl=impl
    )
    g = torch.randn(29)
    grads = torch.autograd.grad((logp * g + entropy * g.flip(0)).sum(), (hidden, weight, bias))
    for x in (logp, entropy, *grads):
        assert torch.isfinite(x).all()
    args = (hidden.detach(), weight.detach(), targets, bias.detach())
    want_logp, want_entropy = naive(*args)
    ref_logp, ref_entropy = naive(*args, dtype=torch.float32)  # torch's own fp32 error
    assert_close_to_oracle(logp, want_logp, ref_logp, msg="logp")
    # the fp64 entropy is >= 0, so this also bounds how negative rounding can make it
    assert_close_to_oracle(entropy, want_entropy, ref_entropy, msg="entropy")


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_empty_rows(impl, return_entropy):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make(m=0, grad=True)
    out = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=return_entropy, impl=impl
    )
    outs = out if return_entropy else (out,)
    for o in outs:
        assert o.shape == (0,) and o.dtype == torch.float32
    sum(o.sum() for o in outs).backward()
    assert hidden.grad.shape == (0, 24)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_real_vocab_rows_in_place_kernels():
    """V = 151936 (Qwen2 vocabulary): the in-place row softmax / log_softmax kernels and the
    oneDNN products on long rows, logp + entropy + all gradients vs the fp64 truth."""
    hidden, weight, targets, bias = make(m=3, h=8, v=151936, grad=True)
    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True, chunk_size=2
    )
    g_logp, g_ent = torch.randn(3), torch.randn(3)
    got = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), (hidden, weight, bias))
    leaves = [x.detach().to(F64).requires_grad_(True) for x in (hidden, weight, bias)]
    t_logp, t_ent = naive(leaves[0], leaves[1], targets, leaves[2], 0.7)
    want = torch.autograd.grad((t_logp * g_logp + t_ent * g_ent).sum(), leaves)
    # V-long reductions (far beyond TOL's): against torch's own fp32 error on the same inputs
    leaves32 = [x.detach().float().requires_grad_(True) for x in (hidden, weight, bias)]
    r_logp, r_ent = naive(leaves32[0], leaves32[1], targets, leaves32[2], 0.7, dtype=torch.float32)
    ref = torch.autograd.grad((r_logp * g_logp + r_ent * g_ent).sum(), leaves32)
    assert_close_to_oracle(logp, t_logp, r_logp, msg="logp")
    assert_close_to_oracle(entropy, t_ent, r_ent, msg="entropy")
    for g, w, r in zip(got, want, ref):
        assert_close_to_oracle(g, w, r, msg="gradient")


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_noncontiguous_hidden(impl):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, bias = make()
    hidden_t = hidden.T.contiguous().T
    assert not hidden_t.is_contiguous()
    logp = linear_logprobs(hidden_t, weight, targets, bias=bias, chunk_size=7, impl=impl)
    assert_close(logp, naive(hidden, weight, targets, bias)[0], torch.float32)


@pytest.mark.parametrize("impl", impls_for("linear_logprobs"))
def test_int32_targets_and_noncontiguous_weight(impl):
    impl = impl_or_skip("linear_logprobs", impl)
    hidden, weight, targets, _ = make(bias=False)
    weight_t = weight.T.contiguous().T  # same values, column-major storage
    assert not weight_t.is_contiguous()
    logp = linear_logprobs(hidden, weight_t, targets.int(), chunk_size=4, impl=impl)
    assert_close(logp, naive(hidden, weight, targets)[0], torch.float32)


def test_auto_runs_the_cpu_backend_of_the_dispatch_rule():
    """On CPU tensors ``impl="auto"`` runs the cpp backend (its tuned linear_logprobs) when it
    is built, else the reference."""
    from steppo_fast import _dispatch, reference

    hidden = torch.zeros(1, 1)
    cpp = "cpp" in _dispatch.available_impls("linear_logprobs", "cpu")
    want = _dispatch._module("cpp") if cpp else reference
    assert _dispatch.resolve("auto", "linear_logprobs", hidden) is want


@pytest.mark.parametrize("impl", ["triton", "cpp"])
def test_other_backends_agree_with_the_reference(impl):
    """A distinct backend (Triton under the interpreter, C++ if it has the op) gives the
    reference's log-probs, entropy and gradients (fp32 tolerance, both against fp64 truth)."""
    from steppo_fast import _dispatch

    if impl not in _dispatch.available_impls("linear_logprobs", "cpu"):
        pytest.skip(f"{impl} has no CPU linear_logprobs here")
    results = {}
    for name in ("torch", impl):
        torch.manual_seed(1)
        hidden, weight, targets, bias = make(grad=True)
        logp, entropy = linear_logprobs(
            hidden, weight, targets, bias=bias, return_entropy=True, impl=name
        )
        (logp.square().sum() + entropy.sum()).backward()
        results[name] = (logp, entropy, hidden.grad, weight.grad, bias.grad)
    want_logp, want_entropy = naive(hidden, weight, targets, bias)
    assert_close(results[impl][0], want_logp, torch.float32)
    assert_close(results[impl][1], want_entropy, torch.float32)
    for got, ref in zip(results[impl], results["torch"]):
        assert_close(got, ref, torch.float32)


def test_never_materialises_full_logits():
    """The largest allocation during forward + backward is the [chunk, V] buffer (or the
    [V, H] weight gradient), never [M, V]."""
    m, h, v, chunk = 128, 8, 1024, 16
    hidden, weight, targets, bias = make(m=m, h=h, v=v, grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        logp, entropy = linear_logprobs(
            hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=chunk
        )
        (logp.sum() + entropy.sum()).backward()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes, "profiler recorded no allocations"
    assert max(sizes) <= max(chunk * v * 4, v * h * 4) + 4096
    assert max(sizes) < m * v * 4 // 4
