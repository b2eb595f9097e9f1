"""The step-boundary critic loss and the per-step log-prob mismatch on verl rows, against loop
oracles (pure torch: steppo_fast.integrations._verl_value / _verl_metrics never import verl, so
this runs in the main environment too)."""

import math

import pytest
import torch
from _verl_oracle import oracle_steps, oracle_verl_agg, random_mask

from steppo_fast.integrations._verl_metrics import step_logp_mismatch
from steppo_fast.integrations._verl_rows import VERL_LOSS_AGG_MODES
from steppo_fast.integrations._verl_value import step_value_loss_rows

GLOBALS = [
    dict(),
    dict(dp_size=2, batch_num_tokens=57, global_batch_size=13),
    dict(dp_size=1, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=4),
]


def oracle_step_value_losses(vpreds, values, returns, mask, clip):
    """0.5 max((v - R)^2, (clipped v - R)^2) at each step's first token, oracle_steps order."""
    out = []
    for r, s, _ in oracle_steps(mask):
        v, old, ret = float(vpreds[r, s].detach()), float(values[r, s]), float(returns[r, s])
        err = (v - ret) ** 2
        if clip is not None:
            err = max(err, (old + min(max(v - old, -clip), clip) - ret) ** 2)
        out.append(0.5 * err)
    return out


def random_rows(mask, g):
    shape = mask.shape
    vpreds = torch.randn(shape, generator=g, dtype=torch.float64)
    values = vpreds + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    returns = torch.randn(shape, generator=g, dtype=torch.float64)
    return vpreds.requires_grad_(), values, returns


@pytest.mark.parametrize("mode", VERL_LOSS_AGG_MODES)
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("info", GLOBALS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_step_value_loss_matches_oracle(mode, multi_turn, info, clip):
    g = torch.Generator().manual_seed(13)
    mask = random_mask(5, 9, multi_turn=multi_turn, generator=g, empty_rows=True)
    vpreds, values, returns = random_rows(mask, g)
    loss, stats = step_value_loss_rows(
        vpreds, values, returns, mask, loss_agg_mode=mode, clip=clip, **info
    )
    per_step = oracle_step_value_losses(vpreds, values, returns, mask, clip)
    expected = oracle_verl_agg(per_step, mask, mode, **info)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert stats["num_steps"] == len(per_step)
    # gradient only at step starts
    loss.backward()
    starts = torch.zeros(mask.shape, dtype=torch.bool)
    for r, s, _ in oracle_steps(mask):
        starts[r, s] = True
    assert vpreds.grad[~starts].abs().max() == 0
    if clip is None:
        assert (vpreds.grad[starts] != 0).all()


def test_micro_batches_sum_to_mini_batch_loss():
    g = torch.Generator().manual_seed(4)
    mask = random_mask(6, 10, multi_turn=True, generator=g)
    vpreds, values, returns = random_rows(mask, g)
    info = dict(batch_num_tokens=int(mask.sum()), global_batch_size=6)
    for mode in VERL_LOSS_AGG_MODES:
        full, _ = step_value_loss_rows(vpreds, values, returns, mask, loss_agg_mode=mode, **info)
        parts = sum(
            step_value_loss_rows(
                vpreds[p], values[p], returns[p], mask[p], loss_agg_mode=mode, **info
            )[0]
            for p in (slice(0, 1), slice(1, 4), slice(4, 6))
        )
        assert float(parts) == pytest.approx(float(full), rel=1e-12), mode


def test_clip_fraction_and_fp32():
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])
    vpreds = torch.tensor([[2.0, 9, 9, 0.0], [1.0, 9, 9, 9]], requires_grad=True)
    values = torch.zeros(2, 4)
    returns = torch.tensor([[3.0, 3, 0, 1.0], [0.0, 0, 0, 0]])
    # steps: (0,0) v=2 R=3 -> clipped 0.5 worse; (0,3) v=0 R=1 unclipped; (1,0) v=1 R=0 clipped
    # 0.5 better (the max keeps the unclipped). token-mean weights n_s = 2, 1, 1.
    loss, stats = step_value_loss_rows(
        vpreds, values, returns, mask, loss_agg_mode="token-mean", clip=0.5
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((2 * 0.5 * 2.5**2 + 0.5 * 1 + 0.5 * 1) / 4)
    assert stats["clip_frac"] == pytest.approx(2 / 4)


def test_empty_and_bad_inputs():
    z = torch.zeros(2, 3, requires_grad=True)
    loss, stats = step_value_loss_rows(z, z.detach(), z.detach(), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().max() == 0 and stats["num_steps"] == 0
    with pytest.raises(ValueError, match=r"returns: shape \(2, 4\)"):
        step_value_loss_rows(z, z, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        step_value_loss_rows(z, z, z, torch.ones(2, 3), loss_agg_mode="step-mean")


def test_step_logp_mismatch_matches_loops():
    g = torch.Generator().manual_seed(8)
    mask = random_mask(5, 12, multi_turn=True, generator=g, empty_rows=True)
    rollout = -torch.rand(5, 12, generator=g)
    old = rollout + 0.05 * torch.randn(5, 12, generator=g)
    out = step_logp_mismatch(rollout, old, mask, prefix="x/")
    steps = oracle_steps(mask)
    per_step = [
        abs(sum(float(old[r, t] - rollout[r, t]) for t in range(s, e)) / (e - s))
        for r, s, e in steps
    ]
    abs_diff = [
        sum(abs(float(old[r, t] - rollout[r, t])) for t in range(s, e)) / (e - s)
        for r, s, e in steps
    ]
    assert out["x/steppo_step_logp_mismatch"] == pytest.approx(sum(per_step) / len(per_step))
    assert out["x/steppo_step_logp_mismatch_max"] == pytest.approx(max(per_step))
    assert out["x/steppo_step_logp_abs_diff_mean"] == pytest.approx(sum(abs_diff) / len(abs_diff))
    turn_of, seen = [], {}
    for r, _, _ in steps:
        turn_of.append(seen.get(r, 0))
        seen[r] = turn_of[-1] + 1
    for k in range(max(turn_of) + 1):
        vals = [m for m, t in zip(per_step, turn_of) if t == k]
        assert out[f"x/steppo_step_logp_mismatch/turn_{k}"] == pytest.approx(sum(vals) / len(vals))
    assert not any(math.isnan(v) for v in out.values())
    assert step_logp_mismatch(rollout, old, torch.zeros(5, 12)) == {}
    with pytest.raises(ValueError, match="old_log_probs: shape"):
        step_logp_mismatch(rollout, old[:, :3], mask)
