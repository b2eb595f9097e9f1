"""C++ backend (impl="cpp") of step_gae, discounted_returns, whiten and group_advantages
against the torch reference: every layout edge case (one-step trajectories, empty
trajectories and batches, 5000-step and 130k-token trajectories split across thread-pool chunks),
every input dtype, int32/int64 offsets, fp64 gradchecks and gradients at multi-chunk sizes."""

import pytest
import torch
from _cpp_helpers import FLOAT_DTYPES, assert_matches, fp64, requires_cpp
from _csr import LAYOUTS, layout, offsets
from _tolerance import pair_tol

import steppo_fast as sf
from steppo_fast import reference as ref

pytestmark = requires_cpp


def scan_inputs(name, dtype, index_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = layout(name, gen)
    cu = offsets(lengths, index_dtype)
    n, b = int(cu[-1]), lengths.numel()
    rewards = torch.randn(n, generator=gen).to(dtype)
    values = torch.randn(n, generator=gen).to(dtype)
    last = torch.randn(b, generator=gen).to(dtype)
    return rewards, values, cu, last


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_step_gae_matches_reference(name, dtype):
    r, v, cu, last = scan_inputs(name, dtype)
    for gamma, lam, lv in [(1.0, 1.0, None), (0.99, 0.95, last), (0.0, 0.5, last)]:
        adv, ret = sf.step_gae(r, v, cu, gamma=gamma, lam=lam, last_values=lv, impl="cpp")
        want_adv, want_ret = ref.step_gae(
            *fp64(r, v), cu, gamma=gamma, lam=lam, last_values=fp64(lv)[0]
        )
        assert_matches(adv, want_adv, dtype)
        assert_matches(ret, want_ret, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_discounted_returns_matches_reference(name, dtype):
    r, _, cu, last = scan_inputs(name, dtype)
    for gamma, lv in [(1.0, None), (0.97, last), (0.0, last)]:
        got = sf.discounted_returns(r, cu, gamma=gamma, last_values=lv, impl="cpp")
        want = ref.discounted_returns(fp64(r)[0], cu, gamma=gamma, last_values=fp64(lv)[0])
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("name", ["ragged_with_empty", "long_tokens", "many_short"])
def test_scans_int64_offsets_and_mixed_dtypes(name):
    r, v, cu32, last = scan_inputs(name, torch.float32)
    cu64 = cu32.long()
    a32, r32 = sf.step_gae(r, v, cu32, gamma=0.9, lam=0.8, last_values=last, impl="cpp")
    a64, r64 = sf.step_gae(r, v, cu64, gamma=0.9, lam=0.8, last_values=last, impl="cpp")
    assert torch.equal(a32, a64) and torch.equal(r32, r64)
    # bf16 rewards with fp32 values, fp64 bootstrap: computed (and returned) in fp64
    got, _ = sf.step_gae(
        r.bfloat16(), v, cu64, gamma=0.9, lam=0.8, last_values=last.double(), impl="cpp"
    )
    want, _ = ref.step_gae(
        *fp64(r.bfloat16(), v), cu64, gamma=0.9, lam=0.8, last_values=last.double()
    )
    assert_matches(got, want, torch.float64)


# ------------------------------------------------------------------------------------- whiten
def whiten_cases(gen):
    x = torch.randn(300, generator=gen)
    mask = torch.rand(300, generator=gen) > 0.4
    one = torch.zeros(300)
    one[17] = 2.0
    big = torch.randn(150_000, generator=gen) * 3 + 5
    return {
        "plain": (x, None),
        "float_mask": (x, mask.float() * torch.rand(300, generator=gen)),
        "bool_mask": (x, mask),
        "all_zero_weights": (x, torch.zeros(300)),
        "one_counted": (x, one),
        "constant": (torch.full((300,), 1.5), mask),
        "single_entry": (x[:1], None),
        "empty": (x[:0], None),
        "two_dim": (x.reshape(20, 15), mask.reshape(20, 15)),
        "multi_chunk": (big, torch.rand(150_000, generator=gen) > 0.5),
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "float_mask",
        "bool_mask",
        "all_zero_weights",
        "one_counted",
        "constant",
        "single_entry",
        "empty",
        "two_dim",
        "multi_chunk",
    ],
)
def test_whiten_matches_reference(case, dtype):
    x, weight = whiten_cases(torch.Generator().manual_seed(1))[case]
    x = x.to(dtype)
    for eps in (1e-8, 0.1):
        got = sf.whiten(x, weight, eps=eps, impl="cpp")
        want = ref.whiten(fp64(x)[0], weight, eps=eps)
        assert got.shape == x.shape
        if case == "constant":  # (x - mean) / eps: 0 on counted entries, exactly
            assert torch.all(got[weight] == 0)
        assert_matches(got, want, dtype)


# --------------------------------------------------------------------------- group advantages
def group_inputs(kind, gen):
    if kind == "contiguous":
        ids = torch.arange(64).repeat_interleave(8)
    elif kind == "sparse_ids":  # huge / negative ids: the sorting path
        ids = torch.tensor([-(2**62), 5, 2**62, 7, 5]).repeat(40)
    elif kind == "with_singletons":
        ids = torch.cat([torch.arange(30), torch.randint(100, 105, (70,), generator=gen)])
    elif kind == "all_singletons":
        ids = torch.arange(50) * 3
    elif kind == "equal_scores":
        ids = torch.zeros(10, dtype=torch.int64)
    else:
        ids = torch.zeros(0, dtype=torch.int64)
    scores = torch.randn(ids.numel(), generator=gen)
    if kind == "equal_scores":
        scores = torch.full((10,), 0.25)
    perm = torch.randperm(ids.numel(), generator=gen)
    return scores[perm], ids[perm]


GROUP_KINDS = [
    "contiguous",
    "sparse_ids",
    "with_singletons",
    "all_singletons",
    "equal_scores",
    "empty",
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_group_advantages_matches_reference(kind, mode, dtype):
    scores, ids = group_inputs(kind, torch.Generator().manual_seed(2))
    scores = scores.to(dtype)
    for index_dtype in (torch.int64, torch.int32):
        if kind == "sparse_ids" and index_dtype == torch.int32:
            continue
        got = sf.group_advantages(scores, ids.to(index_dtype), mode=mode, impl="cpp")
        want = ref.group_advantages(fp64(scores)[0], ids, mode=mode)
        assert_matches(got, want, dtype)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["long_tokens", "many_short"])
def test_discounted_returns_gradient_multi_chunk(name):
    r, _, cu, last = scan_inputs(name, torch.float32)
    grad = torch.randn(r.numel(), generator=torch.Generator().manual_seed(4))
    grads = []
    for impl, dtype in (("cpp", torch.float32), ("torch", torch.float64)):
        rr = r.to(dtype).requires_grad_()
        ll = last.to(dtype).requires_grad_()
        out = sf.discounted_returns(rr, cu, gamma=0.999, last_values=ll, impl=impl)
        grads.append(torch.autograd.grad(out, (rr, ll), grad.to(dtype)))
    for got, want in zip(*grads):
        assert_matches(got, want, torch.float32)


@pytest.mark.parametrize(
    "case", ["plain", "float_mask", "all_zero_weights", "one_counted", "constant", "two_dim"]
)
def test_whiten_gradcheck(case):
    x, weight = whiten_cases(torch.Generator().manual_seed(5))[case]
    x = x[:12] if x.dim() == 1 else x[:3, :4]
    weight = None if weight is None else (weight[:12] if weight.dim() == 1 else weight[:3, :4])
    if case == "one_counted":
        weight = torch.zeros(12)
        weight[3] = 1.0
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sf.whiten(x, weight, eps=1e-3, impl="cpp"), (x,))
    if case == "constant":  # zero std: finite gradients equal to the reference's
        grad = torch.randn(x.shape, dtype=torch.float64)
        got = torch.autograd.grad(sf.whiten(x, weight, impl="cpp"), x, grad)[0]
        want = torch.autograd.grad(ref.whiten(x, weight), x, grad)[0]
        # fp64 on both sides: mean, std and the chain rule over 12 entries (~50 roundings)
        atol, rtol = pair_tol(torch.float64, 50, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_whiten_gradient_multi_chunk():
    x, weight = whiten_cases(torch.Generator().manual_seed(6))["multi_chunk"]
    grad = torch.randn(x.numel(), generator=torch.Generator().manual_seed(7))
    grads = []
    for impl, dtype in (("cpp", torch.float32), ("torch", torch.float64)):
        xx = x.to(dtype).requires_grad_()
        grads.append(torch.autograd.grad(sf.whiten(xx, weight, impl=impl), xx, grad.to(dtype))[0])
    assert_matches(grads[0], grads[1], torch.float32)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_zero_std_gradient_matches_reference(mode):
    # (gradchecks on every backend: test_advantages_group.py)
    # equal scores within a group (zero std): gradient equals the reference's
    flat = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1])
    grad = torch.randn(4, dtype=torch.float64)
    got = torch.autograd.grad(sf.group_advantages(flat, ids, mode=mode, impl="cpp"), flat, grad)
    want = torch.autograd.grad(ref.group_advantages(flat, ids, mode=mode), flat, grad)
    # fp64 on both sides: group mean / std and the chain rule over <= 4 entries
    atol, rtol = pair_tol(torch.float64, 20, want[0].abs().max().item())
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_auto_uses_cpp_on_cpu():
    from steppo_fast import _dispatch, cpp

    for op in ("step_gae", "discounted_returns", "whiten", "group_advantages"):
        assert _dispatch.resolve("auto", op, torch.zeros(1)) is cpp
