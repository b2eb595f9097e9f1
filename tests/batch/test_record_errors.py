"""Malformed rollout records are named: ``StepBatch.from_trajectories`` raises a ``ValueError``
naming the trajectory, the step and the field for bool ids, sets/dicts as id lists, positive or
non-finite log-probs, ids beyond int64 and a trajectory argument that is not a list of
trajectories; ``StepBatch.validate`` refuses positive rollout log-probs."""

import numpy as np
import pytest
import torch

from steppo_fast import StepBatch

NAN = float("nan")


def traj(steps=None, **extra):
    steps = steps or [
        {"prompt_ids": [5, 6], "action_ids": [7, 8], "reward": 0.0, "logprobs": [-0.1, -0.2]},
        {"prompt_ids": [5, 6, 7, 8, 9], "action_ids": [3], "reward": 1.0, "logprobs": [-1.0]},
    ]
    return {"steps": steps, "terminated": True, "group": 0, **extra}


def bad_step(**change):
    t = traj()
    t["steps"][1] = {**t["steps"][1], **change}
    return [traj(), t]


RECORD_CASES = [
    (bad_step(action_ids=[True]), r"trajectories\[1\]\.steps\[1\]: action_ids\[0\] is the bool"),
    (
        bad_step(prompt_ids=[5, 6, 7, 8, False]),
        r"trajectories\[1\]\.steps\[1\]: prompt_ids\[4\] is the bool",
    ),
    (
        bad_step(action_ids=np.array([True, False])),
        r"trajectories\[1\]\.steps\[1\]: action_ids has dtype bool",
    ),
    (
        bad_step(prompt_ids=torch.tensor([1, 0], dtype=torch.bool)),
        r"trajectories\[1\]\.steps\[1\]: prompt_ids has dtype bool",
    ),
    (
        bad_step(action_ids=[np.bool_(True)]),  # refused by the int64 conversion itself
        r"trajectories\[1\]\.steps\[1\]: action_ids must be ints in int64 range",
    ),
    (bad_step(action_ids={3}), r"trajectories\[1\]\.steps\[1\]: action_ids must be a sequence"),
    (
        bad_step(prompt_ids={5: 0, 6: 0}),
        r"trajectories\[1\]\.steps\[1\]: prompt_ids must be a sequence .* got dict",
    ),
    (
        bad_step(logprobs={-1.0}),
        r"trajectories\[1\]\.steps\[1\]: logprobs must be a sequence .* got set",
    ),
    (
        bad_step(action_ids=np.array([[3]])),
        r"trajectories\[1\]\.steps\[1\]: action_ids must be 1-D",
    ),
    (
        bad_step(logprobs=[0.25]),
        r"trajectories\[1\]\.steps\[1\]: logprobs must be finite and <= 0 .* logprobs\[0\] = 0.25",
    ),
    (
        bad_step(action_ids=[3, 4], logprobs=[-1.0, NAN]),
        r"trajectories\[1\]\.steps\[1\]: logprobs must be finite .* logprobs\[1\] = nan",
    ),
    (
        bad_step(logprobs=[-1e300]),
        r"trajectories\[1\]\.steps\[1\]: logprobs must be finite .* = -inf \(as float32\)",
    ),
    (bad_step(logprobs=[-(10**400)]), r"trajectories\[1\]\.steps\[1\]: logprobs must be real"),
    (bad_step(reward=10**400), r"trajectories\[1\]\.steps\[1\]: reward must be a real number"),
    (bad_step(action_ids=[2**63]), r"trajectories\[1\]\.steps\[1\]: action_ids must be ints in"),
    (
        bad_step(anchor=-(2**63) - 1),
        r"trajectories\[1\]\.steps\[1\]: anchor = -9223372036854775809 is outside the int64",
    ),
    ([traj(), traj(group=2**63)], r"trajectories\[1\]: 'group' = 9223372036854775808 is outside"),
    ([traj(group=np.uint64(2**64 - 1))], r"trajectories\[0\]: 'group' = 18446744073709551615"),
    ([traj(group=True)], r"trajectories\[0\]: 'group' must be an int, got bool"),
    (traj(), r"trajectories: expected a list .* got dict \(wrap a single trajectory in a list\)"),
    ("abc", r"trajectories: expected a list .* got str"),
    (7, r"trajectories: expected a list .* got int"),
    ([traj(steps={"a": 1})], r"trajectories\[0\]: 'steps' must be a list of step mappings"),
]


@pytest.mark.parametrize("records, message", RECORD_CASES)
@pytest.mark.parametrize("layout", ["auto", "rows"])
def test_bad_records_name_trajectory_step_and_field(records, message, layout):
    with pytest.raises(ValueError, match=f"^{message}"):
        StepBatch.from_trajectories(records, layout=layout)


def test_anchor_beyond_int64_in_the_first_step():
    t = traj()
    for step in t["steps"]:
        step["anchor"] = 1
    t["steps"][0]["anchor"] = 2**64
    with pytest.raises(ValueError, match=r"^trajectories\[0\]\.steps\[0\]: anchor = 1844674407"):
        StepBatch.from_trajectories([t])


def test_accepted_record_containers():
    """Lists, tuples, ranges, numpy / torch int arrays and a generator of trajectories all give
    the same batch; log-prob 0.0 (a certain token) and numpy ints are fine."""
    expected = StepBatch.from_trajectories([traj(), traj(group=3)])
    steps = [
        {
            "prompt_ids": (5, 6),
            "action_ids": np.array([7, 8]),
            "reward": 0.0,
            "logprobs": (-0.1, -0.2),
        },
        {
            "prompt_ids": torch.tensor([5, 6, 7, 8, 9]),
            "action_ids": [np.int64(3)],
            "reward": 1.0,
            "logprobs": np.array([-1.0]),
        },
    ]
    got = StepBatch.from_trajectories(t for t in [traj(steps), traj(group=np.int32(3))])
    for name in ("input_ids", "cu_seqlens", "action_index", "cu_steps", "group", "rollout_logp"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    zero = bad_step(logprobs=[0.0], action_ids=range(3, 4))
    assert float(StepBatch.from_trajectories(zero).rollout_logp[-1]) == 0.0


def test_validate_refuses_positive_rollout_logp():
    batch = StepBatch.from_trajectories([traj()])
    batch.validate()
    logp = batch.rollout_logp.clone()
    logp[1] = 0.5
    bad = batch.replace(rollout_logp=logp)
    with pytest.raises(ValueError, match=r"^rollout_logp\[1\]: must be <= 0 .* got 0.5"):
        bad.validate()
