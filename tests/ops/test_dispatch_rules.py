"""The backend choice (steppo_fast/_dispatch.py): the fallback rule table and the explicit-impl
errors (that no backend imports the reference is checked in test_import_graph.py).

A rerouted call must give exactly the reference's result (the same code runs), so values are
compared with ``torch.equal``; a call that is not rerouted is checked to reach its backend."""

import pytest
import torch
from _cpp_helpers import requires_cpp
from _csr import offsets

import steppo_fast as sf
from steppo_fast import _dispatch, reference
from steppo_fast._dispatch import Facts, choose

F64 = torch.float64


def _has(impl: str, op: str = "segment_sum") -> bool:
    return impl in _dispatch.available_impls(op, "cpu")


requires_triton = pytest.mark.skipif(
    not _has("triton"), reason="triton (under TRITON_INTERPRET=1) is not available here"
)


def _loss_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_steps, cu_trajs = offsets([2, 1, 3, 2]), offsets([2, 2])
    old = -torch.rand(8, generator=gen, dtype=F64)
    return dict(
        logp=(old + 0.3 * torch.randn(8, generator=gen, dtype=F64)).to(dtype),
        old_logp=old.to(dtype),
        advantages=torch.randn(4, generator=gen, dtype=F64).to(dtype),
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
    )


def test_rule_table_is_readable():
    """Every rule names its op, the backend it redirects, the target and a reason."""
    assert _dispatch.RULES, "the fallback table is empty"
    for rule in _dispatch.RULES:
        assert rule.backend in _dispatch.MODULES and rule.to in _dispatch.MODULES
        assert rule.op == "*" or hasattr(reference, rule.op)
        assert rule.to == "torch"  # the reference runs everything
        assert len(rule.reason) > 20


def test_choose_applies_the_rules_to_facts():
    cpu = dict(device_type="cpu")
    if _has("triton"):
        fp64 = Facts(**cpu, fp64=True, grad_after_first=False)
        assert choose("triton", "segment_sum", fp64)[0] == "torch"
        fp32 = Facts(**cpu, fp64=False, grad_after_first=True)
        assert choose("triton", "segment_sum", fp32) == ("triton", "impl='triton'")
    if _has("cpp"):
        plain = Facts(**cpu, fp64=True, grad_after_first=False)
        assert choose("cpp", "step_policy_loss", plain)[0] == "cpp"  # C++ computes fp64 itself
        grads = Facts(**cpu, fp64=False, grad_after_first=True)
        backend, why = choose("cpp", "step_policy_loss", grads)
        assert backend == "torch" and "logp" in why
        assert choose("auto", "step_policy_loss", grads)[0] == "torch"
        assert choose("cpp", "segment_sum", grads)[0] == "cpp"  # the rule is the loss's only


@requires_triton
@pytest.mark.parametrize(
    "op",
    ["segment_sum", "segment_mean", "segment_broadcast", "step_gae", "discounted_returns"],
)
def test_fp64_on_triton_runs_the_reference(op):
    cu = offsets([2, 0, 3, 1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, generator=gen, dtype=F64)
    y = torch.randn(4, generator=gen, dtype=F64)
    calls = {
        "segment_sum": lambda impl: sf.segment_sum(x, cu, impl=impl),
        "segment_mean": lambda impl: sf.segment_mean(x, cu, impl=impl),
        "segment_broadcast": lambda impl: sf.segment_broadcast(y, cu, impl=impl),
        "step_gae": lambda impl: sf.step_gae(
            y, y.flip(0), offsets([3, 1]), gamma=0.9, lam=0.8, impl=impl
        ),
        "discounted_returns": lambda impl: sf.discounted_returns(
            y, offsets([3, 1]), gamma=0.9, impl=impl
        ),
    }
    assert _dispatch.resolve("triton", op, x) is reference
    assert _dispatch.resolve("triton", op, x.float()) is _dispatch._module("triton")
    got, want = calls[op]("triton"), calls[op]("torch")
    got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
    for g, w in zip(got, want):
        assert g.dtype == F64 and torch.equal(g, w)


@requires_triton
def test_fp64_linear_logprobs_and_loss_on_triton_run_the_reference():
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(7, 3, dtype=F64)
    targets = torch.randint(0, 7, (5,), generator=gen)
    results = [
        sf.linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        for impl in ("triton", "torch")
    ]
    for g, w in zip(*results):
        assert g.dtype == F64 and torch.equal(g, w)
    batch = _loss_inputs(F64)
    options = dict(ratio_level="trajectory", agg="traj-mean", dual_clip=2.0)
    got = sf.step_policy_loss(**batch, **options, impl="triton", stats="tensor")
    want = sf.step_policy_loss(**batch, **options, impl="torch", stats="tensor")
    assert got[0].dtype == F64 and torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])


@requires_cpp
def test_cpp_loss_with_other_gradients_runs_the_reference():
    from steppo_fast import cpp

    batch = _loss_inputs()
    logp = batch.pop("logp").requires_grad_()
    adv = batch.pop("advantages").requires_grad_()
    assert _dispatch.resolve("cpp", "step_policy_loss", logp, batch["old_logp"], adv) is reference
    assert _dispatch.resolve("cpp", "step_policy_loss", logp, batch["old_logp"]) is cpp
    with torch.no_grad():
        assert _dispatch.resolve("cpp", "step_policy_loss", logp, adv) is cpp
    options = dict(kl_coef=0.0, dual_clip=3.0)
    got = sf.step_policy_loss(logp, advantages=adv, **batch, **options, impl="cpp")[0]
    want = sf.step_policy_loss(logp, advantages=adv, **batch, **options, impl="torch")[0]
    assert torch.equal(got, want)
    g_got = torch.autograd.grad(got, (logp, adv))
    g_want = torch.autograd.grad(want, (logp, adv))
    assert all(torch.equal(a, b) for a, b in zip(g_got, g_want))


@requires_cpp
def test_cpp_computes_fp64_itself():
    from steppo_fast import cpp

    x = torch.randn(6, dtype=F64)
    assert _dispatch.resolve("cpp", "segment_sum", x) is cpp
    assert _dispatch.resolve("auto", "segment_sum", x) is cpp


def test_explicit_impl_errors_name_the_reason_and_the_alternatives():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"impl: 'cuda' is not one of 'auto', 'torch'"):
        _dispatch.resolve("cuda", "segment_sum", x)
    with pytest.raises(ValueError, match=r"impl: 'triton' is unavailable for kl_penalty"):
        sf.kl_penalty(x, x, impl="triton")
    if _has("cpp"):
        with pytest.raises(
            ValueError,
            match=r"impl: 'cpp' is unavailable for value_loss \(cpp has no implementation of "
            r"value_loss\); available: torch",
        ):
            sf.value_loss(x, x, x, impl="cpp")
        with pytest.raises(ValueError, match="cpp runs on CPU tensors only, got meta tensors"):
            _dispatch.resolve("cpp", "segment_sum", torch.zeros(3, device="meta"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not _has("triton"):
        pytest.skip("triton is not available here")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="triton needs CUDA tensors, or TRITON_INTERPRET=1"):
        sf.segment_sum(torch.zeros(3), offsets([3]), impl="triton")


@requires_triton
def test_rules_hold_under_torch_compile():
    """The choice is a trace-time constant: fp64 on Triton still runs the reference."""
    cu = offsets([2, 0, 3, 1])
    x = torch.randn(6, dtype=F64)

    def f(x):
        return sf.segment_mean(x, cu, impl="triton") * 2.0

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert got.dtype == F64 and torch.equal(got, reference.segment_mean(x, cu) * 2.0)
