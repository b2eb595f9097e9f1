"""verl row layout -> CSR steps, verl's loss aggregation mapped onto step_policy_loss, and the
StepPO step advantage on verl rows. Pure torch (steppo_fast.integrations._verl_rows /
_verl_advantage never import verl), so this runs in the main environment too."""

import pytest
import torch
from _verl_oracle import (
    oracle_step_advantages,
    oracle_step_losses,
    oracle_steps,
    oracle_verl_agg,
    random_mask,
)
from conftest import TOL

from steppo_fast import step_policy_loss
from steppo_fast.integrations._verl_advantage import step_advantages, trajectory_row_order
from steppo_fast.integrations._verl_rows import (
    VERL_LOSS_AGG_MODES,
    steps_from_response_mask,
    verl_loss_aggregation,
)


def test_steps_hand_case():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    steps = steps_from_response_mask(mask)
    assert steps.token_index.tolist() == [0, 1, 4, 12, 13, 14, 15, 16, 17]
    assert steps.cu_steps.tolist() == [0, 2, 3, 9] and steps.cu_steps.dtype == torch.int32
    assert steps.step_row.tolist() == [0, 0, 2]
    assert steps.step_start.tolist() == [0, 4, 0]
    assert steps.cu_row_steps.tolist() == [0, 2, 2, 3]
    assert steps.row_tokens.tolist() == [3, 0, 6]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_steps_match_oracle(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(6, 11, multi_turn=seed > 0, generator=g, empty_rows=True).to(dtype)
    steps = steps_from_response_mask(mask)
    expected = oracle_steps(mask)
    assert steps.step_row.tolist() == [r for r, _, _ in expected]
    assert steps.step_start.tolist() == [s for _, s, _ in expected]
    assert (steps.cu_steps[1:] - steps.cu_steps[:-1]).tolist() == [e - s for _, s, e in expected]
    assert steps.token_index.tolist() == [r * 11 + t for r, s, e in expected for t in range(s, e)]


def test_steps_empty_batch_and_bad_mask():
    steps = steps_from_response_mask(torch.zeros(0, 5))
    assert steps.num_steps == 0 and steps.cu_steps.tolist() == [0]
    steps = steps_from_response_mask(torch.zeros(3, 4))
    assert steps.num_steps == 0 and steps.cu_row_steps.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"response_mask\[1, 2\] = 0.5"):
        steps_from_response_mask(torch.tensor([[1.0, 1, 0], [1, 0, 0.5]]))
    with pytest.raises(ValueError, match="response_mask: expected 2-D"):
        steps_from_response_mask(torch.ones(4))


GLOBALS = [
    dict(),
    dict(dp_size=2, batch_num_tokens=57, global_batch_size=13),
    dict(dp_size=1, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=4),
]


@pytest.mark.parametrize("mode", VERL_LOSS_AGG_MODES)
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("info", GLOBALS)
def test_aggregation_matches_verl_semantics(mode, multi_turn, info):
    g = torch.Generator().manual_seed(7)
    mask = random_mask(5, 9, multi_turn=multi_turn, generator=g, empty_rows=True)
    old = 0.3 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    new = old + 0.2 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(5, 9, generator=g, dtype=torch.float64)
    steps = steps_from_response_mask(mask)
    agg, weight, norm = verl_loss_aggregation(mode, steps, **info)
    step_adv = torch.tensor(
        [float(adv[r, s:e].mean()) for r, s, e in oracle_steps(mask)], dtype=torch.float64
    )
    loss, _ = step_policy_loss(
        steps.gather(new),
        steps.gather(old),
        step_adv,
        steps.cu_steps,
        clip_low=0.1,
        clip_high=0.15,
        agg=agg,
        step_weight=weight,
        normalizer=norm,
        impl="torch",
    )
    per_step = oracle_step_losses(new, old, adv, mask, 0.1, 0.15)
    expected = oracle_verl_agg(per_step, mask, mode, **info)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_aggregation_errors_and_empty():
    steps = steps_from_response_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl_loss_aggregation("seq-mean", steps)
    with pytest.raises(ValueError, match="global_batch_size.*dp_size > 1"):
        verl_loss_aggregation("seq-mean-token-mean", steps, dp_size=2)
    with pytest.raises(ValueError, match="batch_num_tokens.*dp_size > 1"):
        verl_loss_aggregation("token-mean", steps, dp_size=2)
    with pytest.raises(ValueError, match="dp_size"):
        verl_loss_aggregation("token-mean", steps, dp_size=0)
    with pytest.raises(ValueError, match="batch_num_tokens.*normaliser is 0"):
        verl_loss_aggregation("token-mean", steps, batch_num_tokens=0)
    empty = steps_from_response_mask(torch.zeros(2, 3))
    assert verl_loss_aggregation("token-mean", empty, batch_num_tokens=0)[2] is None
    assert verl_loss_aggregation("seq-mean-token-mean", empty)[2] is None


def test_step_advantage_hand_case():
    # one row, two steps: [0,1] and [4]; reward 1 at position 5 (an observation token after
    # step 1) belongs to step 1; V at each step's first token. gamma = lam = 1:
    # A_1 = 1 - 0.25 = 0.75, A_0 = (0 + 0.25 - 0.5) + 0.75 = 0.5, R = A + V = [1, 1].
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    rewards = torch.tensor([[0.0, 0, 0, 0, 0, 1]])
    values = torch.tensor([[0.5, 9, 9, 9, 0.25, 9]])
    adv, ret = step_advantages(rewards, values, mask, whiten=False, impl="torch")
    assert adv.tolist() == [[0.5, 0.5, 0, 0, 0.75, 0]]
    assert ret.tolist() == [[1.0, 1.0, 0, 0, 1.0, 0]]


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_step_advantage_rows_with_traj_ids_matches_oracle(dtype, whiten):
    g = torch.Generator().manual_seed(3)
    mask = random_mask(7, 6, multi_turn=False, generator=g)
    rewards = (torch.randn(7, 6, generator=g) * mask).to(dtype)
    values = torch.randn(7, 6, generator=g).to(dtype)
    traj_uid = ["a", "b", "a", "c", "b", "a", "c"]
    step_idx = [2, 1, 0, 0, 0, 1, 1]
    adv, ret = step_advantages(
        rewards,
        values,
        mask,
        traj_uid=traj_uid,
        step_idx=step_idx,
        gamma=0.9,
        lam=0.8,
        whiten=whiten,
        impl="torch",
    )
    e_adv, e_ret = oracle_step_advantages(
        rewards.double(),
        values.double(),
        mask,
        traj_uid,
        step_idx,
        gamma=0.9,
        lam=0.8,
        whiten=whiten,
    )
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(adv.double(), e_adv, atol=atol, rtol=rtol)
    torch.testing.assert_close(ret.double(), e_ret, atol=atol, rtol=rtol)


def test_step_advantage_multi_turn_equals_rows_layout():
    """The same steps as multi-turn rows (one row per trajectory) or one row per step (with
    traj_uid / step_idx, rows shuffled) give the same step advantages."""
    g = torch.Generator().manual_seed(5)
    merged = random_mask(3, 10, multi_turn=True, generator=g)
    rewards = torch.randn(3, 10, generator=g) * merged
    values = torch.randn(3, 10, generator=g)
    adv_m, ret_m = step_advantages(rewards, values, merged, gamma=0.95, lam=0.9, impl="torch")
    steps = oracle_steps(merged)
    # rows layout: step k of trajectory r -> one row [L], its reward summed as in the merged row
    perm = torch.randperm(len(steps), generator=g).tolist()
    length = 4
    mask_r, rew_r, val_r = (
        torch.zeros(len(steps), length),
        torch.zeros(len(steps), length),
        torch.zeros(len(steps), length),
    )
    uid, idx = [None] * len(steps), [None] * len(steps)
    for k, (r, s, e) in enumerate(steps):
        row = perm[k]
        nxt = steps[k + 1][1] if k + 1 < len(steps) and steps[k + 1][0] == r else 10
        mask_r[row, : e - s] = 1
        rew_r[row, 0] = rewards[r, s:nxt].sum()
        val_r[row, 0] = values[r, s]
        uid[row], idx[row] = f"traj{r}", s
    adv_r, ret_r = step_advantages(
        rew_r, val_r, mask_r, traj_uid=uid, step_idx=idx, gamma=0.95, lam=0.9, impl="torch"
    )
    for k, (r, s, e) in enumerate(steps):
        row = perm[k]
        torch.testing.assert_close(adv_r[row, : e - s], adv_m[r, s:e], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ret_r[row, : e - s], ret_m[r, s:e], atol=1e-5, rtol=1e-5)


def test_step_advantage_no_critic_and_empty():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 1, 0, 2], [0, 0, 3, 0]])
    adv, ret = step_advantages(rewards, None, mask, gamma=0.5, whiten=False, impl="torch")
    # row 0: r = [1, 2] -> G = [1 + 0.5 * 2, 2]; row 1: r = [3]
    assert ret.tolist() == [[2.0, 0, 2, 2], [3, 3, 3, 0]] and torch.equal(adv, ret)
    adv, ret = step_advantages(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    assert adv.shape == (0, 4) and ret.shape == (0, 4)


def test_step_advantage_errors():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"token_level_rewards: \[0, 0\] = 2.0 lies before"):
        step_advantages(torch.tensor([[2.0, 0, 0], [0, 0, 0]]), None, mask)
    with pytest.raises(ValueError, match="repeat step_idx 1"):
        trajectory_row_order(3, ["a", "a", "b"], [1, 1, 0])
    with pytest.raises(ValueError, match=r"step_idx\[1\] = 'x' is not an integer"):
        trajectory_row_order(2, ["a", "a"], [0, "x"])
    with pytest.raises(ValueError, match="step_idx: given without traj_uid"):
        trajectory_row_order(2, None, [0, 1])
    with pytest.raises(ValueError, match="traj_uid: length 1 != number of rows 2"):
        trajectory_row_order(2, ["a"])
    with pytest.raises(ValueError, match="values: shape"):
        step_advantages(torch.zeros(2, 3), torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="rewards"):  # non-finite rewards rejected by step_gae
        step_advantages(torch.tensor([[0.0, float("nan"), 0], [0, 0, 0]]), None, mask)


def test_trajectory_row_order():
    perm, cu = trajectory_row_order(5, ["b", "a", "b", "c", "a"], [3, 1, 0, 0, 0])
    assert perm.tolist() == [2, 0, 4, 1, 3] and cu.tolist() == [0, 2, 4, 5]
    perm, cu = trajectory_row_order(3, ["x", "y", "x"])  # no step_idx: batch order
    assert perm.tolist() == [0, 2, 1] and cu.tolist() == [0, 2, 3]
