"""step_policy_loss / value_loss / kl_penalty through the public API: values and stats against
loop oracles, hand-worked cases and edge cases on every backend with the op (tests/_impls.py);
hypothesis layouts and bf16 inputs on the torch reference.
Gradients are in test_loss_grad.py, argument errors in test_loss_errors.py."""

import math

import pytest
import torch
from _csr import offsets
from _impls import impl_or_skip, impls_for
from _loss_oracle import (
    AGGS,
    RATIO_LEVELS,
    make_case,
    oracle_kl,
    oracle_policy_loss,
    oracle_value_loss,
)
from _tolerance import pair_tol
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo_fast import kl_penalty, step_policy_loss, value_loss

# Hand-worked results: at most ~16 roundings on each side (a few sums of <= 6 terms, one exp
# or log), in fp64 (``approx64``) or fp32 (``approx32``), magnitudes ~1.
HAND_ROUNDINGS = 16
HAND64 = pair_tol(torch.float64, HAND_ROUNDINGS)[1]
HAND32 = pair_tol(torch.float32, HAND_ROUNDINGS)[1]


def approx64(value):
    return pytest.approx(value, rel=HAND64, abs=HAND64)


def approx32(value):
    return pytest.approx(value, rel=HAND32, abs=HAND32)


def assert_matches_oracle(case, dtype, impl="torch", **kwargs):
    loss, stats = step_policy_loss(**case, **kwargs, impl=impl)
    oracle_case = {
        k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in case.items()
    }
    expected, expected_stats = oracle_policy_loss(**oracle_case, **kwargs)
    atol, rtol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), expected.double(), atol=atol, rtol=rtol)
    assert set(stats) == set(expected_stats)
    for key, value in expected_stats.items():
        assert isinstance(stats[key], float)
        assert stats[key] == pytest.approx(value, rel=rtol, abs=atol), key
    return loss, stats


CONFIGS = [
    dict(),
    dict(dual_clip=1.3, clip_low=0.1, clip_high=0.15),
    dict(length_power=0.5, kl_coef=0.1, kl_type="k1"),
    dict(length_power=0.0, kl_coef=0.05, kl_type="k2", dual_clip=2.0),
    dict(kl_coef=0.3, kl_type="k3", normalizer=7.5, clip_low=3e-4, clip_high=4e-4),
]


@pytest.mark.parametrize("weights", ["none", "binary", "fractional"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_policy_loss_matches_loop_oracle(impl, ratio_level, agg, weights):
    impl = impl_or_skip("step_policy_loss", impl)
    case = make_case(
        9 * RATIO_LEVELS.index(ratio_level) + 3 * AGGS.index(agg) + len(weights), weights
    )
    seen_clip = seen_dual = False
    for config in CONFIGS:
        _, stats = assert_matches_oracle(
            case, torch.float64, impl, ratio_level=ratio_level, agg=agg, **config
        )
        seen_clip |= stats["clip_frac"] > 0
        seen_dual |= stats["dual_clip_frac"] > 0
    assert seen_clip  # the case exercises the clipped branch


@pytest.mark.parametrize(
    "impl",
    impls_for("step_policy_loss"),
)
def test_dual_clip_is_exercised(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    case = make_case(5)
    case["advantages"] = -case["advantages"].abs()
    case["logp"] = case["old_logp"] + 0.9
    _, stats = assert_matches_oracle(case, torch.float64, impl, ratio_level="token", dual_clip=2.0)
    assert stats["dual_clip_frac"] == 1.0 and stats["clip_frac"] == 0.0


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_float32_inputs_against_fp64_oracle(impl, ratio_level):
    impl = impl_or_skip("step_policy_loss", impl)
    case = make_case(11, "binary", dtype=torch.float32)
    assert_matches_oracle(
        case,
        torch.float32,
        impl,
        ratio_level=ratio_level,
        agg="traj-mean",
        dual_clip=1.5,
        kl_coef=0.1,
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_trajs=st.integers(1, 4),
    ratio_level=st.sampled_from(RATIO_LEVELS),
    agg=st.sampled_from(AGGS),
    weights=st.sampled_from(["none", "binary", "fractional"]),
    power=st.sampled_from([0.0, 0.5, 1.0]),
    dual_clip=st.sampled_from([None, 1.2, 3.0]),
    kl_type=st.sampled_from(["k1", "k2", "k3"]),
)
def test_hypothesis_random_layouts(
    seed, num_trajs, ratio_level, agg, weights, power, dual_clip, kl_type
):
    case = make_case(seed, weights, num_trajs=num_trajs, max_steps=5, max_tokens=6)
    assert_matches_oracle(
        case,
        torch.float64,
        ratio_level=ratio_level,
        agg=agg,
        length_power=power,
        dual_clip=dual_clip,
        kl_coef=0.2,
        kl_type=kl_type,
    )


def hand_case():
    # step 0 (traj 0): x = (0.1, 0.3) -> l = 0.2, rho = e^0.2 = 1.2214 > 1.2, A = +1: clipped,
    #                  L0 = -1.2 * 1 = -1.2
    # step 1 (traj 0): x = ln 4 -> rho = 4, A = -0.5: PPO L = -min(-2, -0.6) = 2; dual clip 3:
    #                  min(2, 3 * 0.5) = 1.5 (dual-clipped)
    # step 2 (traj 1): x = ln 0.9 -> rho = 0.9 in [0.8, 1.2], A = 2: L2 = -1.8 (unclipped)
    old = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64)
    x = torch.tensor([0.1, 0.3, math.log(4.0), math.log(0.9)], dtype=torch.float64)
    return dict(
        logp=old + x,
        old_logp=old,
        advantages=torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64),
        cu_steps=torch.tensor([0, 2, 3, 4], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 2, 3], dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("step-mean", (-1.2 + 1.5 - 1.8) / 3),  # -0.5
        ("token-mean", (2 * -1.2 + 1.5 - 1.8) / 4),  # step 0 has 2 tokens: -0.675
        ("traj-mean", ((-1.2 + 1.5) / 2 + -1.8) / 2),  # traj 0 shares 1 over 2 steps: -0.825
    ],
)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_hand_worked_two_trajectories(impl, agg, expected):
    impl = impl_or_skip("step_policy_loss", impl)
    loss, stats = step_policy_loss(**hand_case(), dual_clip=3.0, agg=agg, impl=impl)
    assert float(loss) == approx64(expected)
    if agg == "step-mean":
        assert stats["clip_frac"] == approx64(1 / 3)
        assert stats["dual_clip_frac"] == approx64(1 / 3)
        assert stats["ratio_mean"] == approx64((math.exp(0.2) + 4 + 0.9) / 3)
        assert stats["ratio_min"] == approx64(0.9) and stats["ratio_max"] == approx64(4)
        # token units weigh 1/n_s: (0.5 * -0.1 + 0.5 * -0.3 - ln 4 - ln 0.9) / 3
        expected_kl = (-0.05 - 0.15 - math.log(4.0) - math.log(0.9)) / 3
        assert stats["approx_kl"] == approx64(expected_kl)


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_hand_worked_kl_normalizer_and_weights(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    case = hand_case()
    case["ref_logp"] = case["logp"] - 0.2  # k1 = 0.2 on every token
    loss, _ = step_policy_loss(**case, dual_clip=3.0, kl_coef=0.5, kl_type="k1", impl=impl)
    assert float(loss) == approx64(-0.5 + 0.5 * 0.2)
    loss, _ = step_policy_loss(**hand_case(), dual_clip=3.0, normalizer=6.0, impl=impl)
    assert float(loss) == approx64((-1.2 + 1.5 - 1.8) / 6)
    # step 1 is padding: traj 0 now has one counted unit (step 0) -> (-1.2 + -1.8) / 2
    weights = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    loss, stats = step_policy_loss(
        **hand_case(), dual_clip=3.0, agg="traj-mean", step_weight=weights, impl=impl
    )
    assert float(loss) == approx64((-1.2 - 1.8) / 2)
    assert stats["dual_clip_frac"] == 0.0 and stats["ratio_max"] == approx64(math.exp(0.2))


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_hand_worked_trajectory_ratio(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    # traj 0 tokens x = (0.1, 0.3, ln 4): l = (0.4 + ln 4) / 3**0.5; traj 1: l = ln 0.9
    loss, stats = step_policy_loss(
        **hand_case(),
        ratio_level="trajectory",
        length_power=0.5,
        clip_low=0.5,
        clip_high=5.0,
        impl=impl,
    )
    rho0 = math.exp((0.4 + math.log(4.0)) / math.sqrt(3))  # 2.37: inside [0.5, 6]
    expected = (-rho0 * 1.0 + rho0 * 0.5 - 0.9 * 2.0) / 3
    assert float(loss) == approx64(expected)
    assert stats["clip_frac"] == 0.0 and stats["ratio_max"] == approx64(rho0)


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_trajectory_ratio_ignores_padding_tokens(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    case = make_case(3, "binary")
    base, _ = step_policy_loss(**case, ratio_level="trajectory", agg="traj-mean", impl=impl)
    pad_tokens = torch.zeros_like(case["logp"], dtype=torch.bool)
    cu = case["cu_steps"].long()
    for s in torch.nonzero(case["step_weight"] == 0).flatten().tolist():
        pad_tokens[cu[s] : cu[s + 1]] = True
    case["logp"] = torch.where(
        pad_tokens, torch.full_like(case["logp"], float("nan")), case["logp"]
    )
    case["advantages"] = torch.where(case["step_weight"] == 0, float("inf"), case["advantages"])
    again, _ = step_policy_loss(
        **case, ratio_level="trajectory", agg="traj-mean", kl_coef=0.0, impl=impl
    )
    assert torch.equal(base, again)


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_extreme_log_ratios_are_finite(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    cu = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    old = torch.zeros(5)
    logp = torch.tensor([300.0, 300.0, -300.0, 300.0, -300.0])
    adv = torch.tensor([1.0, -1.0, 0.5])
    for level in RATIO_LEVELS:
        for dual in (None, 3.0):
            loss, stats = step_policy_loss(
                logp,
                old,
                adv,
                cu,
                cu_trajs=torch.tensor([0, 3]),
                ratio_level=level,
                dual_clip=dual,
                length_power=0.0,
                ref_logp=-logp,
                kl_coef=0.1,
                impl=impl,
            )
            assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
            assert stats["ratio_max"] == approx32(math.exp(20.0))
            if level != "trajectory":  # the one trajectory has l = 300 / 5**0
                assert stats["ratio_min"] == approx32(math.exp(-20.0))


def test_bf16_inputs_match_fp32_on_rounded_values():
    case = make_case(21, "binary", dtype=torch.bfloat16)
    as_fp32 = {
        k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in case.items()
    }
    atol, rtol = TOL[torch.bfloat16]
    for level in RATIO_LEVELS:
        kwargs = dict(ratio_level=level, agg="traj-mean", dual_clip=1.5, kl_coef=0.1)
        loss, stats = step_policy_loss(**case, **kwargs, impl="torch")
        ref_loss, ref_stats = step_policy_loss(**as_fp32, **kwargs, impl="torch")
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
        assert stats == pytest.approx(ref_stats, rel=rtol, abs=atol)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kl_penalty_against_loop(kind, dtype):
    logp = (-3 * torch.rand(40)).to(dtype)
    ref = torch.cat([logp[:30].float() + torch.randn(30), torch.tensor([300.0, -300.0] * 5)])
    ref = ref.to(dtype)
    out = kl_penalty(logp, ref, kind, impl="torch")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = [oracle_kl(float(a), float(b), kind) for a, b in zip(logp, ref)]
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        out.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=rtol
    )
    if kind == "k3":
        assert float(out.max()) == 10.0 and float(out.min()) >= 0.0


def test_value_loss_against_loop_and_hand():
    gen = torch.Generator().manual_seed(4)
    v, old, ret = (torch.randn(12, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = (torch.rand(12, generator=gen, dtype=torch.float64) > 0.3).double() * 0.7
    for clip in (None, 0.2, 0.0):
        for w in (None, weight):
            for norm in (None, 9.0):
                got = value_loss(v, old, ret, clip=clip, weight=w, normalizer=norm, impl="torch")
                assert float(got) == approx64(oracle_value_loss(v, old, ret, clip, w, norm))
    # hand: v=1, old=0, R=2, clip=0.5: unclipped 0.5*(1-2)^2 = 0.5; clipped value 0.5 -> 0.5*2.25
    one = torch.ones(1)
    got = value_loss(one, 0 * one, 2 * one, clip=0.5, impl="torch")
    assert float(got) == approx32(1.125)
    # v=3, R=-1: unclipped 0.5*4^2 = 8 beats clipped 0.5*(0.5+1)^2 = 1.125
    assert float(value_loss(3 * one, 0 * one, -one, clip=0.5, impl="torch")) == 8.0
    # v=3, R=2.9: clipped 0.5*(0.5-2.9)^2 = 2.88 beats unclipped 0.5*0.1^2
    got = value_loss(3 * one, 0 * one, 2.9 * one, clip=0.5, impl="torch")
    assert float(got) == approx32(0.5 * 2.4**2)


def test_value_loss_bf16_and_zero_weight():
    v = torch.randn(6).to(torch.bfloat16).requires_grad_()
    old, ret = torch.randn(6).to(torch.bfloat16), torch.randn(6).to(torch.bfloat16)
    got = value_loss(v, old, ret, clip=0.2, impl="torch")
    ref = value_loss(v.detach().float(), old.float(), ret.float(), clip=0.2, impl="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])
    v32 = torch.randn(3, requires_grad=True)
    zero = value_loss(
        v32,
        torch.full((3,), float("nan")),
        torch.zeros(3),
        clip=0.1,
        weight=torch.zeros(3),
        impl="torch",
    )
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(v32.grad, torch.zeros(3))
    empty = torch.zeros(0, requires_grad=True)
    out = value_loss(empty, torch.zeros(0), torch.zeros(0), impl="torch")
    out.backward()
    assert float(out.detach()) == 0.0 and empty.grad.shape == (0,)


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_stats_on_empty_batch(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    cu = torch.zeros(1, dtype=torch.int32)
    loss, stats = step_policy_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), cu, impl=impl)
    assert float(loss) == 0.0
    assert stats == {
        "clip_frac": 0.0,
        "dual_clip_frac": 0.0,
        "approx_kl": 0.0,
        "ratio_mean": 1.0,
        "ratio_min": 1.0,
        "ratio_max": 1.0,
    }


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_one_token_steps_and_one_step_trajectories(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    # one token per step and one step per trajectory: every ratio level and agg coincide
    cu = offsets([1] * 6)
    logp, old = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    losses = []
    for level in RATIO_LEVELS:
        for agg in AGGS:
            kwargs = dict(cu_trajs=cu, ratio_level=level, agg=agg, impl=impl)
            losses.append(step_policy_loss(logp, old, adv, cu, **kwargs)[0])
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], atol=HAND64, rtol=HAND64)


@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_long_trajectory(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    cu_steps = offsets([3] * 200)
    cu_trajs = torch.tensor([0, 200], dtype=torch.int32)
    case = dict(
        logp=torch.randn(600, dtype=torch.float64) * 0.05,
        old_logp=torch.zeros(600, dtype=torch.float64),
        advantages=torch.randn(200, dtype=torch.float64),
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
    )
    adv_abs_mean = float(case["advantages"].abs().mean())
    for level in RATIO_LEVELS:
        loss, _ = step_policy_loss(**case, ratio_level=level, agg="traj-mean", impl=impl)
        expected, _ = oracle_policy_loss(**case, ratio_level=level, agg="traj-mean")
        # 600 tokens summed in fp64 on both sides; terms |A rho| <= 1.2 |A| (clipped ratios)
        atol, rtol = pair_tol(torch.float64, 600 + HAND_ROUNDINGS, 1.2 * adv_abs_mean)
        torch.testing.assert_close(loss, expected, atol=atol, rtol=rtol)
