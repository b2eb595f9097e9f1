"""StepBatch.microbatches / select_trajectories, bin-packing plans (numpy vs numba), and
hypothesis property tests over random trajectories."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steppo_fast.batch import StepBatch
from steppo_fast.batch import microbatch as _microbatch
from steppo_fast.batch import packing_numba as _packing_numba
from steppo_fast.batch.fields import TENSOR_FIELDS

HAS_NUMBA = _packing_numba.numba_available()
PER_STEP = ("rewards", "value_index", "anchor")


def traj(lengths, group=0, terminated=True, start=0):
    """One trajectory; ``lengths`` = (prompt, action) per step, prompts never extend (rows)."""
    steps, tok = [], start
    for p, a in lengths:
        steps.append(
            {
                "prompt_ids": list(range(tok, tok + p)),
                "action_ids": list(range(tok + p, tok + p + a)),
                "reward": float(tok),
                "logprobs": [-0.5] * a,
                "anchor": tok,
            }
        )
        tok += p + a
    return {"steps": steps, "terminated": terminated, "group": group}


def token_sizes(batch):
    return batch.traj_token_offsets.diff().tolist()


def check_microbatches(batch: StepBatch, mbs, max_tokens: int):
    """Every invariant a caller relies on."""
    sizes = token_sizes(batch)
    seen = []
    for mb in mbs:
        sub = mb.batch.validate()
        trajs = mb.traj_index.tolist()
        seen += trajs
        assert mb.traj_index.dtype == torch.long and mb.step_index.dtype == torch.long
        assert trajs == sorted(trajs)
        assert sub.num_trajs == len(trajs)
        assert sub.num_tokens == sum(sizes[b] for b in trajs)  # whole trajectories
        assert sub.num_tokens <= max_tokens or len(trajs) == 1  # budget, unless oversized
        # steps of the sub-batch = the parent's steps of these trajectories, in order
        expect = [
            s for b in trajs for s in range(int(batch.cu_trajs[b]), int(batch.cu_trajs[b + 1]))
        ]
        assert mb.step_index.tolist() == expect
        assert torch.equal(sub.rewards, batch.rewards[mb.step_index])
        if batch.anchor is not None:
            assert torch.equal(sub.anchor, batch.anchor[mb.step_index])
        acts = batch.actions_of_steps(mb.step_index)
        assert torch.equal(sub.action_ids, batch.action_ids[acts])
        if batch.rollout_logp is not None:
            assert torch.equal(sub.rollout_logp, batch.rollout_logp[acts])
        assert torch.equal(sub.terminated, batch.terminated[mb.traj_index])
        assert torch.equal(sub.group, batch.group[mb.traj_index])
        # hidden-state positions map back: same token, same position in its sequence
        assert torch.equal(
            sub.input_ids[sub.value_index], batch.input_ids[batch.value_index[mb.step_index]]
        )
        assert torch.equal(
            sub.position_ids[sub.action_index], batch.position_ids[batch.action_index[acts]]
        )
        assert torch.equal(
            sub.position_ids[sub.value_index], batch.position_ids[batch.value_index[mb.step_index]]
        )
    assert sorted(seen) == list(range(batch.num_trajs))  # each trajectory exactly once
    if mbs:
        # concatenating sliced per-step tensors reproduces the parent (after undoing the order)
        order = torch.cat([mb.step_index for mb in mbs])
        values = torch.cat([mb.batch.rewards for mb in mbs])
        restored = torch.empty_like(batch.rewards)
        restored[order] = values
        assert torch.equal(restored, batch.rewards)


def test_ffd_beats_contiguous_on_hand_case():
    # token sizes 6, 6, 4, 4 with budget 10: contiguous -> [0] [1, 2] [3]; FFD -> [0, 2] [1, 3]
    batch = StepBatch.from_trajectories(
        [traj([(3, 3)]), traj([(5, 1)]), traj([(2, 2)]), traj([(1, 3)])]
    ).validate()
    assert token_sizes(batch) == [6, 6, 4, 4]
    ffd = batch.microbatches(10)
    assert [mb.traj_index.tolist() for mb in ffd] == [[0, 2], [1, 3]]
    contiguous = batch.microbatches(10, method="contiguous")
    assert [mb.traj_index.tolist() for mb in contiguous] == [[0], [1, 2], [3]]
    check_microbatches(batch, ffd, 10)
    check_microbatches(batch, contiguous, 10)
    sub = ffd[1].batch  # trajectories 1 and 3, re-based
    assert sub.input_ids.tolist() == list(range(6)) + list(range(4))
    assert sub.cu_seqlens.tolist() == [0, 6, 10]
    assert sub.action_index.tolist() == [5, 7, 8, 9]
    assert sub.value_index.tolist() == [4, 6]
    assert sub.cu_steps.tolist() == [0, 1, 4] and sub.cu_trajs.tolist() == [0, 1, 2]


def test_oversized_trajectory_gets_its_own_microbatch():
    batch = StepBatch.from_trajectories(
        [traj([(2, 1)]), traj([(10, 5), (3, 2)]), traj([(1, 1)]), traj([(2, 2)])], layout="rows"
    )
    for method in ("ffd", "contiguous"):
        mbs = batch.microbatches(8, method=method)
        check_microbatches(batch, mbs, 8)
        assert [1] in [mb.traj_index.tolist() for mb in mbs]
    assert [mb.traj_index.tolist() for mb in batch.microbatches(8, method="contiguous")] == [
        [0],
        [1],
        [2, 3],
    ]
    # budget large enough: one micro-batch that is the whole batch
    (whole,) = batch.microbatches(batch.num_tokens)
    assert whole.traj_index.tolist() == [0, 1, 2, 3]
    for name in ("input_ids", "cu_seqlens", "action_index", "cu_steps", "cu_trajs", "value_index"):
        assert torch.equal(getattr(whole.batch, name), getattr(batch, name)), name


def test_merged_layout_microbatches_and_select():
    steps = [
        {"prompt_ids": [1, 2], "action_ids": [3], "reward": 1.0},
        {"prompt_ids": [1, 2, 3, 4], "action_ids": [5, 6], "reward": 2.0},
    ]
    other = [{"prompt_ids": [7], "action_ids": [8], "reward": 3.0}]
    batch = StepBatch.from_trajectories(
        [
            {"steps": other, "terminated": True, "group": 0},
            {"steps": steps, "terminated": False, "group": 1},
        ],
        layout="merged",
    ).validate()
    picked = batch.select_trajectories(torch.tensor([1]))
    assert picked.batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert picked.batch.action_index.tolist() == [2, 4, 5]
    assert picked.batch.value_index.tolist() == [1, 3]
    assert picked.step_index.tolist() == [1, 2]
    check_microbatches(batch, batch.microbatches(6), 6)
    with pytest.raises(ValueError, match=r"traj_index: entries must lie in \[0, 2\)"):
        batch.select_trajectories(torch.tensor([2]))


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "8"])
def test_max_tokens_must_be_a_positive_int(bad):
    batch = StepBatch.from_trajectories([traj([(1, 1)])])
    with pytest.raises(ValueError, match="max_tokens: must be"):
        batch.microbatches(bad)


def test_unknown_method():
    with pytest.raises(ValueError, match="method: 'best' is not one of"):
        StepBatch.from_trajectories([traj([(1, 1)])]).microbatches(8, method="best")


def ffd_oracle(sizes, max_tokens):
    """First-fit decreasing written from its definition, bins as sorted sets."""
    bins = []  # [load, items, closed]
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size = sizes[item]
        for entry in bins:
            if not entry[2] and entry[0] + size <= max_tokens:
                entry[0] += size
                entry[1].append(item)
                break
        else:
            bins.append([size, [item], size > max_tokens])
    return sorted(sorted(items) for _, items, _ in bins)


@pytest.mark.parametrize(
    "use_numba",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")),
    ],
)
def test_ffd_plans_match_oracle(use_numba):
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = rng.integers(1, 40, rng.integers(0, 60))
        budget = int(rng.integers(10, 60))
        plan = [b.tolist() for b in _microbatch.plan_ffd(sizes, budget, use_numba=use_numba)]
        assert plan == ffd_oracle(sizes.tolist(), budget)


# ----------------------------------------------------------------------------- hypothesis
TOKENS = st.lists(st.integers(0, 30), min_size=1, max_size=4)


@st.composite
def trajectories(draw, with_logprobs=None):
    with_logprobs = draw(st.booleans()) if with_logprobs is None else with_logprobs
    with_anchor = draw(st.booleans())
    out = []
    for b in range(draw(st.integers(0, 5))):
        prompt = draw(TOKENS)
        steps = []
        for _ in range(draw(st.integers(1, 4))):
            action = draw(TOKENS)
            s = {
                "prompt_ids": prompt,
                "action_ids": action,
                "reward": draw(st.floats(-10, 10, width=32)),
            }
            if with_logprobs:
                s["logprobs"] = draw(
                    st.lists(
                        st.floats(-20, 0, width=32), min_size=len(action), max_size=len(action)
                    )
                )
            if with_anchor:
                s["anchor"] = draw(st.integers(0, 3))
            steps.append(s)
            kind = draw(st.sampled_from(["extend", "extend", "fresh", "one-off"]))
            if kind == "extend":  # prefix property holds
                prompt = prompt + action + draw(st.lists(st.integers(0, 30), max_size=3))
            elif kind == "one-off":  # prompt + action with one token changed
                ctx = prompt + action
                i = draw(st.integers(0, len(ctx) - 1))
                prompt = ctx[:i] + [ctx[i] + 31] + ctx[i + 1 :]
            else:
                prompt = draw(TOKENS)
        out.append({"steps": steps, "terminated": draw(st.booleans()), "group": b % 2})
    return out


def expected_merges(trajs):
    """Number of sequences the prefix rule gives, from the definition."""
    seqs = 0
    for t in trajs:
        prev = None
        for s in t["steps"]:
            if prev is None or s["prompt_ids"][: len(prev)] != prev:
                seqs += 1
            prev = s["prompt_ids"] + s["action_ids"]
    return seqs


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(trajectories(), st.integers(1, 40), st.sampled_from(["ffd", "contiguous"]))
def test_property_layouts_and_microbatches(trajs, max_tokens, method):
    rows = StepBatch.from_trajectories(trajs, layout="rows").validate()
    auto = StepBatch.from_trajectories(trajs, layout="auto").validate()
    assert rows.num_seqs == rows.num_steps
    assert auto.num_seqs == expected_merges(trajs)
    for name in ("action_ids", "rewards", "cu_steps", "cu_trajs", "terminated", "group"):
        assert torch.equal(getattr(rows, name), getattr(auto, name)), name
    contexts = [s["prompt_ids"] + s["action_ids"] for t in trajs for s in t["steps"]]
    for b in (rows, auto):
        for s, ctx in enumerate(contexts):
            start = int(b.cu_seqlens[int(b.step_seq[s])])
            end = int(b.action_index[int(b.cu_steps[s + 1]) - 1]) + 1
            assert b.input_ids[start:end].tolist() == ctx
        check_microbatches(b, b.microbatches(max_tokens, method=method), max_tokens)
    if auto.num_seqs == len(trajs):  # every step merged: layout="merged" succeeds and agrees
        merged = StepBatch.from_trajectories(trajs, layout="merged")
        assert torch.equal(merged.input_ids, auto.input_ids)
    elif trajs:
        with pytest.raises(ValueError, match="layout='merged' needs"):
            StepBatch.from_trajectories(trajs, layout="merged")


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@SETTINGS
@given(trajectories(), st.sampled_from(["auto", "rows"]), st.integers(1, 30))
def test_property_numba_equals_numpy(trajs, layout, max_tokens):
    a = StepBatch._from_records(trajs, layout, use_numba=True)
    b = StepBatch._from_records(trajs, layout, use_numba=False)
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        assert x is None or (x.dtype == y.dtype and torch.equal(x, y)), name
    plans = [
        _microbatch.plan_ffd(np.asarray(token_sizes(a), dtype=np.int64), max_tokens, u)
        for u in (True, False)
    ]
    assert [p.tolist() for p in plans[0]] == [p.tolist() for p in plans[1]]


def test_microbatch_is_a_public_type():
    """``StepBatch.microbatches`` / ``select_trajectories`` return the public
    ``steppo_fast.MicroBatch`` (batch, step_index, traj_index)."""
    import steppo_fast

    batch = StepBatch.from_trajectories([traj([(2, 1), (1, 2)]), traj([(3, 1)], group=1)])
    parts = batch.microbatches(max_tokens=10**6)
    assert "MicroBatch" in steppo_fast.__all__
    assert all(isinstance(p, steppo_fast.MicroBatch) for p in parts)
    one = batch.select_trajectories(torch.tensor([1]))
    assert isinstance(one, steppo_fast.MicroBatch) and one._fields == (
        "batch",
        "step_index",
        "traj_index",
    )
