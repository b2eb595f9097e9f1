"""The invariants of :class:`~steppo_fast.StepBatch` (docs/design.md §2), checked vectorised.

Every violation raises ``ValueError`` of the form ``"<field>[<index>]: <rule>"``. Checks run in
dependency order (structure, offsets, then value rules that rely on valid offsets), so the first
error reported is the root cause.

The per-field rules (dtype, length, optional, offsets, element-wise value rules) come from the
field table :data:`steppo_fast.batch.fields.FIELDS`; the rules that relate several fields
(action tokens inside their step's sequence, ``value_index`` before each step, sequences owned
by one trajectory) are written out in :func:`validate`.
"""

from __future__ import annotations

import torch

from .._validate import check_nonempty_segments, check_offsets
from .fields import FIELDS, VALUE_RULES, dtype_name

_OFFSET_LENGTHS = ("R+1", "S+1", "B+1")
_WHAT = {
    "S": "steps (len(cu_steps) - 1)",
    "B": "trajectories (len(cu_trajs) - 1)",
    "A": "action tokens (len(action_index))",
}
_VIOLATES = {  # value rule -> mask of the entries that break it
    "finite": lambda x: ~torch.isfinite(x),
    ">= 0": lambda x: x < 0,
    "<= 0": lambda x: x > 0,
}


def check_structure(batch) -> None:
    """Types, dtypes, 1-D, lengths implied by the offsets' shapes, one device (all from
    :data:`~steppo_fast.batch.fields.FIELDS`). No value reads."""
    for f in FIELDS:
        x = getattr(batch, f.name)
        if x is None and f.optional:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{f.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{f.name}: must be 1-D, got shape {tuple(x.shape)}")
        if x.dtype != f.dtype:
            raise ValueError(
                f"{f.name}: dtype must be {dtype_name(f.dtype)}, got {dtype_name(x.dtype)}"
            )
    device = batch.input_ids.device
    for f in FIELDS:
        x = getattr(batch, f.name)
        if x is not None and x.device != device:
            raise ValueError(
                f"{f.name}: on {x.device} but input_ids is on {device} (all tensors on one device)"
            )
    for f in FIELDS:
        if f.length in _OFFSET_LENGTHS and getattr(batch, f.name).shape[0] == 0:
            raise ValueError(f"{f.name}: offsets need at least one entry ({f.name}[0] == 0)")
    lengths = _lengths(batch)
    for f in FIELDS:
        x = getattr(batch, f.name)
        if x is not None and f.length in _WHAT and x.shape[0] != lengths[f.length]:
            raise ValueError(
                f"{f.name}: length {x.shape[0]} != {lengths[f.length]} {_WHAT[f.length]}"
            )


def _lengths(batch) -> dict[str, int]:
    return {
        "N": batch.input_ids.shape[0],
        "A": batch.action_index.shape[0],
        "S": batch.cu_steps.shape[0] - 1,
        "B": batch.cu_trajs.shape[0] - 1,
    }


def _first(mask: torch.Tensor) -> int | None:
    """Index of the first True in a 1-D bool tensor, or None."""
    idx = mask.nonzero()
    return int(idx[0, 0]) if idx.numel() else None


def _check_values(batch, fields) -> None:
    """The element-wise ``values`` rules of ``fields``, rule by rule in ``VALUE_RULES`` order
    (all finiteness first) and field by field in table order."""
    for test in VALUE_RULES:
        for f in fields:
            x = getattr(batch, f.name)
            for rule in f.values:
                if rule.test != test or x is None:
                    continue
                i = _first(_VIOLATES[test](x))
                if i is not None:
                    got = float(x[i]) if x.dtype.is_floating_point else int(x[i])
                    raise ValueError(f"{f.name}[{i}]: {rule.message}, got {got}")


def validate(batch) -> None:
    """Every invariant of docs/design.md §2 (see :meth:`StepBatch.validate`)."""
    check_structure(batch)
    n, a, s = batch.num_tokens, batch.num_actions, batch.num_steps
    lengths = _lengths(batch)
    for f in FIELDS:
        if f.offsets_of is not None:
            check_offsets(f.name, getattr(batch, f.name), lengths[f.offsets_of])
    for f in FIELDS:
        if f.nonempty:  # every step has >= 1 action token, every trajectory >= 1 step
            check_nonempty_segments(f.name, getattr(batch, f.name))
    # value rules of the integer fields first: the relational checks below index with them
    _check_values(batch, [f for f in FIELDS if not f.dtype.is_floating_point])

    act = batch.action_index
    i = _first((act < 0) | (act >= n))
    if i is not None:
        raise ValueError(f"action_index[{i}]: {int(act[i])} is outside the token axis [0, {n})")
    i = _first(act[1:] <= act[:-1]) if a > 1 else None
    if i is not None:
        raise ValueError(
            f"action_index[{i + 1}]: {int(act[i + 1])} <= action_index[{i}] = {int(act[i])}; "
            "action tokens must be strictly increasing (within a step, and step after step)"
        )
    cu_seq = batch.cu_seqlens.long()
    act_seq = torch.searchsorted(cu_seq, act, right=True) - 1
    i = _first(act == cu_seq[act_seq]) if a else None
    if i is not None:
        raise ValueError(
            f"action_index[{i}]: token {int(act[i])} is the first token of sequence "
            f"{int(act_seq[i])}; an action token must follow a token of its own sequence "
            "(logit_index = action_index - 1 in the same sequence)"
        )

    vi = batch.value_index
    first_action = act[batch.cu_steps[:-1].long()] if s else vi
    i = _first(vi != first_action - 1)
    if i is not None:
        raise ValueError(
            f"value_index[{i}]: {int(vi[i])} must be the token right before step {i}'s first "
            f"action token, i.e. action_index[cu_steps[{i}]] - 1 = {int(first_action[i]) - 1}"
        )
    # every action token of a step lies in the sequence of the step's value_index
    step_seq = act_seq[batch.cu_steps[:-1].long()] if s else act_seq
    same = act_seq == torch.repeat_interleave(step_seq, batch.cu_steps.diff().long(), output_size=a)
    i = _first(~same)
    if i is not None:
        step = int(torch.searchsorted(batch.cu_steps.long(), act.new_tensor([i]), right=True)) - 1
        raise ValueError(
            f"action_index[{i}]: action token of step {step} lies in sequence {int(act_seq[i])} "
            f"but the step starts in sequence {int(step_seq[step])}; a step's tokens stay in "
            "one sequence"
        )
    # every sequence holds at least one step (no orphan sequences)
    r = batch.num_seqs
    held = torch.zeros(r, dtype=torch.bool, device=batch.device)
    held[step_seq] = True
    i = _first(~held)
    if i is not None:
        raise ValueError(
            f"cu_seqlens[{i}]: sequence {i} holds no step; every sequence belongs to a "
            "trajectory through its steps"
        )
    # trajectories own their sequences: trajectory b's first step starts a fresh sequence
    if s:
        traj_first = batch.cu_trajs[1:-1].long()
        i = _first(step_seq[traj_first] == step_seq[traj_first - 1])
        if i is not None:
            raise ValueError(
                f"cu_trajs[{i + 1}]: trajectory {i + 1}'s first step is in sequence "
                f"{int(step_seq[traj_first[i]])}, which trajectory {i} also uses; a "
                "trajectory's sequences are its own"
            )

    _check_values(batch, [f for f in FIELDS if f.dtype.is_floating_point])
