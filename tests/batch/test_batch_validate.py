"""StepBatch.validate(): every invariant of docs/design.md §2, one corrupted field at a time;
the error names the field, the index and the rule."""

import math

import pytest
import torch

from steppo_fast.batch import StepBatch


def fields():
    """A valid hand-built batch: trajectory 0 = one merged sequence [0, 9) with 3 steps;
    trajectory 1 = two sequences [9, 12) and [12, 17) with one step each."""
    return dict(
        input_ids=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 99, 13, 14]),
        cu_seqlens=torch.tensor([0, 9, 12, 17], dtype=torch.int32),
        action_index=torch.tensor([3, 4, 6, 7, 8, 11, 16]),
        cu_steps=torch.tensor([0, 2, 3, 5, 6, 7], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 3, 5], dtype=torch.int32),
        value_index=torch.tensor([2, 5, 6, 10, 15]),
        rewards=torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5]),
        terminated=torch.tensor([True, False]),
        group=torch.tensor([3, 4]),
        anchor=torch.tensor([7, 8, 7, 9, 9]),
        step_weight=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),
        rollout_logp=torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]),
    )


def with_(name, value_fn):
    f = fields()
    f[name] = value_fn(f[name]) if callable(value_fn) else value_fn
    return f


def setitem(index, value):
    def f(x):
        x = x.clone()
        x[index] = value
        return x

    return f


def test_valid_batch_passes_and_matches_from_trajectories():
    b = StepBatch(**fields())
    assert b.validate() is b
    assert b.position_ids.tolist() == [*range(9), *range(3), *range(5)]
    assert b.max_seqlen == 9


@pytest.mark.parametrize(
    "name, value, message",
    [
        (
            "cu_seqlens",
            torch.tensor([1, 9, 12, 17], dtype=torch.int32),
            r"cu_seqlens: offsets must start at 0, got cu_seqlens\[0\] = 1",
        ),
        (
            "cu_seqlens",
            torch.tensor([0, 12, 9, 17], dtype=torch.int32),
            r"cu_seqlens: offsets must be non-decreasing, but cu_seqlens\[2\]",
        ),
        (
            "cu_seqlens",
            torch.tensor([0, 9, 12, 16], dtype=torch.int32),
            r"cu_seqlens: offsets must end at the axis length 17",
        ),
        (
            "cu_steps",
            torch.tensor([0, 2, 3, 5, 6, 6], dtype=torch.int32),
            r"cu_steps: offsets must end at the axis length 7",
        ),
        (
            "cu_steps",
            torch.tensor([0, 2, 2, 5, 6, 7], dtype=torch.int32),
            r"cu_steps: segment 1 is empty",
        ),
        ("cu_trajs", torch.tensor([0, 5, 5], dtype=torch.int32), r"cu_trajs: segment 1 is empty"),
        (
            "cu_trajs",
            torch.tensor([0, 3, 4], dtype=torch.int32),
            r"cu_trajs: offsets must end at the axis length 5",
        ),
        ("input_ids", setitem(4, -1), r"input_ids\[4\]: token ids must be >= 0"),
        ("action_index", setitem(6, 17), r"action_index\[6\]: 17 is outside the token axis"),
        ("action_index", setitem(6, -1), r"action_index\[6\]: -1 is outside the token axis"),
        (
            "action_index",
            lambda x: torch.cat([x[1:2], x[0:1], x[2:]]),
            r"action_index\[1\]: 3 <= action_index\[0\] = 4; .*strictly increasing",
        ),
        ("action_index", setitem(3, 6), r"action_index\[3\]: 6 <= action_index\[2\]"),
        (
            "cu_seqlens",
            torch.tensor([0, 9, 11, 17], dtype=torch.int32),
            r"action_index\[5\]: token 11 is the first token of sequence 2",
        ),
        ("value_index", setitem(1, 4), r"value_index\[1\]: 4 must be the token right before"),
        ("value_index", setitem(3, 9), r"value_index\[3\]: 9 must be .* = 10"),
        (
            "input_ids",
            lambda x: torch.cat([x, torch.tensor([5, 5])]),
            r"cu_seqlens: offsets must end at the axis length 19",
        ),
        (
            "cu_trajs",
            torch.tensor([0, 2, 5], dtype=torch.int32),
            r"cu_trajs\[1\]: trajectory 1's first step is in sequence 0, which trajectory 0",
        ),
        ("rewards", setitem(3, math.nan), r"rewards\[3\]: must be finite"),
        ("rewards", setitem(0, -math.inf), r"rewards\[0\]: must be finite"),
        ("step_weight", setitem(2, -0.5), r"step_weight\[2\]: must be >= 0"),
        ("step_weight", setitem(4, math.nan), r"step_weight\[4\]: must be finite"),
        ("rollout_logp", setitem(5, math.inf), r"rollout_logp\[5\]: must be finite"),
    ],
)
def test_validate_names_field_index_and_rule(name, value, message):
    batch = StepBatch(**with_(name, value))
    with pytest.raises(ValueError, match=message):
        batch.validate()


def test_orphan_sequence():
    f = fields()
    f["input_ids"] = torch.cat([f["input_ids"], torch.tensor([5, 5])])
    f["cu_seqlens"] = torch.tensor([0, 9, 12, 17, 19], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens\[3\]: sequence 3 holds no step"):
        StepBatch(**f).validate()


def test_step_spanning_two_sequences():
    b = StepBatch(
        input_ids=torch.arange(8),
        cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32),
        action_index=torch.tensor([3, 6]),  # second action token is in sequence 1
        cu_steps=torch.tensor([0, 2], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 1], dtype=torch.int32),
        value_index=torch.tensor([2]),
        rewards=torch.zeros(1),
        terminated=torch.tensor([True]),
        group=torch.tensor([0]),
    )
    with pytest.raises(
        ValueError,
        match=r"action_index\[1\]: action token of step 0 lies in "
        r"sequence 1 but the step starts in sequence 0",
    ):
        b.validate()
    # non-contiguous action tokens inside one sequence are allowed
    ok = b.replace(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    ok.validate()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("input_ids", lambda x: x.int(), "input_ids: dtype must be int64, got int32"),
        ("cu_seqlens", lambda x: x.long(), "cu_seqlens: dtype must be int32, got int64"),
        ("cu_steps", lambda x: x.long(), "cu_steps: dtype must be int32"),
        ("cu_trajs", lambda x: x.long(), "cu_trajs: dtype must be int32"),
        ("action_index", lambda x: x.int(), "action_index: dtype must be int64"),
        ("value_index", lambda x: x.int(), "value_index: dtype must be int64"),
        ("rewards", lambda x: x.double(), "rewards: dtype must be float32, got float64"),
        ("terminated", lambda x: x.long(), "terminated: dtype must be bool"),
        ("group", lambda x: x.int(), "group: dtype must be int64"),
        ("anchor", lambda x: x.int(), "anchor: dtype must be int64"),
        ("step_weight", lambda x: x.bfloat16(), "step_weight: dtype must be float32"),
        ("rollout_logp", lambda x: x.half(), "rollout_logp: dtype must be float32"),
        ("rewards", lambda x: x[None], r"rewards: must be 1-D, got shape \(1, 5\)"),
        ("input_ids", lambda x: x.tolist(), "input_ids: expected a torch.Tensor, got list"),
        ("rewards", lambda x: x[:4], r"rewards: length 4 != 5 steps"),
        ("value_index", lambda x: x[:4], r"value_index: length 4 != 5 steps"),
        ("anchor", lambda x: x[:4], r"anchor: length 4 != 5 steps"),
        ("step_weight", lambda x: torch.ones(6), r"step_weight: length 6 != 5 steps"),
        ("terminated", lambda x: x[:1], r"terminated: length 1 != 2 trajectories"),
        ("group", lambda x: torch.zeros(3, dtype=torch.long), r"group: length 3 != 2 traj"),
        ("rollout_logp", lambda x: x[:6], r"rollout_logp: length 6 != 7 action tokens"),
        ("rewards", lambda x: x.to("meta"), "rewards: on meta but input_ids is on cpu"),
        ("cu_trajs", lambda x: x[:0], r"cu_trajs: offsets need at least one entry"),
    ],
)
def test_structure_errors_at_construction(name, value, message):
    with pytest.raises(ValueError, match=message):
        StepBatch(**with_(name, value))
