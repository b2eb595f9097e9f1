"""Triton fused step policy loss under the interpreter, forward (loss + stats) and backward
(d logp, d old_logp, d ref_logp, d advantages) against the torch reference: every ratio level x
agg, weights with zero (padding) steps, dual clip, KL kinds, length power, normalizer, bf16,
extreme log-ratios, empty batches; registered-op checks."""

import itertools

import pytest
import torch
from _csr import offsets
from _tolerance import (
    assert_close_pair,
    assert_close_to_oracle,
    assert_within,
    sum_error,
    unit_roundoff,
)
from steppo_fast.kernels.step_loss import ops as step_loss_ops
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from steppo_fast import step_policy_loss
from steppo_fast._defs import StepLossOptions

STEP_LENGTHS = [3, 1, 70, 5, 1, 1, 129, 2, 9, 17, 1, 4, 33]  # odd sizes, one-token steps
TRAJ_LENGTHS = [4, 1, 0, 6, 2]  # one-step and empty trajectories


def make_batch(dtype=torch.float32, spread=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_steps, cu_trajs = offsets(STEP_LENGTHS), offsets(TRAJ_LENGTHS)
    a, s = int(cu_steps[-1]), len(STEP_LENGTHS)
    logp = -torch.rand(a, generator=gen) * 3
    old = logp + spread * torch.randn(a, generator=gen)
    ref = logp + spread * torch.randn(a, generator=gen)
    adv = torch.randn(s, generator=gen)
    weight = torch.rand(s, generator=gen) + 0.1
    weight[[2, 9]] = 0.0  # padding steps (one of them long)
    to = lambda t: t.to(dtype)
    return dict(
        logp=to(logp),
        old=to(old),
        ref=to(ref),
        adv=to(adv),
        weight=weight,
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
    )


def run(impl, b, need=(True, True, True, True), **kw):
    """Loss, stats and the gradients w.r.t. (logp, old_logp, advantages, ref_logp)."""
    leaves = [b["logp"], b["old"], b["adv"], b["ref"]]
    leaves = [t.clone().requires_grad_(n) for t, n in zip(leaves, need)]
    logp, old, adv, ref = leaves
    loss, stats = step_policy_loss(
        logp, old, adv, b["cu_steps"], cu_trajs=b["cu_trajs"], ref_logp=ref, impl=impl, **kw
    )
    loss.backward()
    return loss.detach(), stats, [t.grad for t in leaves]


def compare(b, dtype, need=(True, True, True, True), **kw):
    """Triton vs the fp64 oracle (the torch reference on the same values in fp64): each result
    is a (weighted) sum or mean over at most every token of a few-operation term, so within
    sum_error(fp32, tokens, scale) of the truth (the torch reference keeps some sums in fp64,
    so its own error is no measure here; ``assert_close_to_oracle`` takes the larger). The
    loss's scale is the oracle loss with |advantages| (no cancellation between terms); bf16
    gradients add one bf16 rounding (the interpreter truncates: 2 u)."""
    loss_t, stats_t, grads_t = run("triton", b, need, **kw)
    loss_r, stats_r, grads_r = run("torch", b, need, **kw)
    b64 = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
    loss_o, stats_o, grads_o = run("torch", b64, need, **kw)
    loss_abs = step_policy_loss(
        b64["logp"],
        b64["old"],
        b64["adv"].abs(),
        b["cu_steps"],
        cu_trajs=b["cu_trajs"],
        ref_logp=b64["ref"],
        impl="torch",
        **kw,
    )[0]
    tokens = int(b["cu_steps"][-1]) + 8  # + the few operations of one token's term
    assert loss_t.dtype == torch.float32
    scale = max(abs(float(loss_abs)), abs(float(loss_o)))
    assert_close_to_oracle(loss_t, loss_o, loss_r, n=tokens, scale=scale, msg="loss")
    assert stats_t.keys() == stats_r.keys()
    for key in stats_t:
        as_t = [torch.tensor(float(x[key]), dtype=torch.float32) for x in (stats_t, stats_r)]
        want = torch.tensor(float(stats_o[key]))
        assert_close_to_oracle(as_t[0], want, as_t[1], n=tokens, msg=key)
    for i, (g_t, g_r, g_o) in enumerate(zip(grads_t, grads_r, grads_o)):
        if g_r is None:
            assert g_t is None
            continue
        assert g_t.dtype == g_r.dtype
        if g_t.dtype == torch.bfloat16:  # fp32 error, then one truncation to bf16 (2 u)
            fp32 = sum_error(torch.float32, tokens, g_o.abs().max().item())
            bound = 2 * unit_roundoff(torch.bfloat16) * (g_o.abs() + fp32) + fp32
            assert_within(g_t, g_o, bound, f"bf16 gradient {i}")
        else:
            assert_close_to_oracle(g_t, g_o, g_r, n=tokens, msg=f"gradient {i}")
    return stats_t


@pytest.mark.parametrize(
    "ratio_level, agg",
    list(
        itertools.product(["step", "token", "trajectory"], ["step-mean", "token-mean", "traj-mean"])
    ),
)
def test_every_ratio_level_and_agg_with_weights_dual_clip_and_kl(ratio_level, agg):
    b = make_batch(spread=0.4)
    stats = compare(
        b,
        torch.float32,
        ratio_level=ratio_level,
        agg=agg,
        step_weight=b["weight"],
        clip_low=0.1,
        clip_high=0.15,
        dual_clip=1.5,
        kl_coef=0.2,
        kl_type="k3",
        length_power=0.5 if ratio_level != "token" else 1.0,
    )
    assert stats["clip_frac"] > 0  # the clipped branch is exercised


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("ratio_level", ["step", "token"])
def test_kl_kinds_without_weights(kl_type, ratio_level):
    b = make_batch(spread=1.0)
    compare(
        b,
        torch.float32,
        ratio_level=ratio_level,
        kl_coef=-0.7,
        kl_type=kl_type,
        clip_low=3e-4,
        clip_high=4e-4,
    )


def test_dual_clip_branch_and_normalizer():
    b = make_batch(spread=2.0, seed=3)
    stats = compare(
        b,
        torch.float32,
        ratio_level="token",
        agg="token-mean",
        dual_clip=2.0,
        normalizer=123.0,
        step_weight=b["weight"],
    )
    assert stats["dual_clip_frac"] > 0


def test_extreme_log_ratios_and_nan_garbage_in_padding_steps():
    b = make_batch()
    b["old"][:10] -= 50.0  # log-ratios beyond the +-20 clamp (zero gradient there)
    b["old"][10:20] += 50.0
    pad = slice(int(b["cu_steps"][2]), int(b["cu_steps"][3]))  # step 2 has weight 0
    b["logp"][pad] = float("nan")
    b["old"][pad] = float("inf")
    b["adv"][2] = float("nan")
    for ratio_level in ("token", "step", "trajectory"):
        compare(
            b,
            torch.float32,
            ratio_level=ratio_level,
            step_weight=b["weight"],
            dual_clip=3.0,
            kl_coef=0.1,
        )
    loss, _, grads = run("triton", b, ratio_level="step", step_weight=b["weight"], kl_coef=0.1)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][pad] == 0).all()


def test_bf16_inputs():
    b = make_batch(dtype=torch.bfloat16, spread=0.4)
    for ratio_level, agg in (
        ("step", "step-mean"),
        ("token", "traj-mean"),
        ("trajectory", "token-mean"),
    ):
        compare(
            b,
            torch.bfloat16,
            ratio_level=ratio_level,
            agg=agg,
            step_weight=b["weight"],
            kl_coef=0.1,
            dual_clip=2.0,
        )


def test_only_logp_needs_grad():
    b = make_batch()
    compare(b, torch.float32, need=(True, False, False, False), kl_coef=0.3)


def test_one_step_per_trajectory_trajectory_ratio_equals_step_ratio():
    b = make_batch()
    b["cu_trajs"] = torch.arange(len(STEP_LENGTHS) + 1, dtype=torch.int32)
    a = run("triton", b, ratio_level="trajectory")
    s = run("triton", b, ratio_level="step")
    tokens = sum(STEP_LENGTHS)  # the loss sums every token; a step sum <= its tokens
    assert_close_pair(a[0], s[0], tokens, msg="loss")
    assert_close_pair(a[2][0], s[2][0], tokens, msg="d logp")


def test_fp64_runs_the_reference_and_passes_gradcheck():
    b = make_batch(dtype=torch.float64)
    logp = b["logp"][:20].clone().requires_grad_()
    cu = torch.tensor([0, 5, 6, 20], dtype=torch.int32)
    old, adv = b["old"][:20], b["adv"][:3]

    def f(x):
        return step_policy_loss(x, old, adv, cu, clip_low=0.1, clip_high=0.1, impl="triton")[0]

    assert torch.autograd.gradcheck(f, (logp,))


def op_options(**overrides) -> dict:
    """Scalar options of the registered op (the fields of StepLossOptions)."""
    options = dict(
        ratio_level="trajectory",
        agg="traj-mean",
        kl_type="k3",
        length_power=1.0,
        clip_low=0.2,
        clip_high=0.2,
        dual_clip=3.0,
        kl_coef=0.1,
        normalizer=None,
    )
    return {**options, **overrides}


def test_registered_ops_pass_opcheck_and_trace_fullgraph():
    b = make_batch()
    cu_steps = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_trajs = torch.tensor([0, 2, 3], dtype=torch.int32)
    logp = b["logp"][:9].clone().requires_grad_()
    old, ref, adv = b["old"][:9], b["ref"][:9].clone().requires_grad_(), b["adv"][:3]
    weight = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)  # d step_weight too
    options = op_options()  # trajectory ratio, traj-mean, k3, dual clip
    args = (logp, old, adv, cu_steps, cu_trajs, weight, ref)
    torch.library.opcheck(step_loss_ops.step_policy_loss_op, args, options)

    def f(x):
        return step_loss_ops.step_policy_loss_op(
            x, old, adv, cu_steps, cu_trajs, weight, ref, **options
        )[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(logp).backward()
    want, want_weight = logp.detach().clone().requires_grad_(), weight.detach().requires_grad_()
    step_policy_loss(
        want,
        old,
        adv,
        cu_steps,
        cu_trajs=cu_trajs,
        ratio_level="trajectory",
        agg="traj-mean",
        step_weight=want_weight,
        ref_logp=ref.detach(),
        kl_coef=0.1,
        dual_clip=3.0,
        impl="torch",
    )[0].backward()
    tokens = int(cu_steps[-1])  # every result is a sum over at most all tokens
    assert_close_pair(logp.grad, want.grad, tokens, msg="d logp")
    assert_close_pair(weight.grad, want_weight.grad, tokens, msg="d step_weight")


class _RecordOps(TorchDispatchMode):
    """Records the name of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


# what the launchers may run besides Triton kernels: allocations and views, plus the Triton
# interpreter's own copies of the kernel arguments to and from its host buffers
ALLOWED_OPS = {
    "aten.empty.memory_format",
    "aten.empty_like.default",
    "aten.new_empty.default",
    "aten.view.default",
    "aten.set_.source_Storage",
    "aten.set_.source_Storage_storage_offset",
    "aten.copy_.default",
}


class _CountLaunches:
    """Records the name of every Triton kernel launched (interpreter) while active."""

    def __init__(self, monkeypatch):
        self.names = []
        original = InterpretedFunction.run

        def run(kernel, *args, **kwargs):
            self.names.append(kernel.fn.__name__)
            return original(kernel, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", run)


@pytest.mark.parametrize(
    "ratio, agg, forward_launches",
    [
        ("step", "step-mean", 2),
        ("token", "token-mean", 2),
        ("trajectory", "step-mean", 3),
        ("trajectory", "token-mean", 3),
        ("trajectory", "traj-mean", 3),
        ("step", "traj-mean", 3),
        ("token", "traj-mean", 3),
    ],
)
def test_forward_and_backward_run_no_torch_compute_op(monkeypatch, ratio, agg, forward_launches):
    """Forward = the token kernel (+ the trajectory pass for trajectory ratios and traj-mean)
    + the finishing kernel, backward = one kernel: no torch epilogue (no sum, min, where,
    division, segment op) around them."""
    b = make_batch()
    options = StepLossOptions(**op_options(ratio_level=ratio, agg=agg))
    tensors = (b["logp"], b["old"], b["adv"], b["cu_steps"])
    grad = torch.tensor(1.0)
    launches = _CountLaunches(monkeypatch)
    with _RecordOps() as forward:
        loss, stats, denominator, table = step_loss_ops.policy_loss_forward(
            *tensors, b["cu_trajs"], b["weight"], b["ref"], options
        )
    assert len(launches.names) == forward_launches, launches.names
    with _RecordOps() as backward:
        grads = step_loss_ops.policy_loss_backward(
            grad, *tensors, b["weight"], b["ref"], (loss, denominator, table), options, (True,) * 3
        )
    assert launches.names[forward_launches:] == ["policy_bwd_kernel"]
    assert forward.names <= ALLOWED_OPS and backward.names <= ALLOWED_OPS
    leaves = [t.clone().requires_grad_() for t in (*tensors[:3], b["weight"], b["ref"])]
    want, want_stats = step_policy_loss(
        *leaves[:3],
        b["cu_steps"],
        cu_trajs=b["cu_trajs"],
        step_weight=leaves[3],
        ref_logp=leaves[4],
        ratio_level=ratio,
        agg=agg,
        dual_clip=3.0,
        kl_coef=0.1,
        stats="tensor",
        impl="torch",
    )
    want.backward()
    tokens = int(b["cu_steps"][-1])  # every result is a sum over at most all tokens
    assert_close_pair(loss, want.detach(), tokens, msg="loss")
    assert_close_pair(stats, torch.stack(list(want_stats.values())), tokens, msg="stats")
    d_logp, d_old, d_ref, d_adv, d_sw = grads
    for got, leaf in zip((d_logp, d_old, d_adv, d_sw, d_ref), leaves):
        assert_close_pair(got, leaf.grad, tokens)


class _RecordFloatStacks(TorchDispatchMode):
    """Records every stack / cat of floating-point tensors run under it (the validation of the
    integer offsets stacks ints: not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in ("aten.stack.default", "aten.cat.default"):
            if any(t.is_floating_point() for t in args[0]):
                self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stats_mode", ["tensor", "float"])
def test_public_stats_are_views_of_the_kernel_output_without_a_stack(stats_mode):
    """The backend hands the finishing kernel's [6] stats to the public wrapper as views
    (PackedStats): no stack/cat launch gathers them again."""
    b = make_batch()
    args = (b["logp"], b["old"], b["adv"], b["cu_steps"])
    options = dict(cu_trajs=b["cu_trajs"], ratio_level="trajectory", agg="traj-mean")
    with _RecordFloatStacks() as ops:
        loss, stats = step_policy_loss(*args, **options, stats=stats_mode, impl="triton")
    assert not ops.calls
    want = step_policy_loss(*args, **options, stats=stats_mode, impl="torch")[1]
    assert stats.keys() == want.keys()
    tokens = int(b["cu_steps"][-1])  # each statistic sums at most every token
    for key, value in stats.items():
        got, ref = (torch.tensor(float(x)) for x in (value, want[key]))
        assert_close_pair(got, ref, tokens, msg=key)
