"""StepBatch construction: hand-checked layouts, the prefix rule, record errors, derived fields,
and numba vs numpy packing. Validation rules: test_batch_validate.py; micro-batches and
property tests: test_batch_microbatch.py."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from steppo_fast.batch import StepBatch, position_ids
from steppo_fast.batch import packing_numba as _packing_numba
from steppo_fast.batch.fields import TENSOR_FIELDS

HAS_NUMBA = _packing_numba.numba_available()


def step(prompt, action, reward=0.0, **extra):
    return {"prompt_ids": list(prompt), "action_ids": list(action), "reward": reward, **extra}


def example():
    """traj 0: step 1 extends step 0 by one observation token, step 2's prompt is exactly step 1's
    prompt + action (no observation); traj 1: step 1's prompt differs by one token inside
    step 0's action, so it cannot merge."""
    traj0 = [
        step([1, 2, 3], [4, 5], 0.5, logprobs=[-0.1, -0.2], anchor=7),
        step([1, 2, 3, 4, 5, 6], [7], -1.0, logprobs=[-0.3], anchor=8),
        step([1, 2, 3, 4, 5, 6, 7], [8, 9], 2.0, logprobs=[-0.4, -0.5], anchor=7),
    ]
    traj1 = [
        step([10, 11], [12], 0.25, logprobs=[-0.6], anchor=9),
        step([10, 11, 99, 13], [14], 1.5, logprobs=[-0.7], anchor=9),
    ]
    return [
        {"steps": traj0, "terminated": True, "group": 3},
        {"steps": traj1, "terminated": False, "group": 4},
    ]


def assert_same_batch(x: StepBatch, y: StepBatch):
    for name in TENSOR_FIELDS:
        u, v = getattr(x, name), getattr(y, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.dtype == v.dtype and torch.equal(u, v), name


def test_rows_layout_by_hand():
    b = StepBatch.from_trajectories(example(), layout="rows").validate()
    assert b.input_ids.tolist() == [
        1,
        2,
        3,
        4,
        5,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        10,
        11,
        99,
        13,
        14,
    ]
    assert b.cu_seqlens.tolist() == [0, 5, 12, 21, 24, 29]
    assert b.action_index.tolist() == [3, 4, 11, 19, 20, 23, 28]
    assert b.value_index.tolist() == [2, 10, 18, 22, 27]
    assert b.cu_steps.tolist() == [0, 2, 3, 5, 6, 7]
    assert b.cu_trajs.tolist() == [0, 3, 5]
    assert b.position_ids.tolist() == [*range(5), *range(7), *range(9), *range(3), *range(5)]
    assert b.max_seqlen == 9
    assert (b.num_tokens, b.num_seqs, b.num_actions, b.num_steps, b.num_trajs) == (29, 5, 7, 5, 2)


def test_auto_layout_by_hand():
    b = StepBatch.from_trajectories(example(), layout="auto").validate()
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 99, 13, 14]
    assert b.cu_seqlens.tolist() == [0, 9, 12, 17]
    assert b.action_index.tolist() == [3, 4, 6, 7, 8, 11, 16]
    assert b.value_index.tolist() == [2, 5, 6, 10, 15]
    assert b.cu_steps.tolist() == [0, 2, 3, 5, 6, 7]
    assert b.cu_trajs.tolist() == [0, 3, 5]
    assert b.position_ids.tolist() == [*range(9), *range(3), *range(5)]
    assert b.max_seqlen == 9
    assert b.logit_index.tolist() == [2, 3, 5, 6, 7, 10, 15]
    assert b.action_ids.tolist() == [4, 5, 7, 8, 9, 12, 14]
    assert b.step_traj.tolist() == [0, 0, 0, 1, 1]
    assert b.step_seq.tolist() == [0, 0, 0, 1, 2]
    assert b.token_traj_offsets.tolist() == [0, 5, 7]
    assert b.traj_seq_offsets.tolist() == [0, 1, 3]
    assert b.traj_token_offsets.tolist() == [0, 9, 17]
    assert b.step_num_actions.tolist() == [2, 1, 2, 1, 1]
    assert b.rewards.tolist() == [0.5, -1.0, 2.0, 0.25, 1.5]
    assert b.terminated.tolist() == [True, False]
    assert b.group.tolist() == [3, 4]
    assert b.anchor.tolist() == [7, 8, 7, 9, 9]
    assert b.step_weight is None
    torch.testing.assert_close(
        b.rollout_logp, torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]), rtol=0, atol=0
    )
    dtypes = {
        "input_ids": torch.int64,
        "cu_seqlens": torch.int32,
        "action_index": torch.int64,
        "cu_steps": torch.int32,
        "cu_trajs": torch.int32,
        "value_index": torch.int64,
        "rewards": torch.float32,
        "terminated": torch.bool,
        "group": torch.int64,
        "anchor": torch.int64,
        "rollout_logp": torch.float32,
    }
    for name, dtype in dtypes.items():
        assert getattr(b, name).dtype == dtype, name
    assert b.position_ids.dtype == torch.int64


def test_merged_raises_naming_trajectory_and_step():
    with pytest.raises(ValueError, match=r"trajectories\[1\]\.steps\[1\].*merged.*position 2"):
        StepBatch.from_trajectories(example(), layout="merged")
    ok = example()[:1]
    assert_same_batch(
        StepBatch.from_trajectories(ok, layout="merged"),
        StepBatch.from_trajectories(ok, layout="auto"),
    )


CONTEXT = [5, 6, 7]  # step 0 prompt; step 0 action is [8, 9]


@pytest.mark.parametrize(
    "prompt1, merges",
    [
        ([5, 6, 7, 8, 9, 1], True),  # prompt + action + one observation token
        ([5, 6, 7, 8, 9], True),  # exactly prompt + action
        ([5, 6, 7, 8, 9, 1, 2, 3], True),
        ([0, 6, 7, 8, 9, 1], False),  # first prompt token differs
        ([5, 6, 0, 8, 9, 1], False),  # last prompt token differs
        ([5, 6, 7, 8, 0, 1], False),  # last action token differs
        ([5, 6, 7, 8], False),  # shorter than prompt + action
        ([5, 6, 7, 9, 8, 1], False),  # action tokens swapped
        ([7, 5, 6, 7, 8, 9], False),  # context shifted by one
    ],
)
def test_auto_merges_exactly_on_prefix(prompt1, merges):
    trajs = [{"steps": [step(CONTEXT, [8, 9]), step(prompt1, [4])], "terminated": True, "group": 0}]
    b = StepBatch.from_trajectories(trajs, layout="auto").validate()
    assert b.num_seqs == (1 if merges else 2)
    if merges:
        assert b.input_ids.tolist() == prompt1 + [4]
        assert b.value_index.tolist() == [2, len(prompt1) - 1]
        StepBatch.from_trajectories(trajs, layout="merged").validate()
    else:
        assert b.input_ids.tolist() == CONTEXT + [8, 9] + prompt1 + [4]
        with pytest.raises(ValueError, match=r"trajectories\[0\]\.steps\[1\]"):
            StepBatch.from_trajectories(trajs, layout="merged")
    assert StepBatch.from_trajectories(trajs, layout="rows").num_seqs == 2


def step_contexts(b: StepBatch) -> list[list[int]]:
    """Per step: the tokens of its sequence up to its last action token (= prompt + action)."""
    out = []
    for s in range(b.num_steps):
        r = int(b.step_seq[s])
        last = int(b.action_index[int(b.cu_steps[s + 1]) - 1])
        out.append(b.input_ids[int(b.cu_seqlens[r]) : last + 1].tolist())
    return out


def test_rows_and_merged_agree_on_logical_content():
    trajs = example()[:1] + [
        {
            "steps": [
                step([20, 21], [22, 23], 1.0, logprobs=[-1.0, -2.0], anchor=1),
                step([20, 21, 22, 23, 24, 25], [26], 0.0, logprobs=[-3.0], anchor=2),
            ],
            "terminated": False,
            "group": 0,
        }
    ]
    rows = StepBatch.from_trajectories(trajs, layout="rows").validate()
    merged = StepBatch.from_trajectories(trajs, layout="merged").validate()
    assert merged.num_seqs == 2 and rows.num_seqs == 5 and merged.num_tokens < rows.num_tokens
    for name in (
        "action_ids",
        "rewards",
        "cu_steps",
        "cu_trajs",
        "rollout_logp",
        "anchor",
        "terminated",
        "group",
        "step_traj",
        "token_traj_offsets",
    ):
        assert torch.equal(getattr(rows, name), getattr(merged, name)), name
    expected = [s["prompt_ids"] + s["action_ids"] for t in trajs for s in t["steps"]]
    assert step_contexts(rows) == expected
    assert step_contexts(merged) == expected
    # the critic reads the last prompt token in both layouts
    prompts_last = [s["prompt_ids"][-1] for t in trajs for s in t["steps"]]
    assert rows.input_ids[rows.value_index].tolist() == prompts_last
    assert merged.input_ids[merged.value_index].tolist() == prompts_last


def good():
    return [
        {
            "steps": [step([1, 2], [3], logprobs=[-1.0]), step([1, 2, 3], [4], logprobs=[-1.0])],
            "terminated": True,
            "group": 0,
        }
        for _ in range(2)
    ]


def bad(mutate):
    trajs = good()
    mutate(trajs)
    return trajs


def _set(key, value, b=1, t=1):
    def f(trajs):
        trajs[b]["steps"][t][key] = value

    return f


def _del(key, b=1, t=1):
    def f(trajs):
        del trajs[b]["steps"][t][key]

    return f


@pytest.mark.parametrize(
    "mutate, where, rule",
    [
        (_set("prompt_ids", []), r"trajectories\[1\]\.steps\[1\]", "prompt_ids is empty"),
        (_set("action_ids", []), r"trajectories\[1\]\.steps\[1\]", "action_ids is empty"),
        (_set("logprobs", [-1.0, -2.0]), r"trajectories\[1\]\.steps\[1\]", "logprobs has 2"),
        (_set("reward", math.nan), r"trajectories\[1\]\.steps\[1\]", "finite"),
        (_set("reward", math.inf), r"trajectories\[1\]\.steps\[1\]", "finite"),
        (_set("reward", 1e39), r"trajectories\[1\]\.steps\[1\]", "finite"),
        (_set("reward", "1.0"), r"trajectories\[1\]\.steps\[1\]", "real number"),
        (_set("logprobs", [math.nan]), r"trajectories\[1\]\.steps\[1\]", "logprobs must be finite"),
        (_set("logprobs", ["x"]), r"trajectories\[1\]\.steps\[1\]", "logprobs must be real"),
        (_set("action_ids", [1.5]), r"trajectories\[1\]\.steps\[1\]", "ints"),
        (_set("prompt_ids", [1, "a"]), r"trajectories\[1\]\.steps\[1\]", "ints"),
        (_set("prompt_ids", 7), r"trajectories\[1\]\.steps\[1\]", "sequence of ints"),
        (_set("action_ids", [2**64]), r"trajectories\[1\]\.steps\[1\]", "int64 range"),
        (_set("action_ids", [-3]), r"trajectories\[1\]\.steps\[1\]", "negative"),
        (_set("anchor", 1.5), r"trajectories\[1\]\.steps\[1\]", "anchor must be an int"),
        (
            _set("anchor", 2),
            r"trajectories\[0\]\.steps\[0\].*trajectories\[1\]\.steps\[1\]",
            "every step or for none",
        ),
        (
            _del("logprobs"),
            r"trajectories\[1\]\.steps\[1\]: has no 'logprobs'",
            "every step or for none",
        ),
        (_del("prompt_ids"), r"trajectories\[1\]\.steps\[1\]", "missing key 'prompt_ids'"),
        (_del("action_ids"), r"trajectories\[1\]\.steps\[1\]", "missing key 'action_ids'"),
        (_del("reward"), r"trajectories\[1\]\.steps\[1\]", "missing key 'reward'"),
        (
            lambda tr: tr[1]["steps"].__setitem__(1, [1, 2]),
            r"trajectories\[1\]\.steps\[1\]",
            "must be a mapping",
        ),
        (lambda tr: tr[1].__setitem__("steps", []), r"trajectories\[1\]", "zero steps"),
        (lambda tr: tr[1].pop("group"), r"trajectories\[1\]", "missing key 'group'"),
        (lambda tr: tr[1].pop("terminated"), r"trajectories\[1\]", "missing key 'terminated'"),
        (lambda tr: tr[1].pop("steps"), r"trajectories\[1\]", "missing key 'steps'"),
        (lambda tr: tr[1].__setitem__("terminated", 1), r"trajectories\[1\]", "must be a bool"),
        (lambda tr: tr[1].__setitem__("group", 1.0), r"trajectories\[1\]", "must be an int"),
        (lambda tr: tr.__setitem__(1, [1]), r"trajectories\[1\]", "must be a mapping"),
    ],
)
@pytest.mark.parametrize("layout", ["auto", "rows"])
def test_bad_records_name_trajectory_step_and_rule(mutate, where, rule, layout):
    with pytest.raises(ValueError, match=where) as info:
        StepBatch.from_trajectories(bad(mutate), layout=layout)
    assert rule in str(info.value)


def test_bad_layout_and_good_records_pass():
    with pytest.raises(ValueError, match="layout: 'packed' is not one of"):
        StepBatch.from_trajectories(good(), layout="packed")
    b = StepBatch.from_trajectories(good(), layout="merged").validate()
    assert b.num_seqs == 2 and b.anchor is None and b.rollout_logp is not None


def test_non_list_sequences_give_the_same_batch():
    as_lists = example()
    converted = example()
    for i, traj in enumerate(converted):
        for s in traj["steps"]:
            s["prompt_ids"] = tuple(s["prompt_ids"]) if i else np.asarray(s["prompt_ids"])
            s["action_ids"] = torch.tensor(s["action_ids"])
            s["logprobs"] = np.asarray(s["logprobs"], dtype=np.float32)
            s["anchor"] = np.int64(s["anchor"])
            s["reward"] = np.float32(s["reward"])
    for layout in ("auto", "rows"):
        assert_same_batch(
            StepBatch.from_trajectories(converted, layout),
            StepBatch.from_trajectories(as_lists, layout),
        )


def test_empty_batch():
    b = StepBatch.from_trajectories([]).validate()
    assert (b.num_tokens, b.num_seqs, b.num_actions, b.num_steps, b.num_trajs) == (0, 0, 0, 0, 0)
    assert (
        b.cu_seqlens.tolist() == [0] and b.cu_steps.tolist() == [0] and b.cu_trajs.tolist() == [0]
    )
    assert b.position_ids.numel() == 0 and b.max_seqlen == 0 and b.action_ids.numel() == 0
    assert b.step_traj.numel() == 0 and b.token_traj_offsets.tolist() == [0]
    assert b.rollout_logp is None and b.anchor is None
    assert b.microbatches(16) == []


def test_derived_fields_are_cached_and_to_replace_repr():
    b = StepBatch.from_trajectories(example())
    assert b.position_ids is b.position_ids and b.action_ids is b.action_ids
    moved = b.to("cpu")
    assert_same_batch(moved, b)
    weighted = b.replace(step_weight=torch.ones(b.num_steps))
    assert weighted.validate().step_weight.tolist() == [1.0] * 5
    assert torch.equal(weighted.position_ids, b.position_ids)
    text = repr(b)
    for part in (
        "trajs=2",
        "steps=5",
        "seqs=3",
        "tokens=17",
        "action_tokens=7",
        "anchor",
        "rollout_logp",
    ):
        assert part in text
    assert not hasattr(StepBatch, "__len__")


def random_trajectories(rng, num_trajs, max_steps=6, vocab=50):
    trajs = []
    for b in range(num_trajs):
        prompt = rng.integers(0, vocab, rng.integers(1, 6)).tolist()
        steps = []
        for _ in range(rng.integers(1, max_steps + 1)):
            action = rng.integers(0, vocab, rng.integers(1, 4)).tolist()
            steps.append(
                step(
                    prompt,
                    action,
                    float(rng.standard_normal()),
                    logprobs=(-rng.random(len(action))).tolist(),
                )
            )
            if rng.random() < 0.7:  # extend (merge-able), else a re-rendered prompt
                prompt = prompt + action + rng.integers(0, vocab, rng.integers(0, 3)).tolist()
            else:
                prompt = rng.integers(0, vocab, rng.integers(1, 6)).tolist()
        trajs.append({"steps": steps, "terminated": bool(rng.random() < 0.5), "group": b % 3})
    return trajs


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("layout", ["auto", "rows"])
def test_numba_and_numpy_packing_identical(layout):
    rng = np.random.default_rng(1)
    for trajs in (example(), [], random_trajectories(rng, 40)):
        with_numba = StepBatch._from_records(trajs, layout, use_numba=True).validate()
        without = StepBatch._from_records(trajs, layout, use_numba=False).validate()
        assert_same_batch(with_numba, without)


def test_use_numba_switch():
    assert _packing_numba.should_use(False, 10**9) is False
    assert _packing_numba.should_use(None, 0) is False
    assert _packing_numba.should_use(None, 10**9) is HAS_NUMBA
    if not HAS_NUMBA:
        with pytest.raises(RuntimeError, match="numba is not installed"):
            _packing_numba.should_use(True, 1)


@pytest.mark.subprocess
def test_falls_back_to_numpy_without_numba():
    """With numba unimportable the package still packs (numpy path) and auto never picks numba."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from steppo_fast.batch import packing_numba as _packing_numba\n"
        "from steppo_fast.batch import StepBatch\n"
        "assert not _packing_numba.numba_available()\n"
        "assert not _packing_numba.should_use(None, 10**9)\n"
        "t = [{'steps': [{'prompt_ids': [1, 2], 'action_ids': [3], 'reward': 1.0}],"
        " 'terminated': True, 'group': 0}]\n"
        "b = StepBatch.from_trajectories(t).validate()\n"
        "assert b.action_index.tolist() == [2] and len(b.microbatches(4)) == 1\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("use_numpy", [True, False])
def test_position_ids_numpy_and_torch_paths(use_numpy):
    rng = np.random.default_rng(3)
    for _ in range(20):
        lengths = rng.integers(0, 5, rng.integers(0, 8))  # includes empty sequences
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.from_numpy(np.cumsum(lengths))
        expected = [p for n in lengths for p in range(n)]
        got = position_ids(cu, int(cu[-1]), numpy=use_numpy)
        assert got.dtype == torch.int64 and got.tolist() == expected
