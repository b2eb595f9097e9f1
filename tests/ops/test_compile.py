"""The public ops under ``torch.compile(fullgraph=True, backend="aot_eager")`` for every backend
(torch reference, C++, Triton under the interpreter): forward and backward equal to eager on tiny
shapes. Also the compile policy itself: value checks are skipped while tracing (metadata checks
are not), ``step_policy_loss(stats="float")`` and ``segment_broadcast`` without ``total`` raise
a clear ``ValueError`` there, and ``stats="tensor"`` matches ``stats="float"`` in eager.

aot_eager runs the traced graphs with the eager kernels, so compiled and eager results agree to
rounding of reordered float ops (dtype tolerance from ``TOL``)."""

from __future__ import annotations

import pytest
import torch
from _csr import offsets
from _impls import IMPLS, impl_or_skip, impls_for
from conftest import TOL

import steppo_fast as sf
from steppo_fast._validate import values_checked

STEP_LENGTHS = [1, 3, 2, 1, 2, 4]  # one-token steps; A = 13 action tokens
TRAJ_LENGTHS = [2, 0, 1, 3]  # an empty and a one-step trajectory; S = 6 steps


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces anew (no recompile-limit interplay between parametrisations)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    cu_steps, cu_trajs = offsets(STEP_LENGTHS), offsets(TRAJ_LENGTHS)
    a, s, b = sum(STEP_LENGTHS), len(STEP_LENGTHS), len(TRAJ_LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    logp = -torch.rand(a, generator=gen) * 2
    return dict(
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
        tokens=randn(a),
        steps=randn(s),
        steps2=randn(s),
        trajs=randn(b),
        logp=logp,
        old_logp=logp + 0.3 * randn(a),
        ref_logp=logp + 0.3 * randn(a),
        step_weight=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0]),
        group=torch.tensor([4, 1, 4, 1]),
        anchor=torch.tensor([0, 1, 0, 0, 1, 0]),
        hidden=randn(5, 8),
        head=randn(11, 8),
        targets=torch.tensor([0, 10, 3, 3, 7]),
    )


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for key in sorted(out) for v in _flatten(out[key])]
    return [t for item in out for t in _flatten(item)]


# Each case: (public op name, builder(batch, impl) -> (fn, differentiable inputs, other inputs)).
# ``fn`` takes the inputs as keyword tensors; only tensors cross the compile boundary.
def _case_segment_sum(d, impl):
    return lambda x, cu: sf.segment_sum(x, cu, impl=impl), {"x": d["tokens"]}, {"cu": d["cu_steps"]}


def _case_segment_mean(d, impl):
    return (
        lambda x, cu: sf.segment_mean(x, cu, impl=impl),
        {"x": d["tokens"]},
        {"cu": d["cu_steps"]},
    )


def _case_segment_broadcast(d, impl):
    def fn(y, cu, like):
        return sf.segment_broadcast(y, cu, total=like.shape[0], impl=impl)

    return fn, {"y": d["steps"]}, {"cu": d["cu_steps"], "like": d["tokens"]}


def _case_step_gae(d, impl):
    def fn(rewards, values, cu, last):
        return sf.step_gae(rewards, values, cu, gamma=0.9, lam=0.8, last_values=last, impl=impl)

    inputs = {"rewards": d["steps"], "values": d["steps2"], "cu": d["cu_trajs"], "last": d["trajs"]}
    return fn, {}, inputs


def _case_discounted_returns(d, impl):
    def fn(rewards, last, cu):
        return sf.discounted_returns(rewards, cu, gamma=0.9, last_values=last, impl=impl)

    return fn, {"rewards": d["steps"], "last": d["trajs"]}, {"cu": d["cu_trajs"]}


def _case_whiten(d, impl):
    def fn(x, weight):
        return sf.whiten(x, weight, impl=impl)

    return fn, {"x": d["steps"]}, {"weight": d["step_weight"]}


def _case_group_advantages(d, impl):
    def fn(scores, group):
        return sf.group_advantages(scores, group, mode="grpo", impl=impl)

    return fn, {"scores": d["trajs"]}, {"group": d["group"]}


def _case_gigpo_advantages(d, impl):
    def fn(rewards, cu, group, anchor):
        return sf.gigpo_advantages(rewards, cu, group, anchor, gamma=0.9, impl=impl)

    return (
        fn,
        {"rewards": d["steps"]},
        {"cu": d["cu_trajs"], "group": d["group"], "anchor": d["anchor"]},
    )


def _policy_case(**options):
    def build(d, impl):
        def fn(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp):
            loss, stats = sf.step_policy_loss(
                logp,
                old_logp,
                advantages,
                cu_steps,
                cu_trajs=cu_trajs,
                step_weight=step_weight,
                ref_logp=ref_logp,
                stats="tensor",
                impl=impl,
                **options,
            )
            return loss, stats

        others = {
            "old_logp": d["old_logp"],
            "advantages": d["steps"],
            "cu_steps": d["cu_steps"],
            "cu_trajs": d["cu_trajs"],
            "step_weight": d["step_weight"],
            "ref_logp": d["ref_logp"],
        }
        return fn, {"logp": d["logp"]}, others

    return build


def _case_value_loss(d, impl):
    def fn(values, old, returns, weight):
        return sf.value_loss(values, old, returns, clip=0.2, weight=weight, impl=impl)

    others = {"old": d["steps2"], "returns": d["steps2"] + 0.5, "weight": d["step_weight"]}
    return fn, {"values": d["steps"]}, others


def _case_kl_penalty(d, impl):
    def fn(logp, ref):
        return sf.kl_penalty(logp, ref, "k3", impl=impl)

    return fn, {"logp": d["logp"], "ref": d["ref_logp"]}, {}


def _case_linear_logprobs(d, impl):
    def fn(hidden, head, targets):
        return sf.linear_logprobs(hidden, head, targets, return_entropy=True, impl=impl)

    return fn, {"hidden": d["hidden"], "head": d["head"]}, {"targets": d["targets"]}


CASES = {
    "segment_sum": ("segment_sum", _case_segment_sum),
    "segment_mean": ("segment_mean", _case_segment_mean),
    "segment_broadcast": ("segment_broadcast", _case_segment_broadcast),
    "step_gae": ("step_gae", _case_step_gae),
    "discounted_returns": ("discounted_returns", _case_discounted_returns),
    "whiten": ("whiten", _case_whiten),
    "group_advantages": ("group_advantages", _case_group_advantages),
    "gigpo_advantages": ("gigpo_advantages", _case_gigpo_advantages),
    "policy_step": (
        "step_policy_loss",
        _policy_case(ratio_level="step", agg="step-mean", kl_coef=0.1, dual_clip=3.0),
    ),
    "policy_token": ("step_policy_loss", _policy_case(ratio_level="token", agg="token-mean")),
    "policy_traj": (
        "step_policy_loss",
        _policy_case(ratio_level="trajectory", agg="traj-mean", length_power=0.5),
    ),
    "value_loss": ("value_loss", _case_value_loss),
    "kl_penalty": ("kl_penalty", _case_kl_penalty),
    "linear_logprobs": ("linear_logprobs", _case_linear_logprobs),
}


def _run(fn, diff: dict, others: dict, compiled: bool):
    """Outputs (detached) and gradients of a fixed random projection of the outputs w.r.t. the
    differentiable inputs."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in diff.items()}
    call = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
    out = _flatten(call(**leaves, **others))
    grads = []
    if leaves:
        gen = torch.Generator().manual_seed(1)
        floats = [t for t in out if t.requires_grad]
        assert floats, "a differentiable op returned no tensor with a graph"
        objective = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in floats)
        grads = torch.autograd.grad(objective, list(leaves.values()))
    return [t.detach() for t in out], list(grads)


@pytest.mark.parametrize(
    ("case", "impl"), [(case, impl) for case, (op, _) in CASES.items() for impl in impls_for(op)]
)
def test_compiled_equals_eager(case, impl):
    op, build = CASES[case]
    impl = impl_or_skip(op, impl)
    fn, diff, others = build(batch(), impl)
    eager_out, eager_grads = _run(fn, diff, others, compiled=False)
    out, grads = _run(fn, diff, others, compiled=True)
    atol, rtol = TOL[torch.float32]  # batch(): <= 20 tokens, 6 steps: within TOL's roundings
    assert len(out) == len(eager_out)
    for got, want in zip(out + grads, eager_out + eager_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tensor_stats_equal_float_stats(impl, dtype):
    """stats="tensor": detached 0-d tensors of the loss's dtype and device, the same values as
    the default Python floats (fp32 rounding: the floats may be fp64 sums)."""
    d = batch()
    args = dict(
        logp=d["logp"].to(dtype).requires_grad_(),
        old_logp=d["old_logp"].to(dtype),
        advantages=d["steps"].to(dtype),
        cu_steps=d["cu_steps"],
        cu_trajs=d["cu_trajs"],
        step_weight=d["step_weight"],
        ref_logp=d["ref_logp"].to(dtype),
        kl_coef=0.05,
        dual_clip=3.0,
        clip_low=0.1,
        impl=impl,
    )
    loss_f, floats = sf.step_policy_loss(**args)
    loss_t, tensors = sf.step_policy_loss(**args, stats="tensor")
    assert torch.equal(loss_f, loss_t)
    assert floats.keys() == tensors.keys()
    atol, rtol = TOL[dtype if dtype == torch.float64 else torch.float32]
    for key, value in tensors.items():
        assert isinstance(floats[key], float)
        assert value.shape == () and value.dtype == loss_t.dtype and not value.requires_grad
        assert value.item() == pytest.approx(floats[key], rel=rtol, abs=atol), key
    assert floats["clip_frac"] > 0  # the stats are not trivial


def test_value_checks_skipped_only_while_compiling():
    assert values_checked()
    probe = torch.compile(
        lambda x: x + (1.0 if values_checked() else 2.0), fullgraph=True, backend="aot_eager"
    )
    assert probe(torch.zeros(1)).item() == 2.0
    # the finiteness check reads values: it raises in eager and is skipped while tracing
    x = torch.tensor([1.0, float("nan"), 3.0])
    with pytest.raises(ValueError, match="x: entry 1 is nan; all must be finite"):
        sf.whiten(x, impl="torch")
    compiled = torch.compile(
        lambda x: sf.whiten(x, impl="torch"), fullgraph=True, backend="aot_eager"
    )
    assert torch.isnan(compiled(x)).all()


def _compile_error(fn, *args) -> str:
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as err:  # noqa: PT011 - Dynamo wraps the ValueError
        compiled(*args)
    return str(err.value)


def test_compile_errors_name_the_argument():
    d = batch()
    # metadata checks still run while tracing
    message = _compile_error(
        lambda x, cu: sf.segment_sum(x, cu, impl="torch"), d["cu_steps"], d["cu_steps"]
    )
    assert "x: dtype int32 not in" in message
    message = _compile_error(lambda y, cu: sf.segment_broadcast(y, cu), d["steps"], d["cu_steps"])
    assert "total: required under torch.compile" in message

    def float_stats(logp, old, adv, cu):
        return sf.step_policy_loss(logp, old, adv, cu)[0]

    message = _compile_error(float_stats, d["logp"], d["old_logp"], d["steps"], d["cu_steps"])
    assert "pass stats='tensor'" in message


def test_float_stats_without_fullgraph_fall_back_to_eager():
    """Without fullgraph, Dynamo breaks the graph where stats='float' would read the host, so
    the default call still works (eagerly) inside a compiled function."""
    d = batch()

    def step(logp, old, adv, cu):
        loss, stats = sf.step_policy_loss(logp, old, adv, cu, impl="torch")
        return loss, stats["ratio_mean"]

    eager = step(d["logp"], d["old_logp"], d["steps"], d["cu_steps"])
    got = torch.compile(step, backend="aot_eager")(
        d["logp"], d["old_logp"], d["steps"], d["cu_steps"]
    )
    assert torch.equal(got[0], eager[0]) and got[1] == eager[1]


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_training_step_with_dynamic_shapes(impl):
    """whiten -> segment_broadcast(total=A) -> token-ratio loss with tensor stats, compiled once
    with dynamic shapes and run on two batches of different sizes: equal to eager."""

    def step(logp, old_logp, adv, cu_steps):
        token_adv = sf.segment_broadcast(sf.whiten(adv), cu_steps, total=logp.shape[0], impl=impl)
        unit = torch.arange(logp.shape[0] + 1, dtype=torch.int32)  # every token its own step
        loss, stats = sf.step_policy_loss(
            logp, old_logp, token_adv, unit, stats="tensor", impl=impl
        )
        return loss, stats["clip_frac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for lengths in ([1, 3, 2], [2, 1, 1, 4, 5]):
        gen = torch.Generator().manual_seed(len(lengths))
        cu = offsets(lengths)
        logp = (-torch.rand(sum(lengths), generator=gen)).requires_grad_()
        old = logp.detach() + 0.3 * torch.randn(sum(lengths), generator=gen)
        adv = torch.randn(len(lengths), generator=gen)
        want = step(logp, old, adv, cu)
        (want_grad,) = torch.autograd.grad(want[0], logp)
        got = compiled(logp, old, adv, cu)
        (got_grad,) = torch.autograd.grad(got[0], logp)
        atol, rtol = TOL[torch.float32]
        for a, b in zip((*got, got_grad), (*want, want_grad)):
            torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=rtol)
