"""C++ backend (impl="cpp") of step_policy_loss against the torch reference: every ratio level
x aggregation, dual clip, KL k1/k2/k3, step weights (fractional and all-zero), length power,
normalizer; log-ratios of +-300, one-token steps, one-step and 5000-step trajectories, empty
batches; loss, stats and d(loss)/d(logp) for fp32/bf16/fp64 inputs; fp64 gradchecks."""

import pytest
import torch
from _cpp_helpers import assert_matches, bf16_grad_tol, requires_cpp
from _csr import offsets
from _tolerance import assert_close_pair
from conftest import TOL

import steppo_fast as sf


def reference_loss(*args, **kwargs):
    """The torch reference through the public op, with tensor stats (as backends return)."""
    return sf.step_policy_loss(*args, **kwargs, impl="torch", stats="tensor")


pytestmark = requires_cpp

RATIO_LEVELS = ["step", "token", "trajectory"]
AGGS = ["step-mean", "token-mean", "traj-mean"]
OPTIONS = {
    "plain": {},
    "dual_k3": dict(dual_clip=3.0, kl_coef=0.05, kl_type="k3"),
    "weights_k1_sqrt": dict(weights="fractional", kl_coef=0.1, kl_type="k1", length_power=0.5),
    "binary_k2_norm": dict(
        weights="binary",
        kl_coef=0.2,
        kl_type="k2",
        normalizer=37.0,
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip=10.0,
    ),
}


def make_batch(steps_per_traj, tokens_per_step, *, seed=0, spread=0.6, weights=None):
    """A batch from per-trajectory step counts and per-step token counts (lists), fp64."""
    gen = torch.Generator().manual_seed(seed)
    cu_trajs, cu_steps = offsets(steps_per_traj), offsets(tokens_per_step)
    num_steps, num_tokens = cu_steps.numel() - 1, int(cu_steps[-1])
    old = -2.0 * torch.rand(num_tokens, generator=gen, dtype=torch.float64)
    batch = dict(
        logp=old + spread * torch.randn(num_tokens, generator=gen, dtype=torch.float64),
        old_logp=old,
        advantages=torch.randn(num_steps, generator=gen, dtype=torch.float64),
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
        ref_logp=old + 0.3 * torch.randn(num_tokens, generator=gen, dtype=torch.float64),
        step_weight=None,
    )
    if weights is not None:
        w = (torch.rand(num_steps, generator=gen, dtype=torch.float64) > 0.3).double()
        if num_steps:
            w[0] = 0.0  # always a padding step
        if weights == "fractional":
            w = w * (0.25 + torch.rand(num_steps, generator=gen, dtype=torch.float64))
        if weights == "zero":
            w = torch.zeros(num_steps, dtype=torch.float64)
        batch["step_weight"] = w
    return batch


def random_batch(seed, num_trajs=12, max_steps=5, max_tokens=6, **kw):
    gen = torch.Generator().manual_seed(seed + 1000)
    steps = torch.randint(1, max_steps + 1, (num_trajs,), generator=gen)
    tokens = torch.randint(1, max_tokens + 1, (int(steps.sum()),), generator=gen)
    return make_batch(steps.tolist(), tokens.tolist(), seed=seed, **kw)


def cast(batch, dtype):
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }


def run(impl, batch, dtype, **options):
    """(loss, stats, d loss / d logp) with float inputs in ``dtype``."""
    b = cast(batch, dtype)
    logp = b.pop("logp").detach().clone().requires_grad_()
    loss, stats = sf.step_policy_loss(logp, **b, **options, impl=impl)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, stats, grad


def reference_fp64(batch, dtype, **options):
    """The reference on the same input values (after rounding to ``dtype``) in fp64."""
    b = cast(cast(batch, dtype), torch.float64)
    logp = b.pop("logp").detach().clone().requires_grad_()
    loss, stats = reference_loss(logp, **b, **options)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), {key: float(value) for key, value in stats.items()}, grad


def assert_same(got, want, dtype):
    loss, stats, grad = got
    want_loss, want_stats, want_grad = want
    assert_matches(loss.detach(), want_loss, dtype)
    assert grad.dtype == dtype  # autograd returns the gradient in logp's dtype
    if dtype == torch.bfloat16:  # ... so it is rounded to bf16 (8 significant bits)
        torch.testing.assert_close(grad.double(), want_grad, **bf16_grad_tol(want_grad))
    else:
        assert_matches(grad, want_grad, dtype)
    atol, rtol = TOL[dtype]
    assert stats.keys() == want_stats.keys()
    for key in want_stats:
        assert stats[key] == pytest.approx(want_stats[key], rel=rtol, abs=atol), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_matches_reference(ratio_level, agg, option, dtype):
    options = dict(OPTIONS[option])
    seed = (
        100 * RATIO_LEVELS.index(ratio_level) + 10 * AGGS.index(agg) + list(OPTIONS).index(option)
    )
    batch = random_batch(seed, weights=options.pop("weights", None))
    options.update(ratio_level=ratio_level, agg=agg)
    if options.get("kl_coef", 0.0) == 0.0:
        batch["ref_logp"] = None
    got = run("cpp", batch, dtype, **options)
    assert_same(got, reference_fp64(batch, dtype, **options), dtype)


EDGE_CASES = {
    "one_token_steps": lambda: make_batch([3, 1, 4], [1] * 8),
    "one_step_trajectories": lambda: make_batch([1] * 10, [2, 1, 5, 3, 1, 1, 4, 2, 2, 6]),
    "long_5000_steps": lambda: make_batch([5000, 2], [1, 2, 3] * 1667 + [1], spread=0.05),
    "many_trajectories": lambda: random_batch(5, num_trajs=3000, max_steps=8, max_tokens=12),
    "log_ratio_300": lambda: {
        **make_batch([2, 3], [2, 1, 3, 1, 3]),
        "logp": torch.tensor([300.0, 1, -300, 2, 5, -1, 300, -300, 0, 1], dtype=torch.float64)
        - 1.0,
    },
    "all_zero_weights": lambda: make_batch([2, 2], [1, 2, 3, 1], weights="zero"),
    "empty_batch": lambda: make_batch([], []),
    "empty_trajectories": lambda: make_batch([0, 2, 0, 1], [2, 1, 3]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_reference(case, ratio_level, agg, dtype):
    batch = EDGE_CASES[case]()
    if case == "log_ratio_300":
        batch["old_logp"] = torch.full_like(batch["logp"], -1.0)
    options = dict(ratio_level=ratio_level, agg=agg, dual_clip=3.0, kl_coef=0.1, kl_type="k3")
    got = run("cpp", batch, dtype, **options)
    assert_same(got, reference_fp64(batch, dtype, **options), dtype)
    loss, stats, grad = got
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if case in ("all_zero_weights", "empty_batch"):
        assert float(loss.detach()) == 0.0 and not grad.any()
        assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_gradcheck_float64(ratio_level, agg):
    batch = random_batch(3, num_trajs=3, max_steps=3, max_tokens=3, weights="fractional")
    logp = batch.pop("logp").clone().requires_grad_()
    options = dict(
        ratio_level=ratio_level,
        agg=agg,
        length_power=0.5,
        dual_clip=1.5,
        kl_coef=0.1,
        kl_type="k3",
        clip_low=0.2,
        clip_high=0.25,
    )

    def fn(logp):
        return sf.step_policy_loss(logp, **batch, **options, impl="cpp")[0]

    assert torch.autograd.gradcheck(fn, (logp,))


def test_other_inputs_requiring_grad_defer_to_reference():
    batch = random_batch(4)
    adv = batch.pop("advantages").clone().requires_grad_()
    logp = batch.pop("logp").clone().requires_grad_()
    options = dict(dual_clip=3.0, kl_coef=0.1)
    got = torch.autograd.grad(
        sf.step_policy_loss(logp, advantages=adv, **batch, **options, impl="cpp")[0], (logp, adv)
    )
    want = torch.autograd.grad(
        reference_loss(logp, advantages=adv, **batch, **options)[0], (logp, adv)
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_mixed_dtypes_and_offset_types():
    batch = random_batch(6, weights="binary")
    options = dict(ratio_level="trajectory", agg="traj-mean", kl_coef=0.1)
    mixed = cast(batch, torch.float32)
    mixed["old_logp"] = mixed["old_logp"].bfloat16().float()  # same values, in bf16 storage
    want = reference_fp64(mixed, torch.float32, **options)
    mixed["old_logp"] = mixed["old_logp"].bfloat16()
    mixed["cu_trajs"] = mixed["cu_trajs"].long()  # int64 trajectories with int32 steps
    logp = mixed.pop("logp").clone().requires_grad_()
    loss, stats = sf.step_policy_loss(logp, **mixed, **options, impl="cpp")
    (grad,) = torch.autograd.grad(loss, logp)
    assert_same((loss, stats, grad), want, torch.float32)


def test_no_grad_mode_and_auto_dispatch():
    from steppo_fast import _dispatch, cpp

    assert _dispatch.resolve("auto", "step_policy_loss", torch.zeros(1)) is cpp
    batch = cast(random_batch(7), torch.float32)
    with torch.no_grad():
        loss, _ = sf.step_policy_loss(**batch, impl="cpp")
    want = reference_loss(**batch)[0]
    # the C++ loss is rounded once from double; the reference sums the tokens in fp32
    assert_close_pair(loss, want.detach(), int(batch["cu_steps"][-1]) + 8)
    assert loss.grad_fn is None
    _, _, grad = torch.ops.steppo_fast.step_policy_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        batch["cu_steps"],
        None,
        None,
        None,
        "step",
        1.0,
        0.2,
        0.2,
        None,
        "step-mean",
        0.0,
        "k3",
        False,
    )
    assert grad.numel() == 0  # no gradient buffer when none is needed
