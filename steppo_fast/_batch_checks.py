"""The invariants of :class:`~steppo_fast.StepBatch` (docs/design.md §2), checked vectorised.

Every violation raises ``ValueError`` of the form ``"<field>[<index>]: <rule>"``. Checks run in
dependency order (structure, offsets, then value rules that rely on valid offsets), so the first
error reported is the root cause.
"""

from __future__ import annotations

import torch

from ._validate import check_nonempty_segments, check_offsets

# field -> (dtype, length symbol); lengths: N tokens, R+1, A, S+1, B+1, S, B
_SPEC = {
    "input_ids": (torch.int64, "N"),
    "cu_seqlens": (torch.int32, None),
    "action_index": (torch.int64, "A"),
    "cu_steps": (torch.int32, None),
    "cu_trajs": (torch.int32, None),
    "value_index": (torch.int64, "S"),
    "rewards": (torch.float32, "S"),
    "terminated": (torch.bool, "B"),
    "group": (torch.int64, "B"),
    "anchor": (torch.int64, "S"),
    "step_weight": (torch.float32, "S"),
    "rollout_logp": (torch.float32, "A"),
}
OPTIONAL = ("anchor", "step_weight", "rollout_logp")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_structure(batch) -> None:
    """Types, dtypes, 1-D, lengths implied by the offsets' shapes, one device. No value reads."""
    for name, (dtype, _) in _SPEC.items():
        x = getattr(batch, name)
        if x is None and name in OPTIONAL:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{name}: must be 1-D, got shape {tuple(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"{name}: dtype must be {_name(dtype)}, got {_name(x.dtype)}")
    device = batch.input_ids.device
    for name in _SPEC:
        x = getattr(batch, name)
        if x is not None and x.device != device:
            raise ValueError(
                f"{name}: on {x.device} but input_ids is on {device} (all tensors on one device)"
            )
    for name in ("cu_seqlens", "cu_steps", "cu_trajs"):
        if getattr(batch, name).shape[0] == 0:
            raise ValueError(f"{name}: offsets need at least one entry ({name}[0] == 0)")
    lengths = {
        "N": batch.input_ids.shape[0],
        "A": batch.action_index.shape[0],
        "S": batch.cu_steps.shape[0] - 1,
        "B": batch.cu_trajs.shape[0] - 1,
    }
    for name, (_, sym) in _SPEC.items():
        x = getattr(batch, name)
        if x is not None and sym in ("S", "B", "A") and x.shape[0] != lengths[sym]:
            what = {
                "S": "steps (len(cu_steps) - 1)",
                "B": "trajectories (len(cu_trajs) - 1)",
                "A": "action tokens (len(action_index))",
            }[sym]
            raise ValueError(f"{name}: length {x.shape[0]} != {lengths[sym]} {what}")


def _first(mask: torch.Tensor) -> int | None:
    """Index of the first True in a 1-D bool tensor, or None."""
    idx = mask.nonzero()
    return int(idx[0, 0]) if idx.numel() else None


def _check_finite(batch, name: str) -> None:
    x = getattr(batch, name)
    if x is None:
        return
    i = _first(~torch.isfinite(x))
    if i is not None:
        raise ValueError(f"{name}[{i}]: must be finite, got {float(x[i])}")


def validate(batch) -> None:
    """Every invariant of docs/design.md §2 (see :meth:`StepBatch.validate`)."""
    check_structure(batch)
    n, a, s = batch.num_tokens, batch.num_actions, batch.num_steps
    check_offsets("cu_seqlens", batch.cu_seqlens, n)
    check_offsets("cu_steps", batch.cu_steps, a)
    check_offsets("cu_trajs", batch.cu_trajs, s)
    check_nonempty_segments("cu_steps", batch.cu_steps)  # every step has >= 1 action token
    check_nonempty_segments("cu_trajs", batch.cu_trajs)  # every trajectory has >= 1 step

    i = _first(batch.input_ids < 0)
    if i is not None:
        raise ValueError(f"input_ids[{i}]: token ids must be >= 0, got {int(batch.input_ids[i])}")

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

    _check_finite(batch, "rewards")
    _check_finite(batch, "step_weight")
    _check_finite(batch, "rollout_logp")
    if batch.rollout_logp is not None:
        i = _first(batch.rollout_logp > 0)
        if i is not None:
            raise ValueError(
                f"rollout_logp[{i}]: must be <= 0 (a log-probability), got "
                f"{float(batch.rollout_logp[i])}"
            )
    if batch.step_weight is not None:
        i = _first(batch.step_weight < 0)
        if i is not None:
            raise ValueError(f"step_weight[{i}]: must be >= 0, got {float(batch.step_weight[i])}")
