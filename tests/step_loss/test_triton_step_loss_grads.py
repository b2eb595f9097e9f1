"""Gradients of the Triton step policy loss w.r.t. every float input, step_weight included,
against autograd through the torch reference evaluated in fp64 on the same fp32 values (the
exact result of the spec's math; fp32 bounds from ``tests/_tolerance.py``): every ratio level x
agg on random
layouts with fractional and zero (padding) weights, with and without the KL term, dual clip and
normalizer, plus edge cases (all-zero weights, one-token steps, one-step trajectories, a long
trajectory, empty trajectories). fp64 inputs go to the reference on this backend, so the
kernel's d step_weight is also checked by central differences of its own fp32 forward."""

import pytest
import torch
from _csr import offsets
from _loss_oracle import AGGS, RATIO_LEVELS, make_case
from _tolerance import assert_close_to_oracle, pair_tol, unit_roundoff

from steppo_fast import step_policy_loss

FLOAT_KEYS = ("logp", "old_logp", "advantages", "step_weight", "ref_logp")
OPTIONS = {
    "plain": dict(clip_low=0.1, clip_high=0.15),
    "kl_dual": dict(kl_coef=0.3, kl_type="k3", dual_clip=1.5, length_power=0.5),
    "kl_norm": dict(kl_coef=-0.2, kl_type="k2", normalizer=7.0, clip_low=3e-4, clip_high=4e-4),
}


def _grads(fn, case, dtype, **options):
    """(loss, {input: gradient}) of ``fn`` with every float input a leaf of ``dtype``."""
    leaves = {
        k: v.detach().to(dtype).requires_grad_()
        for k, v in case.items()
        if k in FLOAT_KEYS and v is not None
    }
    offsets = {k: v for k, v in case.items() if k not in FLOAT_KEYS}
    loss = fn(**leaves, **offsets, **options)[0]
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), dict(zip(leaves, grads))


def case_scale(case, **options):
    """Sum of the magnitudes behind the loss: the fp64 loss with |advantages| (its terms then
    share a sign, so nothing cancels), or the loss itself if larger (KL terms)."""
    f64 = {k: v.double() if k in FLOAT_KEYS and v is not None else v for k, v in case.items()}
    loss = step_policy_loss(**f64, **options, impl="torch")[0]
    loss_abs = step_policy_loss(
        **dict(f64, advantages=f64["advantages"].abs()), **options, impl="torch"
    )[0]
    return max(abs(float(loss)), abs(float(loss_abs)))


def check(case, **options):
    """Triton fp32 loss and gradients == the fp64 reference on the same values, within
    ORACLE_FACTOR x the fp32 reference's own error (``assert_close_to_oracle``)."""
    case = {k: v.float() if k in FLOAT_KEYS and v is not None else v for k, v in case.items()}
    loss, grads = _grads(step_policy_loss, case, torch.float32, impl="triton", **options)
    want_loss, want = _grads(step_policy_loss, case, torch.float64, impl="torch", **options)
    ref_loss, ref = _grads(step_policy_loss, case, torch.float32, impl="torch", **options)
    # every result sums at most all tokens' few-operation terms (the fp32 reference keeps some
    # sums in fp64: its own error alone is no measure, the a-priori term covers that)
    n = int(case["cu_steps"][-1]) + 8
    assert_close_to_oracle(
        loss, want_loss, ref_loss, n=n, scale=case_scale(case, **options), msg="loss"
    )
    assert grads.keys() == want.keys()
    for key, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, key
        want_grad = torch.zeros_like(want[key]) if want[key] is None else want[key]
        ref_grad = torch.zeros_like(ref[key]) if ref[key] is None else ref[key]
        assert_close_to_oracle(grad, want_grad, ref_grad, n=n, msg=key)
    return grads


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_every_input_gradient_matches_reference(ratio_level, agg, option):
    seed = (
        100 * RATIO_LEVELS.index(ratio_level) + 10 * AGGS.index(agg) + list(OPTIONS).index(option)
    )
    case = make_case(seed, weights="fractional", num_trajs=5, max_steps=5, max_tokens=6)
    options = dict(OPTIONS[option])
    if options.get("kl_coef", 0.0) == 0.0:
        case["ref_logp"] = None
    grads = check(case, ratio_level=ratio_level, agg=agg, **options)
    # padding steps get the denominator's share only (zero without it): not all zero in general
    assert grads["step_weight"].abs().sum() > 0


EDGE_LAYOUTS = {  # (steps per trajectory, tokens per step)
    "one_token_steps": ([3, 1, 4], [1] * 8),
    "one_step_trajectories": ([1] * 6, [2, 1, 5, 3, 1, 4]),
    "long_trajectory": ([150, 2], [1, 2, 3] * 50 + [4, 1]),
    "empty_trajectories": ([0, 2, 0, 3, 0], [2, 1, 3, 1, 2]),
}


def _edge_case(name, seed=0):
    steps, tokens = EDGE_LAYOUTS[name]
    gen = torch.Generator().manual_seed(seed)
    cu_steps, cu_trajs = offsets(tokens), offsets(steps)
    num_tokens, num_steps = int(cu_steps[-1]), len(tokens)
    old = -2.0 * torch.rand(num_tokens, generator=gen)
    weight = torch.rand(num_steps, generator=gen) + 0.25
    weight[::3] = 0.0  # padding steps, the first one included
    return dict(
        logp=old + 0.5 * torch.randn(num_tokens, generator=gen),
        old_logp=old,
        advantages=torch.randn(num_steps, generator=gen),
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
        step_weight=weight,
        ref_logp=old + 0.3 * torch.randn(num_tokens, generator=gen),
    )


@pytest.mark.parametrize("name", list(EDGE_LAYOUTS))
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_edge_layouts(name, ratio_level):
    for agg in AGGS:
        check(_edge_case(name), ratio_level=ratio_level, agg=agg, kl_coef=0.1, dual_clip=2.0)


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_all_zero_weights_give_zero_gradients(ratio_level):
    case = _edge_case("one_step_trajectories")
    case["step_weight"] = torch.zeros_like(case["step_weight"])
    for agg in AGGS:
        grads = check(case, ratio_level=ratio_level, agg=agg, kl_coef=0.1)
        assert all((g == 0).all() for g in grads.values())


def test_step_weight_gradient_by_central_differences():
    """d loss / d step_weight of the kernel along a random direction over the counted steps
    == the central difference of the kernel's own forward (the loss is a smooth rational
    function of the positive weights: no branch depends on their values)."""
    case = _edge_case("one_step_trajectories", seed=3)
    case["cu_trajs"] = torch.tensor([0, 2, 6], dtype=torch.int32)
    weight = case.pop("step_weight")
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    direction = torch.where(weight > 0, direction, torch.zeros_like(direction))
    options = dict(agg="traj-mean", kl_coef=0.2, impl="triton")
    for ratio_level in RATIO_LEVELS:

        def loss_at(w, ratio_level=ratio_level):
            return step_policy_loss(**case, step_weight=w, ratio_level=ratio_level, **options)[0]

        leaf = weight.clone().requires_grad_()
        loss = loss_at(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)

        def central(h, loss_at=loss_at):
            return float(loss_at(weight + h * direction) - loss_at(weight - h * direction)) / (
                2 * h
            )

        h = 1e-2
        numeric, half = central(h), central(h / 2)
        # Truncation c h^2 + O(h^4): D(h) - D(h/2) = 3/4 c h^2, so |D(h) - exact| <= 4/3 |D(h) -
        # D(h/2)| (doubled for the O(h^4) rest). Rounding: each fp32 loss (a sum over the tokens)
        # is within pair_tol of the exact one; the difference of two over 2h, for both D's.
        fp32_loss = pair_tol(torch.float32, int(case["cu_steps"][-1]), abs(float(loss)))[0]
        bound = 2 * 4 / 3 * abs(numeric - half) + 3 * 2 * fp32_loss / (2 * h / 2)
        assert abs(float((grad * direction).sum()) - numeric) <= bound, (ratio_level, bound)


def test_bf16_step_weight_gradient_is_rounded_once():
    case = _edge_case("one_token_steps")
    weight = case.pop("step_weight").to(torch.bfloat16).requires_grad_()
    want_weight = weight.detach().clone().requires_grad_()
    logp = case.pop("logp")
    for impl, w in (("triton", weight), ("torch", want_weight)):
        step_policy_loss(logp, **case, step_weight=w, agg="token-mean", impl=impl)[0].backward()
    assert weight.grad.dtype == torch.bfloat16
    # fp32 math on both sides (sums over the tokens), then one bf16 rounding each (the
    # interpreter truncates: up to one bf16 ulp = eps apart after rounding)
    atol, rtol = pair_tol(
        torch.float32, int(case["cu_steps"][-1]), want_weight.grad.abs().max().item()
    )
    rtol += 2 * unit_roundoff(torch.bfloat16)
    torch.testing.assert_close(weight.grad.float(), want_weight.grad.float(), atol=atol, rtol=rtol)
