"""group_advantages (GRPO / Dr.GRPO / RLOO) and gigpo_advantages: loop oracles from the math,
hand-worked cases, random layouts with arbitrary unsorted group ids, dtypes and gradients.
(step_gae, discounted_returns, whiten: test_advantages.py; ValueError paths:
test_advantages_errors.py.)"""

import math

import pytest
import torch
from _csr import offsets
from _impls import impl_or_skip, impls_for
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo_fast import gigpo_advantages, group_advantages


# ----------------------------------------------------------------------------- loop oracles
def normalise_within(x, keys, mode, eps):
    """Per entry, normalise by the members sharing its key (plain Python, O(n^2)).

    mode: "std" (x - mean) / (unbiased std + eps), "mean" x - mean, "loo" n/(n-1) (x - mean);
    a key held by one entry gives 0."""
    out = []
    for i, xi in enumerate(x):
        members = [x[j] for j in range(len(x)) if keys[j] == keys[i]]
        n = len(members)
        mean = sum(members) / n
        if n == 1:
            out.append(0.0)
        elif mode == "std":
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
            out.append((xi - mean) / (std + eps))
        elif mode == "mean":
            out.append(xi - mean)
        else:
            out.append(n / (n - 1) * (xi - mean))
    return out


GROUP_MODE = {"grpo": "std", "dr_grpo": "mean", "rloo": "loo"}
GIGPO_MODE = {"mean_std_norm": "std", "mean_norm": "mean"}


def gigpo_oracle(rewards, cu, group, anchor, step_weight, gamma, mode, eps):
    n_trajs = len(cu) - 1
    traj_of = [b for b in range(n_trajs) for _ in range(cu[b], cu[b + 1])]
    episode_return = [sum(rewards[cu[b] : cu[b + 1]]) for b in range(n_trajs)]
    episode = normalise_within(episode_return, group, GIGPO_MODE[mode], eps)
    returns = [0.0] * len(rewards)
    for b in range(n_trajs):
        g = 0.0
        for t in reversed(range(cu[b], cu[b + 1])):
            g = rewards[t] + gamma * g
            returns[t] = g
    keys = [(group[traj_of[t]], anchor[t]) for t in range(len(rewards))]
    step = normalise_within(returns, keys, GIGPO_MODE[mode], eps)
    return [episode[traj_of[t]] + step_weight * step[t] for t in range(len(rewards))]


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol
    )


GROUP_IDS = [-3, 0, 7, 10**12]  # arbitrary, not 0..G-1, drawn unsorted


# ----------------------------------------------------------------------------- hand-worked
def test_group_advantages_worked_by_hand():
    # group 42: scores {3, 1, 2}: mean 2, unbiased std 1; group -7: {7, 5}: mean 6, std sqrt(2);
    # group 0: {100} alone -> 0 in every mode.
    scores = torch.tensor([3.0, 7.0, 1.0, 2.0, 5.0, 100.0], dtype=torch.float64)
    group = torch.tensor([42, -7, 42, 42, -7, 0])
    r2 = math.sqrt(2.0)
    grpo = group_advantages(scores, group, mode="grpo", eps=0.0)
    close(grpo, [1.0, 1.0 / r2, -1.0, 0.0, -1.0 / r2, 0.0], torch.float64)
    dr = group_advantages(scores, group, mode="dr_grpo")
    close(dr, [1.0, 1.0, -1.0, 0.0, -1.0, 0.0], torch.float64)
    # rloo = s - mean of the others: 3 - (1+2)/2 = 1.5, 7 - 5 = 2, 1 - 2.5 = -1.5, 2 - 2 = 0
    rloo = group_advantages(scores, group, mode="rloo")
    close(rloo, [1.5, 2.0, -1.5, 0.0, -2.0, 0.0], torch.float64)


def test_gigpo_worked_by_hand():
    # group 1: A rewards [0, 1] anchors [5, 6]; B rewards [0, 0, 0] anchors [5, 6, 9];
    # group 2: C rewards [2] anchor [5] (alone in its group: episode 0; its class (2, 5) is not
    # the class (1, 5) although the anchor id is shared).
    # Episode sums A=1, B=0 -> mean 0.5 -> A +0.5, B -0.5 (mean_norm).
    # Returns (gamma=1): A [1, 1], B [0, 0, 0]; classes (1,5)={A0:1, B0:0}, (1,6)={A1:1, B1:0},
    # (1,9)={B2} alone -> step parts A [+0.5, +0.5], B [-0.5, -0.5, 0], C [0].
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    cu = offsets([2, 3, 1])
    group = torch.tensor([1, 1, 2])
    anchor = torch.tensor([5, 6, 5, 6, 9, 5])
    out = gigpo_advantages(rewards, cu, group, anchor, step_weight=0.5, mode="mean_norm")
    close(out, [0.75, 0.75, -0.75, -0.75, -0.5, 0.0], torch.float64)
    # mean_std_norm, eps = 0: every pair {1, 0} has std sqrt(0.5), so +-0.5 -> +-sqrt(0.5).
    out = gigpo_advantages(
        rewards, cu, group, anchor, step_weight=0.5, mode="mean_std_norm", eps=0.0
    )
    h = math.sqrt(0.5)
    close(out, [1.5 * h, 1.5 * h, -1.5 * h, -1.5 * h, -h, 0.0], torch.float64)


# ----------------------------------------------------------------------------- random layouts
@settings(max_examples=60, deadline=None)
@given(
    group=st.lists(st.sampled_from(GROUP_IDS), min_size=0, max_size=12),
    mode=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    eps=st.sampled_from([0.0, 1e-6, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_group_advantages_matches_oracle(group, mode, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(group), generator=gen, dtype=torch.float64)
    fits_int32 = all(abs(g) < 2**31 for g in group)
    ids = torch.tensor(group, dtype=torch.int32 if fits_int32 and seed % 2 else torch.int64)
    out = group_advantages(scores, ids, mode=mode, eps=eps, impl="torch")
    expected = normalise_within(scores.tolist(), group, GROUP_MODE[mode], eps)
    close(out, expected, torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=0, max_size=8),
    mode=st.sampled_from(["mean_std_norm", "mean_norm"]),
    gamma=st.sampled_from([0.0, 0.9, 1.0]),
    step_weight=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_gigpo_matches_oracle(lengths, mode, gamma, step_weight, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    # binary-ish rewards make ties (and equal-return classes with zero std) common
    rewards = (
        torch.randint(0, 3, (n,), generator=gen).double() * torch.rand(1, generator=gen).item()
    )
    group = [GROUP_IDS[i] for i in torch.randint(0, 3, (len(lengths),), generator=gen).tolist()]
    anchor = torch.randint(0, 3, (n,), generator=gen).tolist()
    cu = offsets(lengths)
    out = gigpo_advantages(
        rewards,
        cu,
        torch.tensor(group, dtype=torch.int64),
        torch.tensor(anchor, dtype=torch.int32),
        step_weight=step_weight,
        gamma=gamma,
        mode=mode,
        impl="torch",
    )
    expected = gigpo_oracle(
        rewards.tolist(), cu.tolist(), group, anchor, step_weight, gamma, mode, 1e-6
    )
    close(out, expected, torch.float64)


def test_gigpo_empty_trajectory_counts_as_episode_of_return_zero():
    # Trajectory 1 has no steps; it is an episode of the group with return 0 (so A's episode
    # part is 1 - mean(1, 0) = 0.5, not 0 as it would be alone).
    rewards = torch.tensor([1.0], dtype=torch.float64)
    out = gigpo_advantages(
        rewards, offsets([1, 0]), torch.tensor([3, 3]), torch.tensor([0]), mode="mean_norm"
    )
    close(out, [0.5], torch.float64)


# ----------------------------------------------------------------------------- edge cases, dtypes
def test_empty_inputs():
    empty, ids = torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    for mode in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages(empty, ids, mode=mode).shape == (0,)
    assert gigpo_advantages(empty, offsets([]), ids, ids).shape == (0,)
    out = gigpo_advantages(empty, offsets([0, 0]), torch.tensor([1, 1]), ids)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_low_precision_and_fp64_dtypes():
    group = torch.tensor([1, 2, 1, 1, 2, 3])
    scores = torch.randn(6).bfloat16()
    out = group_advantages(scores, group)
    assert out.dtype == torch.float32
    close(out, group_advantages(scores.float(), group), torch.bfloat16)
    assert group_advantages(scores.double(), group).dtype == torch.float64

    rewards = torch.randn(7).half()
    cu, anchor = offsets([3, 4]), torch.tensor([0, 1, 2, 0, 1, 1, 2])
    out = gigpo_advantages(rewards, cu, torch.tensor([5, 5]), anchor)
    assert out.dtype == torch.float32
    close(out, gigpo_advantages(rewards.float(), cu, torch.tensor([5, 5]), anchor), torch.float32)
    out64 = gigpo_advantages(rewards.double(), cu, torch.tensor([5, 5]), anchor)
    assert out64.dtype == torch.float64


@pytest.mark.parametrize(
    "group, eps",
    [
        ([4, 9, 4, 4, 9, 1, 9], 1e-6),  # sizes 3, 3 and a singleton (the default eps)
        ([4, 9, 4, 4, 2, 9, 7, 9], 1e-3),  # sizes 3, 3 and two singletons
    ],
    ids=["singleton", "two_singletons"],
)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("impl", impls_for("group_advantages"))
def test_group_advantages_gradcheck(impl, mode, group, eps):
    impl = impl_or_skip("group_advantages", impl)
    scores = torch.randn(len(group), dtype=torch.float64, requires_grad=True)
    group = torch.tensor(group)
    fn = lambda s: group_advantages(s, group, mode=mode, eps=eps, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scores,))


@pytest.mark.parametrize("impl", impls_for("group_advantages"))
def test_group_advantages_gradient_finite_when_group_scores_tie(impl):
    impl = impl_or_skip("group_advantages", impl)
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    group_advantages(scores, torch.tensor([0, 0, 0, 1]), impl=impl).sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("mode", ["mean_std_norm", "mean_norm"])
def test_gigpo_gradcheck(mode):
    rewards = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cu, group = offsets([3, 3, 2]), torch.tensor([0, 0, 0])
    anchor = torch.tensor([0, 1, 2, 0, 1, 3, 0, 1])

    def fn(r):
        return gigpo_advantages(r, cu, group, anchor, gamma=0.9, step_weight=0.7, mode=mode)

    assert torch.autograd.gradcheck(fn, (rewards,))
