"""Gradients of step_policy_loss (torch reference): fp64 gradcheck, autograd through the naive
per-unit loop, exact zeros where clipped / padded / empty, extreme log-ratios, micro-batch
accumulation with a global normalizer, and parity with verl's GSPO loss."""

import pytest
import torch
from _csr import offsets
from _impls import impl_or_skip, impls_for
from _loss_oracle import AGGS, RATIO_LEVELS, make_case, oracle_policy_loss
from _tolerance import pair_tol
from conftest import TOL

from steppo_fast import step_policy_loss
from steppo_fast.ops.loss import loss_normalizer

FULL = dict(dual_clip=1.5, kl_coef=0.1, kl_type="k3")


def leaf(case, *names):
    case = dict(case)
    for name in names:
        case[name] = case[name].detach().clone().requires_grad_()
    return case


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_gradcheck_float64(ratio_level, agg):
    case = make_case(7, "binary", num_trajs=2, max_steps=3, max_tokens=3)

    def fn(logp, ref_logp, advantages):
        kwargs = dict(case, logp=logp, ref_logp=ref_logp, advantages=advantages)
        return step_policy_loss(
            **kwargs, ratio_level=ratio_level, agg=agg, length_power=0.5, **FULL, impl="torch"
        )[0]

    inputs = tuple(case[k].clone().requires_grad_() for k in ("logp", "ref_logp", "advantages"))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("weights", ["none", "binary", "fractional"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_gradient_matches_naive_loop(ratio_level, agg, weights):
    case = make_case(100 + len(ratio_level) + 7 * len(agg), weights, num_trajs=4)
    kwargs = dict(ratio_level=ratio_level, agg=agg, clip_low=0.1, clip_high=0.1, **FULL)
    got_case = leaf(case, "logp", "ref_logp", "advantages")
    loss, stats = step_policy_loss(**got_case, **kwargs, impl="torch")
    loss.backward()
    want_case = leaf(case, "logp", "ref_logp", "advantages")
    expected, _ = oracle_policy_loss(**want_case, **kwargs)
    expected.backward()
    assert stats["clip_frac"] > 0  # some units are clipped
    atol, rtol = TOL[torch.float64]
    for name in ("logp", "ref_logp", "advantages"):
        torch.testing.assert_close(got_case[name].grad, want_case[name].grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_clipped_units_get_exactly_zero_gradient(impl, ratio_level):
    impl = impl_or_skip("step_policy_loss", impl)
    # 4 one-or-two-token steps: A>0 & rho>1.2 (clipped), A<0 & rho<0.8 (clipped),
    # A<0 & rho>3 with dual clip 3 (dual-clipped), A>0 & rho=1.05 (free)
    cu = offsets([2, 2, 1, 2])
    x = torch.tensor([0.4, 0.5, -0.5, -0.4, 1.5, 0.05, 0.05], dtype=torch.float64)
    old = torch.full((7,), -1.0, dtype=torch.float64)
    logp = (old + x).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    loss, stats = step_policy_loss(
        logp, old, adv, cu, ratio_level=ratio_level, dual_clip=3.0, impl=impl
    )
    loss.backward()
    assert stats["clip_frac"] == pytest.approx(0.5) and stats["dual_clip_frac"] == 0.25
    assert torch.equal(logp.grad[:5], torch.zeros(5, dtype=torch.float64))
    assert (logp.grad[5:] != 0).all()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_empty_batch_and_all_zero_weights(impl, ratio_level, agg):
    impl = impl_or_skip("step_policy_loss", impl)
    empty = dict(
        logp=torch.zeros(0, requires_grad=True),
        old_logp=torch.zeros(0),
        advantages=torch.zeros(0),
        cu_steps=torch.zeros(1, dtype=torch.int32),
        cu_trajs=torch.zeros(1, dtype=torch.int32),
        ref_logp=torch.zeros(0, requires_grad=True),
    )
    case = leaf(make_case(9, dtype=torch.float32), "logp", "ref_logp")
    case["step_weight"] = torch.zeros_like(case["advantages"])
    for batch in (empty, case):
        for normalizer in (None, 3.0):
            loss, stats = step_policy_loss(
                **batch,
                ratio_level=ratio_level,
                agg=agg,
                **FULL,
                normalizer=normalizer,
                impl=impl,
            )
            assert loss.requires_grad and float(loss.detach()) == 0.0
            loss.backward()
            for name in ("logp", "ref_logp"):
                grad = batch[name].grad
                assert grad is not None and torch.equal(grad, torch.zeros_like(grad))
                batch[name].grad = None
            assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_padding_garbage_never_reaches_loss_or_gradient(impl, ratio_level):
    impl = impl_or_skip("step_policy_loss", impl)
    case = make_case(13, "binary", dtype=torch.float32)
    pad = (case["step_weight"] == 0).repeat_interleave(case["cu_steps"].diff().long())
    nan = torch.full_like(case["logp"], float("nan"))
    case["logp"] = torch.where(pad, nan, case["logp"])
    case["ref_logp"] = torch.where(pad, -nan, case["ref_logp"])
    case["advantages"] = torch.where(case["step_weight"] == 0, float("nan"), case["advantages"])
    case = leaf(case, "logp", "ref_logp")
    for agg in AGGS:
        loss, stats = step_policy_loss(**case, ratio_level=ratio_level, agg=agg, **FULL, impl=impl)
        loss.backward()
        assert torch.isfinite(loss) and all(v == v for v in stats.values())
        assert torch.equal(case["logp"].grad[pad], torch.zeros(int(pad.sum())))
        assert torch.isfinite(case["logp"].grad).all() and case["logp"].grad[~pad].abs().sum() > 0
        case["logp"].grad = None


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_log_ratios_of_300_give_finite_and_zero_gradients(impl, ratio_level):
    impl = impl_or_skip("step_policy_loss", impl)
    # steps: (300), (-300, -300), (300); trajectories: step 0 | steps 1-2 (sum -300)
    cu = offsets([1, 2, 1])
    logp = torch.tensor([300.0, -300.0, -300.0, 300.0], requires_grad=True)
    old = torch.zeros(4)
    ref = torch.tensor([-300.0, 300.0, 0.0, 0.0], requires_grad=True)
    for adv in ([1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]):
        loss, _ = step_policy_loss(
            logp,
            old,
            torch.tensor(adv),
            cu,
            cu_trajs=torch.tensor([0, 1, 3]),
            ratio_level=ratio_level,
            length_power=0.0,
            ref_logp=ref,
            kl_coef=0.1,
            impl=impl,
        )
        loss.backward()
        assert torch.isfinite(loss)
        # every ratio is beyond the +-20 clamp and every k3 beyond its 10 clamp: zero gradients
        assert torch.equal(logp.grad, torch.zeros(4)) and torch.equal(ref.grad, torch.zeros(4))
        logp.grad = ref.grad = None


def test_bf16_gradient_is_fp32_gradient_rounded():
    case = make_case(17, "binary", dtype=torch.bfloat16)
    lp16 = case["logp"].clone().requires_grad_()
    lp32 = case["logp"].float().requires_grad_()
    rest = {k: v for k, v in case.items() if k != "logp"}
    rest32 = {
        k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in rest.items()
    }
    step_policy_loss(lp16, **rest, **FULL, impl="torch")[0].backward()
    step_policy_loss(lp32, **rest32, **FULL, impl="torch")[0].backward()
    assert lp16.grad.dtype == torch.bfloat16
    assert torch.equal(lp16.grad, lp32.grad.to(torch.bfloat16))


def split_by_trajectories(case, cut):
    """Two micro-batches: trajectories [0, cut) and [cut, B), with re-based offsets."""
    cu_trajs, cu_steps = case["cu_trajs"].long(), case["cu_steps"].long()
    parts = []
    for lo_b, hi_b in ((0, cut), (cut, cu_trajs.numel() - 1)):
        lo_s, hi_s = int(cu_trajs[lo_b]), int(cu_trajs[hi_b])
        lo_t, hi_t = int(cu_steps[lo_s]), int(cu_steps[hi_s])
        part = {}
        for key in ("logp", "old_logp", "ref_logp"):
            part[key] = case[key][lo_t:hi_t]
        part["advantages"] = case["advantages"][lo_s:hi_s]
        if case["step_weight"] is not None:
            part["step_weight"] = case["step_weight"][lo_s:hi_s]
        else:
            part["step_weight"] = None
        part["cu_steps"] = (cu_steps[lo_s : hi_s + 1] - lo_t).int()
        part["cu_trajs"] = (cu_trajs[lo_b : hi_b + 1] - lo_s).int()
        parts.append(part)
    return parts


@pytest.mark.parametrize("weights", ["none", "binary", "fractional"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_microbatches_with_global_normalizer_sum_to_full_batch(ratio_level, agg, weights):
    case = make_case(31, weights, num_trajs=5)
    kwargs = dict(ratio_level=ratio_level, agg=agg, length_power=0.5, **FULL)
    norm_kwargs = dict(
        cu_trajs=case["cu_trajs"], ratio_level=ratio_level, agg=agg, step_weight=case["step_weight"]
    )
    normalizer = loss_normalizer(case["cu_steps"], **norm_kwargs)

    full = leaf(case, "logp")
    full_loss, _ = step_policy_loss(**full, **kwargs, impl="torch")
    full_loss.backward()
    explicit, _ = step_policy_loss(**case, **kwargs, normalizer=normalizer, impl="torch")
    # fp64 on both sides, every result a sum over at most all tokens (+ a few operations each)
    tokens = int(case["cu_steps"][-1]) + 16
    atol, rtol = pair_tol(torch.float64, tokens, full_loss.abs().item() + 1.0)
    torch.testing.assert_close(explicit, full_loss.detach(), atol=atol, rtol=rtol)

    accumulated = leaf(case, "logp")
    total = 0.0
    normalizer_sum = 0.0
    for part in split_by_trajectories(accumulated, cut=2):
        loss, _ = step_policy_loss(**part, **kwargs, normalizer=normalizer, impl="torch")
        loss.backward()
        total = total + loss.detach()
        part_norm_kwargs = dict(
            norm_kwargs, cu_trajs=part["cu_trajs"], step_weight=part["step_weight"]
        )
        normalizer_sum += loss_normalizer(part["cu_steps"], **part_norm_kwargs)
    atol, rtol = TOL[torch.float64]
    assert normalizer_sum == pytest.approx(normalizer, rel=pair_tol(torch.float64, tokens)[1])
    torch.testing.assert_close(total, full_loss.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(accumulated["logp"].grad, full["logp"].grad, atol=atol, rtol=rtol)


def verl_gspo_policy_loss(logp_rows, old_rows, adv_rows, mask, clip_low, clip_high):
    """verl's ``gspo`` policy loss (core_algos.compute_policy_loss_gspo with loss_agg_mode
    "seq-mean-token-mean"), restated from its formula for padded rows [R, L]:

    s_r = masked mean over row r of (logp - old); every token gets the ratio exp(min(s_r + logp
    - sg(logp), 10)) whose value is exp(s_r) while its gradient flows through the token's own
    log-prob (stop-gradient trick); per-token PPO loss max(-A ratio, -A clip(ratio)); mean over
    the row's tokens (count + 1e-8), then mean over non-empty rows.
    """
    counts = mask.sum(-1)
    seq_log_ratio = ((logp_rows - old_rows) * mask).sum(-1) / counts.clamp(min=1)
    token_log_ratio = logp_rows - logp_rows.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(token_log_ratio.clamp(max=10.0))
    per_token = torch.maximum(
        -adv_rows * ratio, -adv_rows * ratio.clamp(1 - clip_low, 1 + clip_high)
    )
    per_row = (per_token * mask).sum(-1) / (counts + 1e-8)
    present = (counts > 0).to(per_row.dtype)
    clip_frac = (
        (-adv_rows * ratio.clamp(1 - clip_low, 1 + clip_high) > -adv_rows * ratio) * mask
    ).sum() / mask.sum()
    ppo_kl = ((old_rows - logp_rows) * mask).sum() / mask.sum()
    return (
        (per_row * present).sum() / present.sum(),
        float(clip_frac.detach()),
        float(ppo_kl.detach()),
    )


def test_parity_with_verl_gspo():
    case = make_case(41, dtype=torch.float32, num_trajs=4, max_steps=3, max_tokens=6)
    cu = case["cu_steps"].long()
    lengths = cu.diff()
    num_steps, width = lengths.numel(), int(lengths.max())
    # padded rows, one step per row: position j of row s <- action entry cu[s] + j
    cols = torch.arange(width)
    mask = (cols < lengths[:, None]).float()
    flat_index = (cu[:-1, None] + cols).clamp(max=int(cu[-1]) - 1)

    ours_logp = case["logp"].clone().requires_grad_()
    loss, stats = step_policy_loss(
        ours_logp,
        case["old_logp"],
        case["advantages"],
        case["cu_steps"],
        ratio_level="step",
        agg="step-mean",
        impl="torch",
    )
    loss.backward()
    _, token_stats = step_policy_loss(
        ours_logp,
        case["old_logp"],
        case["advantages"],
        case["cu_steps"],
        agg="token-mean",
        impl="torch",
    )

    verl_logp = case["logp"].clone().requires_grad_()
    rows = lambda flat: flat[flat_index] * mask  # noqa: E731
    adv_rows = case["advantages"][:, None].expand(num_steps, width)
    verl_loss, verl_clip_frac, verl_kl = verl_gspo_policy_loss(
        rows(verl_logp), rows(case["old_logp"]), adv_rows, mask, 0.2, 0.2
    )
    verl_loss.backward()

    assert stats["clip_frac"] > 0  # parity covers clipped steps too
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(loss, verl_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours_logp.grad, verl_logp.grad, atol=atol, rtol=rtol)
    # verl's token-averaged clip fraction and ppo_kl are our stats under agg="token-mean"
    assert token_stats["clip_frac"] == pytest.approx(verl_clip_frac, abs=atol)
    assert token_stats["approx_kl"] == pytest.approx(verl_kl, abs=atol, rel=rtol)
