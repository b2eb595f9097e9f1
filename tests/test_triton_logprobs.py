"""Triton linear_logprobs under the interpreter: forward (online log-sum-exp, entropy) and
backward (recomputed logit tiles) against the torch reference; fp32 and bf16, bias,
temperature, chunking, odd shapes, empty input; registered-op checks."""

import pytest
import torch
from conftest import TOL
from steppo_fast.kernels import logprobs_ops

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


def grad_close(got, want):
    if got.dtype == torch.bfloat16:  # both sides round fp32 sums to bf16: 1 ulp (2^-8 relative)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2**-7)
    else:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


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
    atol, rtol = TOL[dtype]
    for got, want in zip(outs_t, outs_r):
        if want is not None:
            assert got.dtype == torch.float32
            # logits are sums of WIDTH products of size ~1: fp32 rounding of ~1e-6 absolute
            torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol)
    for got, want in zip(grads_t, grads_r):
        if want is not None:
            assert got.dtype == want.dtype == dtype
            grad_close(got, want)


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
    grad_close(h_t.grad, h_r.grad)


def test_large_logits_are_stable():
    hidden, weight, bias, targets, g_logp, g_ent = inputs(torch.float32, rows=16)
    kw = dict(return_entropy=True, temperature=0.05)  # logits ~ 1e2: exp overflows without max
    outs_t, grads_t = run("triton", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    outs_r, grads_r = run("torch", hidden, weight, bias, targets, g_logp, g_ent, **kw)
    for got, want in zip(outs_t + grads_t, outs_r + grads_r):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # logits ~1e2: fp32 ulps


def test_empty_rows():
    hidden = torch.zeros(0, WIDTH, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), impl="triton")
    logp.sum().backward()
    assert logp.shape == (0,) and hidden.grad.shape == (0, WIDTH)
    assert (weight.grad == 0).all()


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
    h_r = hidden.clone().requires_grad_()
    logp, ent = linear_logprobs(
        h_r,
        w.detach(),
        targets,
        bias=b.detach(),
        temperature=1.25,
        return_entropy=True,
        impl="torch",
    )
    (logp.sum() + 0.5 * ent.sum()).backward()
    grad_close(h.grad, h_r.grad)
