"""steppo_fast.integrations.verl against the real verl 0.9 (installed by
scripts/setup_verl_env.sh into .venv-verl; skipped with a reason where verl is absent)."""

import numpy as np
import pytest
import torch

verl = pytest.importorskip(
    "verl",
    reason="verl is not installed here; CI runs this file in .venv-verl "
    "(scripts/setup_verl_env.sh)",
)
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from _verl_oracle import (  # noqa: E402
    oracle_step_advantages,
    oracle_step_losses,
    oracle_steps,
    oracle_verl_agg,
    random_mask,
)
from conftest import TOL  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import steppo_fast.integrations.verl as sv  # noqa: E402

MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def actor_config(clip_low=0.2, clip_high=0.28, clip_c=3.0, **global_info):
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        clip_ratio_c=clip_c,
        use_torch_compile=False,
    )
    config.global_batch_info.update(global_info)  # as verl's ppo_loss fills it
    return config


def random_batch(mask, generator, dtype=torch.float32, spread=0.3):
    """old/new log-probs and advantages constant over each step (as estimators produce)."""
    rows, length = mask.shape
    old = (-torch.rand(rows, length, generator=generator, dtype=torch.float64) * 2).to(dtype)
    new = (
        old.double() + spread * torch.randn(rows, length, generator=generator, dtype=torch.float64)
    ).to(dtype)
    adv = torch.zeros(rows, length, dtype=torch.float64)
    for r, s, e in oracle_steps(mask):
        adv[r, s:e] = torch.randn((), generator=generator, dtype=torch.float64)
    return old, new.requires_grad_(), adv.to(dtype)


def loss_and_grad(fn, old, new, adv, mask, mode, config, weights=None):
    if new.grad is not None:
        new.grad = None
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=new,
        advantages=adv,
        response_mask=mask.bool(),
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach().double(), new.grad.double().clone(), metrics


def test_registry_names_resolve_through_verl():
    assert core_algos.get_policy_loss_fn("steppo") is sv.compute_policy_loss_steppo
    assert (
        core_algos.get_policy_loss_fn("steppo_dual_clip") is sv.compute_policy_loss_steppo_dual_clip
    )
    assert core_algos.get_adv_estimator_fn("steppo") is sv.compute_steppo_advantage
    assert core_algos.get_adv_estimator_fn("steppo_mc") is sv.compute_steppo_mc_advantage


GLOBAL_INFOS = [dict(), dict(dp_size=2, batch_num_tokens=97, global_batch_size=16)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
@pytest.mark.parametrize("clips", [(0.2, 0.28), (3e-4, 4e-4)])  # default-ish and StepPO's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_step_per_row_equals_verl_gspo(mode, info, clips, dtype):
    """Rows layout: the steppo loss is verl's own gspo loss, value and gradient, in every
    loss_agg_mode (seq-mean-token-mean is the StepPO / verl-agent setting)."""
    g = torch.Generator().manual_seed(11)
    mask = random_mask(8, 12, multi_turn=False, generator=g)
    old, new, adv = random_batch(mask, g, dtype)
    config = actor_config(*clips, **info)
    gspo = core_algos.get_policy_loss_fn("gspo")
    steppo = core_algos.get_policy_loss_fn("steppo")
    # verl's gspo on the same values in fp32 (steppo_fast accumulates bf16 inputs in fp32)
    new32 = new.detach().float().requires_grad_()
    expected, expected_grad, _ = loss_and_grad(
        gspo, old.float(), new32, adv.float(), mask, mode, config
    )
    loss, grad, metrics = loss_and_grad(steppo, old, new, adv, mask, mode, config)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss, expected, atol=atol, rtol=rtol)
    if dtype == torch.bfloat16:  # the gradient w.r.t. a bf16 leaf is rounded to bf16
        atol, rtol = 1e-6, 2.0**-8
    torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=rtol)
    assert metrics["actor/steppo_num_steps"] == 8.0
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)


def test_tiny_clip_range_really_clips():
    """Guards the test above: with StepPO's clip range some steps are clipped (zero grad)."""
    g = torch.Generator().manual_seed(11)
    mask = random_mask(8, 12, multi_turn=False, generator=g)
    old, new, adv = random_batch(mask, g)
    _, _, metrics = loss_and_grad(
        sv.compute_policy_loss_steppo,
        old,
        new,
        adv,
        mask,
        "seq-mean-token-mean",
        actor_config(3e-4, 4e-4),
    )
    assert 0.0 < metrics["actor/pg_clipfrac"] < 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
def test_multi_turn_rows_follow_verl_agg_loss(mode, info):
    """Multi-turn rows: the loss is verl's real agg_loss applied to the matrix that holds each
    step's StepPO loss on its tokens (loop oracle for the step losses)."""
    g = torch.Generator().manual_seed(4)
    mask = random_mask(6, 14, multi_turn=True, generator=g)
    old, new, adv = random_batch(mask, g, torch.float64)
    loss, _, _ = loss_and_grad(
        sv.compute_policy_loss_steppo, old, new, adv, mask, mode, actor_config(0.1, 0.12, **info)
    )
    loss_mat = torch.zeros(mask.shape, dtype=torch.float64)
    per_step = oracle_step_losses(new.detach(), old, adv, mask, 0.1, 0.12)
    for (r, s, e), step_loss in zip(oracle_steps(mask), per_step):
        loss_mat[r, s:e] = step_loss
    expected = core_algos.agg_loss(loss_mat, mask.bool(), mode, **info)
    assert loss.item() == pytest.approx(float(expected), rel=1e-10, abs=1e-12)


def split_into_rows(mask, old, new, adv, length):
    """The same steps laid out one per row: [S, length] tensors and the row of each step."""
    steps = oracle_steps(mask)
    out = [torch.zeros(len(steps), length, dtype=t.dtype) for t in (old, adv)]
    rows_mask = torch.zeros(len(steps), length)
    new_rows = torch.zeros(len(steps), length, dtype=new.dtype)
    for k, (r, s, e) in enumerate(steps):
        rows_mask[k, : e - s] = 1
        out[0][k, : e - s], out[1][k, : e - s] = old[r, s:e], adv[r, s:e]
        new_rows[k, : e - s] = new.detach()[r, s:e]
        new_rows[k, e - s :] = -1.0  # padding garbage must not matter
    return rows_mask, out[0], new_rows.requires_grad_(), out[1], steps


@pytest.mark.parametrize("mode", ["token-mean", "token-sum"])
@pytest.mark.parametrize("dp_size", [1, 4])
def test_multi_turn_equals_same_steps_one_per_row(mode, dp_size):
    g = torch.Generator().manual_seed(9)
    mask = random_mask(5, 16, multi_turn=True, generator=g)
    old, new, adv = random_batch(mask, g)
    info = dict(dp_size=dp_size, batch_num_tokens=int(mask.sum()) * dp_size)
    config = actor_config(0.2, 0.2, **info)
    loss, grad, _ = loss_and_grad(sv.compute_policy_loss_steppo, old, new, adv, mask, mode, config)
    rows_mask, old_r, new_r, adv_r, steps = split_into_rows(mask, old, new, adv, 4)
    loss_r, grad_r, _ = loss_and_grad(
        sv.compute_policy_loss_steppo, old_r, new_r, adv_r, rows_mask, mode, config
    )
    torch.testing.assert_close(loss, loss_r, atol=1e-6, rtol=1e-6)
    for k, (r, s, e) in enumerate(steps):
        torch.testing.assert_close(grad[r, s:e], grad_r[k, : e - s], atol=1e-7, rtol=1e-6)
    assert grad_r[rows_mask == 0].abs().max() == 0 and grad[mask == 0].abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_mini_batch_loss(mode):
    """With verl's global counts, micro-batch losses add up to the whole mini-batch loss."""
    g = torch.Generator().manual_seed(2)
    mask = random_mask(6, 10, multi_turn=True, generator=g)
    old, new, adv = random_batch(mask, g, torch.float64)
    info = dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=6)
    full, _, _ = loss_and_grad(
        sv.compute_policy_loss_steppo, old, new, adv, mask, mode, actor_config(**info)
    )
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(
        loss_and_grad(
            sv.compute_policy_loss_steppo,
            old[p],
            new.detach()[p].requires_grad_(),
            adv[p],
            mask[p],
            mode,
            actor_config(**info),
        )[0]
        for p in parts
    )
    assert float(total) == pytest.approx(float(full), rel=1e-12)


def test_rollout_is_weights():
    g = torch.Generator().manual_seed(6)
    mask = random_mask(6, 9, multi_turn=False, generator=g)
    old, new, adv = random_batch(mask, g)
    config = actor_config()
    row_w = torch.rand(6, 1, generator=g).expand(6, 9).contiguous()  # constant per step
    mode = "seq-mean-token-mean"
    expected, expected_grad, _ = loss_and_grad(
        core_algos.get_policy_loss_fn("gspo"), old, new, adv, mask, mode, config, row_w
    )
    loss, grad, _ = loss_and_grad(
        sv.compute_policy_loss_steppo, old, new, adv, mask, mode, config, row_w
    )
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    # weights varying inside a step (multi-turn): the value is exactly verl's weighted agg
    mask = random_mask(4, 12, multi_turn=True, generator=g)
    old, new, adv = random_batch(mask, g, torch.float64)
    tok_w = torch.rand(4, 12, generator=g, dtype=torch.float64)
    for mode in MODES:
        loss, _, _ = loss_and_grad(
            sv.compute_policy_loss_steppo, old, new, adv, mask, mode, config, tok_w
        )
        per_step = oracle_step_losses(new.detach(), old, adv, mask, 0.2, 0.28)
        expected = oracle_verl_agg(per_step, mask, mode, token_weights=tok_w)
        assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12), mode


def test_dual_clip_variant():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.tensor([[2.0, 2.0, 0], [0.1, 0.1, 0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1, 0], [-1, -1, -1]], dtype=torch.float64)
    config = actor_config(0.2, 0.2, clip_c=3.0)
    # step 0: rho = e^2 = 7.39 > 3 with A = -1 -> L = 3 (dual clip) instead of 7.39
    loss, _, metrics = loss_and_grad(
        sv.compute_policy_loss_steppo_dual_clip, old, new, adv, mask, "seq-mean-token-mean", config
    )
    assert loss.item() == pytest.approx((3.0 + float(np.exp(0.1))) / 2, rel=1e-12)
    assert metrics["actor/pg_clipfrac_lower"] == 0.5
    plain, _, _ = loss_and_grad(
        sv.compute_policy_loss_steppo, old, new, adv, mask, "seq-mean-token-mean", config
    )
    assert plain.item() == pytest.approx((float(np.exp(2.0)) + float(np.exp(0.1))) / 2)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(3, 7, multi_turn=True, generator=g)
    old, new, adv = random_batch(mask, g, torch.float64, spread=0.05)
    config = actor_config(0.1, 0.1, dp_size=2, batch_num_tokens=30, global_batch_size=5)
    for fn in (sv.compute_policy_loss_steppo, sv.compute_policy_loss_steppo_dual_clip):
        for mode in MODES:
            torch.autograd.gradcheck(
                lambda lp, fn=fn, mode=mode: fn(old, lp, adv, mask.bool(), mode, config)[0],
                (new.detach().clone().requires_grad_(),),
            )


def test_empty_batch_and_extreme_ratios():
    new = torch.zeros(2, 5, requires_grad=True)
    loss, grad, _ = loss_and_grad(
        sv.compute_policy_loss_steppo,
        torch.zeros(2, 5),
        new,
        torch.zeros(2, 5),
        torch.zeros(2, 5),
        "seq-mean-token-mean",
        actor_config(),
    )
    assert loss.item() == 0.0 and grad.abs().max() == 0
    new = torch.tensor([[60.0, 60, 0], [-80, 0, 0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1, 0], [-1, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, grad, _ = loss_and_grad(
        sv.compute_policy_loss_steppo,
        torch.zeros(2, 3),
        new,
        adv,
        mask,
        "token-mean",
        actor_config(),
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bad_inputs_raise():
    config = actor_config()
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="config"):
        sv.compute_policy_loss_steppo(z, z, z, z.bool(), "token-mean", None)
    with pytest.raises(ValueError, match="log_prob: shape"):
        sv.compute_policy_loss_steppo(z, torch.zeros(2, 4), z, z.bool(), "token-mean", config)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        sv.compute_policy_loss_steppo(z, z, z, z.bool(), "seq-mean", config)


def test_advantage_through_verl_compute_advantage():
    """verl's own compute_advantage calls the registered estimators with its kwargs."""
    from verl.trainer.ppo.ray_trainer import compute_advantage

    g = torch.Generator().manual_seed(8)
    mask = random_mask(5, 8, multi_turn=True, generator=g)
    rewards = torch.zeros(5, 8)
    for r in range(5):
        rewards[r, int(mask[r].nonzero().max())] = float(torch.randn((), generator=g))
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": np.array([f"p{r // 2}" for r in range(5)], dtype=object)},
    )
    out = compute_advantage(
        data, adv_estimator="steppo_mc", gamma=0.9, config=AlgoConfig(gamma=0.9, lam=0.7)
    )
    e_adv, e_ret = oracle_step_advantages(rewards.double(), None, mask, gamma=0.9)
    torch.testing.assert_close(out.batch["advantages"].double(), e_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.batch["returns"].double(), e_ret, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="verl 0.9's compute_advantage passes values only"):
        compute_advantage(data, adv_estimator="steppo", config=AlgoConfig())


def test_steppo_estimator_with_values_and_apply_on_data_proto():
    g = torch.Generator().manual_seed(12)
    mask = random_mask(6, 5, multi_turn=False, generator=g)
    rewards = torch.randn(6, 5, generator=g) * mask
    values = torch.randn(6, 5, generator=g)
    uid = np.array(["t1", "t0", "t1", "t0", "t2", "t1"], dtype=object)
    step = np.array([2, 0, 0, 1, 0, 1], dtype=object)
    config = AlgoConfig(gamma=0.95, lam=0.9)
    fn = core_algos.get_adv_estimator_fn("steppo")
    adv, ret = fn(
        token_level_rewards=rewards,
        response_mask=mask,
        config=config,
        index=uid,
        values=values,
        traj_uid=uid,
        step_idx=step,
    )
    e_adv, e_ret = oracle_step_advantages(
        rewards.double(), values.double(), mask, uid, step, gamma=0.95, lam=0.9
    )
    torch.testing.assert_close(adv.double(), e_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), e_ret, atol=1e-6, rtol=1e-6)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask, "values": values},
        non_tensors={"traj_uid": uid, "step_idx": step},
    )
    sv.apply_steppo_advantage(data, gamma=0.95, lam=0.9)
    torch.testing.assert_close(data.batch["advantages"], adv)
    torch.testing.assert_close(data.batch["returns"], ret)
    # the call verl makes for estimators that accept the batch (verl PR #7473)
    from_batch = fn(
        token_level_rewards=rewards,
        response_mask=mask,
        config=config,
        index=uid,
        batch=data.batch,
        non_tensor_batch=data.non_tensor_batch,
    )
    assert torch.equal(from_batch[0], adv) and torch.equal(from_batch[1], ret)
    with pytest.raises(ValueError, match="values: StepPO's step GAE needs"):
        fn(token_level_rewards=rewards, response_mask=mask, batch=data.batch.exclude("values"))
    with pytest.raises(ValueError, match="reward_baselines"):
        fn(
            token_level_rewards=rewards,
            response_mask=mask,
            values=values,
            reward_baselines=torch.zeros(6),
        )
