"""The one table of :class:`~steppo_fast.StepBatch`'s fields: name, dtype, length, optional?,
meaning and rules.

It drives, from one place:

- the structural checks run on construction (:func:`steppo_fast.batch.checks.check_structure`:
  tensor type, 1-D, ``dtype``, ``length`` against the axis lengths, ``optional`` fields may be
  None);
- the offsets and element-wise value checks of :meth:`StepBatch.validate`
  (:func:`steppo_fast.batch.checks.validate`): ``offsets_of`` (first entry 0, non-decreasing,
  last entry = that axis length), ``nonempty`` (no empty segment) and ``values``; the rules
  that relate several fields (``rule`` texts naming other fields) are code in checks.py;
- the field list of docs/design.md §2 (:func:`markdown_table`) and of the StepBatch docstring
  (:func:`docstring_lines`); tests/batch/test_batch_fields.py asserts both agree with this table.

Lengths are written in the axis symbols: N tokens, R sequences, A action tokens, S steps,
B trajectories (``"R+1"``: an offsets array over R segments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# element-wise value rules (the error text of each use lives in its ValueRule)
VALUE_RULES = ("finite", "<= 0", ">= 0")  # validate() checks them in this order


@dataclass(frozen=True)
class ValueRule:
    """An element-wise rule on a field's values; a violation at index i raises
    ``ValueError("<field>[i]: <message>, got <value>")``."""

    test: str  # one of VALUE_RULES
    message: str


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    length: str  # "N", "A", "S", "B", or "R+1" / "S+1" / "B+1" for offsets
    meaning: str  # what the field holds (docs)
    rule: str = ""  # the invariants validate() checks, in words ("" = none beyond dtype/length)
    optional: bool = False  # may be None
    offsets_of: str | None = None  # offsets: the axis whose length the last entry equals
    nonempty: bool = False  # offsets: every segment holds >= 1 entry
    values: tuple[ValueRule, ...] = ()


FIELDS: tuple[Field, ...] = (
    Field(
        "input_ids",
        torch.int64,
        "N",
        "every sequence's tokens, concatenated (what the model sees)",
        "token ids >= 0",
        values=(ValueRule(">= 0", "token ids must be >= 0"),),
    ),
    Field(
        "cu_seqlens",
        torch.int32,
        "R+1",
        "sequence r is tokens `[cu_seqlens[r], cu_seqlens[r+1])`",
        "offsets over N; every sequence holds a step; a trajectory's sequences are its own "
        "(contiguous, shared with no other trajectory)",
        offsets_of="N",
    ),
    Field(
        "action_index",
        torch.int64,
        "A",
        "token position of each action token; `logit_index = action_index - 1` predicts it",
        "in [0, N), strictly increasing; never the first token of a sequence",
    ),
    Field(
        "cu_steps",
        torch.int32,
        "S+1",
        "step s is action entries `[cu_steps[s], cu_steps[s+1])`",
        "offsets over A; every step has >= 1 action token; a step's tokens stay in one sequence",
        offsets_of="A",
        nonempty=True,
    ),
    Field(
        "cu_trajs",
        torch.int32,
        "B+1",
        "trajectory b is steps `[cu_trajs[b], cu_trajs[b+1])`",
        "offsets over S; every trajectory has >= 1 step",
        offsets_of="S",
        nonempty=True,
    ),
    Field(
        "value_index",
        torch.int64,
        "S",
        "the token before step s's first action token (the critic reads V(s_t) there)",
        "equals `action_index[cu_steps[s]] - 1`",
    ),
    Field(
        "rewards",
        torch.float32,
        "S",
        "reward of each step",
        "finite",
        values=(ValueRule("finite", "must be finite"),),
    ),
    Field(
        "terminated",
        torch.bool,
        "B",
        "True: the trajectory ended (bootstrap 0); False: truncated",
    ),
    Field(
        "group",
        torch.int64,
        "B",
        "task/prompt group id (the baseline of GRPO-style advantages)",
    ),
    Field(
        "anchor",
        torch.int64,
        "S",
        "GiGPO anchor-state id of each step",
        optional=True,
    ),
    Field(
        "step_weight",
        torch.float32,
        "S",
        "weight of each step in the losses; 0 = a padding step that never reaches a loss",
        "finite, >= 0",
        optional=True,
        values=(ValueRule("finite", "must be finite"), ValueRule(">= 0", "must be >= 0")),
    ),
    Field(
        "rollout_logp",
        torch.float32,
        "A",
        "the sampler's log-prob of each action token",
        "finite, <= 0",
        optional=True,
        values=(
            ValueRule("finite", "must be finite"),
            ValueRule("<= 0", "must be <= 0 (a log-probability)"),
        ),
    ),
)

BY_NAME = {f.name: f for f in FIELDS}
TENSOR_FIELDS = tuple(f.name for f in FIELDS)
OPTIONAL = tuple(f.name for f in FIELDS if f.optional)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def markdown_table() -> str:
    """The field table of docs/design.md §2 (Markdown), rendered from :data:`FIELDS`."""
    rows = [
        "| field | shape | dtype | optional | meaning | rules (`validate()`) |",
        "|---|---|---|---|---|---|",
    ]
    for f in FIELDS:
        rows.append(
            f"| `{f.name}` | [{f.length}] | {dtype_name(f.dtype)} | "
            f"{'yes' if f.optional else ''} | {f.meaning} | {f.rule} |"
        )
    return "\n".join(rows)


def docstring_lines() -> list[str]:
    """The field list of the StepBatch docstring (reST bullets), rendered from :data:`FIELDS`."""
    out = []
    for f in FIELDS:
        text = f"- ``{f.name}`` [{f.length}] {dtype_name(f.dtype)}"
        text += " (optional)" if f.optional else ""
        text += f" -- {f.meaning.replace('`', '``')}"
        text += f"; {f.rule.replace('`', '``')}." if f.rule else "."
        out.append(text)
    return out
