"""The StepBatch field table (steppo_fast/batch/fields.py) is the one source of the fields: the
dataclass, the structural and per-field value checks, docs/design.md §2 and the StepBatch
docstring all follow it."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from steppo_fast.batch import StepBatch
from steppo_fast.batch.fields import (
    FIELDS,
    OPTIONAL,
    TENSOR_FIELDS,
    VALUE_RULES,
    docstring_lines,
    dtype_name,
    markdown_table,
)

ROOT = Path(__file__).resolve().parents[2]


def full_batch() -> StepBatch:
    """A valid batch with every optional field set and >= 2 entries on every axis."""

    def step(prompt, action, reward, anchor):
        lp = [-0.5] * len(action)
        return {
            "prompt_ids": prompt,
            "action_ids": action,
            "reward": reward,
            "logprobs": lp,
            "anchor": anchor,
        }

    trajs = [
        {
            "steps": [step([5, 6], [7, 8], 1.0, 0), step([5, 6, 7, 8, 9], [10], -1.0, 1)],
            "terminated": True,
            "group": 0,
        },
        {"steps": [step([4], [3, 2], 0.5, 0)], "terminated": False, "group": 1},
    ]
    batch = StepBatch.from_trajectories(trajs)
    return batch.replace(step_weight=torch.ones(batch.num_steps)).validate()


def axis_lengths(batch: StepBatch) -> dict[str, int]:
    return {
        "N": batch.num_tokens,
        "A": batch.num_actions,
        "S": batch.num_steps,
        "B": batch.num_trajs,
        "R+1": batch.num_seqs + 1,
        "S+1": batch.num_steps + 1,
        "B+1": batch.num_trajs + 1,
    }


def test_design_doc_shows_the_field_table():
    text = (ROOT / "docs" / "design.md").read_text()
    table = markdown_table()
    assert table in text, f"docs/design.md §2 must contain the field table of FIELDS:\n{table}"
    assert len(table.splitlines()) == len(FIELDS) + 2


def test_stepbatch_docstring_lists_the_field_table_in_order():
    def squash(s):
        return " ".join(s.split())

    doc = squash(StepBatch.__doc__)
    lines = [squash(line) for line in docstring_lines()]
    missing = [line for line in lines if line not in doc]
    assert not missing, "StepBatch docstring differs from FIELDS; expected:\n" + "\n".join(
        docstring_lines()
    )
    positions = [doc.index(line) for line in lines]
    assert positions == sorted(positions)


def test_dataclass_fields_are_the_table():
    init = [f for f in dataclasses.fields(StepBatch) if f.init]
    assert tuple(f.name for f in init) == TENSOR_FIELDS
    assert tuple(f.name for f in init if f.default is None) == OPTIONAL
    assert all(r.test in VALUE_RULES for f in FIELDS for r in f.values)


def test_full_batch_matches_every_dtype_and_length():
    batch = full_batch()
    lengths = axis_lengths(batch)
    for f in FIELDS:
        x = getattr(batch, f.name)
        assert x.dtype == f.dtype and x.shape == (lengths[f.length],), f.name
        assert x.shape[0] >= 2, f.name  # index 1 exists for the value-rule test below


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_structure_checks_follow_the_table(field):
    batch = full_batch()
    x = getattr(batch, field.name)
    wrong = torch.float64 if field.dtype != torch.float64 else torch.int64
    with pytest.raises(
        ValueError,
        match=rf"^{field.name}: dtype must be {dtype_name(field.dtype)}, "
        rf"got {dtype_name(wrong)}$",
    ):
        batch.replace(**{field.name: x.to(wrong)})
    if field.length in ("A", "S", "B") and field.name != "action_index":  # it defines A
        with pytest.raises(ValueError, match=rf"^{field.name}: length {x.shape[0] - 1} != "):
            batch.replace(**{field.name: x[:-1]})
    if field.optional:
        assert getattr(batch.replace(**{field.name: None}).validate(), field.name) is None
    else:
        with pytest.raises(ValueError, match=rf"^{field.name}: expected a torch.Tensor"):
            batch.replace(**{field.name: None})


@pytest.mark.parametrize("field", [f for f in FIELDS if f.length.endswith("+1")], ids=str)
def test_offsets_checks_follow_the_table(field):
    batch = full_batch()
    x = getattr(batch, field.name).clone()
    assert field.offsets_of is not None
    x[-1] += 1
    end = axis_lengths(batch)[field.offsets_of]
    with pytest.raises(
        ValueError, match=re.escape(f"{field.name}: offsets must end at the axis length {end},")
    ):
        batch.replace(**{field.name: x}).validate()
    x = getattr(batch, field.name).clone()
    x[1] = x[0]  # segment 0 empty, offsets still valid
    if field.nonempty:
        with pytest.raises(ValueError, match=rf"^{field.name}: segment 0 is empty"):
            batch.replace(**{field.name: x}).validate()
    else:
        with pytest.raises(ValueError) as err:  # an empty sequence breaks a relational rule
            batch.replace(**{field.name: x}).validate()
        assert "segment 0 is empty" not in str(err.value)


@pytest.mark.parametrize(
    "field, rule",
    [(f, r) for f in FIELDS for r in f.values],
    ids=lambda v: getattr(v, "name", None) or getattr(v, "test", None),
)
def test_value_rules_follow_the_table(field, rule):
    batch = full_batch()
    x = getattr(batch, field.name).clone()
    x[1] = {"finite": float("nan"), ">= 0": -3, "<= 0": 0.5}[rule.test]
    with pytest.raises(ValueError, match=re.escape(f"{field.name}[1]: {rule.message}, got ")):
        batch.replace(**{field.name: x}).validate()
