"""Host-side packing of rollout records into the CSR arrays of :class:`~steppo_fast.StepBatch`.

Two stages:

1. :func:`read_records` walks the Python records once (the only per-step Python work): it
   checks each step, decides whether the step joins the previous step's sequence (the token
   prefix property) and appends the *new* tokens only into typed ``array.array`` buffers with
   ``array.fromlist`` (C-level conversion, about 10 ns per id, that rejects non-integer ids
   instead of truncating floats; 2-4x faster than ``array.extend`` or per-step ``np.asarray``).
2. :func:`build_csr` turns per-step lengths into the offsets and index arrays, vectorised with
   numpy or in one pass with numba (:mod:`steppo_fast._packing_numba`); both give identical
   arrays.

Layout rule (docs/design.md §2): step t+1 joins step t's sequence exactly when its
``prompt_ids`` starts with step t's ``prompt_ids + action_ids``; the sequence is then extended
by the rest of the prompt (new observation tokens, possibly none) and the action. Prefix tokens
of a merged step are compared by value (``==``) against ids already read and validated, so they
are not re-read.

Costs: the prefix comparison is O(sum of prompt lengths) C-level list comparisons (inherent to
records that repeat the full context per step); the conversion is O(N + A) and the CSR stage
O(S + A).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from . import _packing_numba

LAYOUTS = ("auto", "rows", "merged")
_INT32_MAX = 2**31 - 1


@dataclass
class Records:
    """What :func:`read_records` extracts: new token ids and per-step / per-trajectory facts."""

    tokens: np.ndarray  # [N] int64: every sequence's tokens, concatenated
    # [S] int64: prompt tokens the step adds (its whole prompt if it starts a sequence)
    new_prompt_len: np.ndarray
    action_len: np.ndarray  # [S] int64: action tokens of the step (>= 1)
    starts_sequence: np.ndarray  # [S] bool: the step opens a new sequence
    traj_num_steps: np.ndarray  # [B] int64: steps per trajectory (>= 1)
    rewards: np.ndarray  # [S] float32
    terminated: np.ndarray  # [B] bool
    group: np.ndarray  # [B] int64
    anchor: np.ndarray | None  # [S] int64 when every step has an anchor
    rollout_logp: np.ndarray | None  # [A] float32 when every step has logprobs


@dataclass
class Csr:
    """The StepBatch index arrays (numpy, final dtypes)."""

    cu_seqlens: np.ndarray  # [R+1] int32
    action_index: np.ndarray  # [A] int64
    cu_steps: np.ndarray  # [S+1] int32
    cu_trajs: np.ndarray  # [B+1] int32
    value_index: np.ndarray  # [S] int64


def _where(b: int, t: int | None = None) -> str:
    return f"trajectories[{b}]" if t is None else f"trajectories[{b}].steps[{t}]"


def _as_list(x, where: str, key: str) -> list:
    """A list view of a step's sequence field (lists pass through untouched)."""
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise ValueError(f"{where}: {key} must be a sequence of ints, got {type(x).__name__}")
    tolist = getattr(x, "tolist", None)  # numpy arrays and torch tensors
    return tolist() if callable(tolist) else list(x)


def _first_mismatch(prompt: list, context: list) -> int:
    for i, (u, v) in enumerate(zip(prompt, context)):
        if u != v:
            return i
    return min(len(prompt), len(context))


def _check_trajectory(traj, b: int):
    try:
        steps, terminated, group = traj["steps"], traj["terminated"], traj["group"]
    except KeyError as e:
        raise ValueError(
            f"{_where(b)}: missing key {e.args[0]!r} "
            "(a trajectory needs 'steps', 'terminated', 'group')"
        ) from None
    except (TypeError, IndexError):
        raise ValueError(
            f"{_where(b)}: a trajectory must be a mapping, got {type(traj).__name__}"
        ) from None
    if not isinstance(terminated, (bool, np.bool_)):
        raise ValueError(
            f"{_where(b)}: 'terminated' must be a bool, got {type(terminated).__name__}"
        )
    if isinstance(group, (bool, np.bool_)) or not isinstance(group, (int, np.integer)):
        raise ValueError(f"{_where(b)}: 'group' must be an int, got {type(group).__name__}")
    if isinstance(steps, (str, bytes, dict)) or not hasattr(steps, "__len__"):
        raise ValueError(f"{_where(b)}: 'steps' must be a list of step mappings")
    if len(steps) == 0:
        raise ValueError(f"{_where(b)}: a trajectory needs at least one step, got zero steps")
    return steps, bool(terminated), group


def read_records(trajectories, layout: str = "auto") -> Records:
    """Check the records and extract token ids and per-step facts (see module docstring).

    Raises ``ValueError`` naming ``trajectories[b].steps[t]`` and the rule for: a missing key, an
    empty ``prompt_ids`` or ``action_ids``, a non-integer or negative id, ``logprobs`` whose length
    differs from the action's, non-numeric or non-finite rewards / log-probs, ``logprobs`` or
    ``anchor`` given for some steps only, a trajectory with zero steps, and (``layout="merged"``)
    a step whose prompt does not extend the previous step's prompt + action.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    may_merge, must_merge = layout != "rows", layout == "merged"
    tokens, new_len, act_len, starts = array("q"), array("q"), array("q"), array("b")
    traj_steps, group, terminated = array("q"), array("q"), array("b")
    rewards, logprobs, anchors = array("d"), array("f"), array("q")
    with_lp = without_lp = with_anchor = without_anchor = None  # first (b, t) of each kind

    for b, traj in enumerate(trajectories):
        steps, term, grp = _check_trajectory(traj, b)
        traj_steps.append(len(steps))
        terminated.append(term)
        group.append(int(grp))
        prev_prompt = prev_action = None  # the previous step's lists (its sequence ends with them)
        for t, step in enumerate(steps):
            try:
                prompt, action, reward = step["prompt_ids"], step["action_ids"], step["reward"]
                lp, anchor = step.get("logprobs"), step.get("anchor")
            except KeyError as e:
                raise ValueError(
                    f"{_where(b, t)}: missing key {e.args[0]!r} "
                    "(a step needs 'prompt_ids', 'action_ids', 'reward')"
                ) from None
            except (TypeError, AttributeError, IndexError):
                raise ValueError(
                    f"{_where(b, t)}: a step must be a mapping, got {type(step).__name__}"
                ) from None
            if type(prompt) is not list:
                prompt = _as_list(prompt, _where(b, t), "prompt_ids")
            if type(action) is not list:
                action = _as_list(action, _where(b, t), "action_ids")
            n_prompt, n_action = len(prompt), len(action)
            if n_prompt == 0:
                raise ValueError(
                    f"{_where(b, t)}: prompt_ids is empty (a step needs >= 1 prompt token)"
                )
            if n_action == 0:
                raise ValueError(
                    f"{_where(b, t)}: action_ids is empty (a step needs >= 1 action token)"
                )

            if prev_prompt is not None and may_merge:
                n_pp, n_context = len(prev_prompt), len(prev_prompt) + len(prev_action)
                merge = (
                    n_prompt >= n_context
                    and prompt[:n_pp] == prev_prompt
                    and prompt[n_pp:n_context] == prev_action
                )
            else:
                merge = False
            try:
                if merge:
                    if n_prompt > n_context:
                        tokens.fromlist(prompt[n_context:])
                    new_len.append(n_prompt - n_context)
                else:
                    if must_merge and prev_prompt is not None:
                        k = _first_mismatch(prompt, prev_prompt + prev_action)
                        raise ValueError(
                            f"{_where(b, t)}: layout='merged' needs prompt_ids to start with "
                            f"steps[{t - 1}].prompt_ids + steps[{t - 1}].action_ids "
                            f"({n_context} tokens); they differ at position {k} "
                            f"(prompt has {n_prompt} tokens). Use layout='auto' or 'rows'"
                        )
                    tokens.fromlist(prompt)
                    new_len.append(n_prompt)
                tokens.fromlist(action)
            except (TypeError, OverflowError) as e:
                raise ValueError(
                    f"{_where(b, t)}: prompt_ids/action_ids must be ints in int64 range ({e})"
                ) from None
            act_len.append(n_action)
            starts.append(not merge)
            try:
                rewards.append(reward)
            except TypeError:
                raise ValueError(
                    f"{_where(b, t)}: reward must be a real number, got {type(reward).__name__}"
                ) from None

            if lp is not None:
                if type(lp) is not list:
                    lp = _as_list(lp, _where(b, t), "logprobs")
                if len(lp) != n_action:
                    raise ValueError(
                        f"{_where(b, t)}: logprobs has {len(lp)} entries but action_ids has "
                        f"{n_action} (one log-prob per action token)"
                    )
                try:
                    logprobs.fromlist(lp)
                except TypeError:
                    raise ValueError(f"{_where(b, t)}: logprobs must be real numbers") from None
                with_lp = with_lp or (b, t)
            else:
                without_lp = without_lp or (b, t)
            if anchor is not None:
                if isinstance(anchor, (bool, np.bool_)) or not isinstance(
                    anchor, (int, np.integer)
                ):
                    raise ValueError(
                        f"{_where(b, t)}: anchor must be an int, got {type(anchor).__name__}"
                    )
                anchors.append(int(anchor))
                with_anchor = with_anchor or (b, t)
            else:
                without_anchor = without_anchor or (b, t)
            prev_prompt, prev_action = prompt, action

    for key, have, lack in (
        ("logprobs", with_lp, without_lp),
        ("anchor", with_anchor, without_anchor),
    ):
        if have is not None and lack is not None:
            raise ValueError(
                f"{_where(*lack)}: has no {key!r} but {_where(*have)} has one; "
                f"give {key!r} for every step or for none"
            )

    with np.errstate(over="ignore"):  # a reward beyond float32 becomes inf: rejected below
        rewards_f32 = np.frombuffer(rewards, dtype=np.float64).astype(np.float32)
    out = Records(
        tokens=np.frombuffer(tokens, dtype=np.int64),
        new_prompt_len=np.frombuffer(new_len, dtype=np.int64),
        action_len=np.frombuffer(act_len, dtype=np.int64),
        starts_sequence=np.frombuffer(starts, dtype=np.int8).astype(bool),
        traj_num_steps=np.frombuffer(traj_steps, dtype=np.int64),
        rewards=rewards_f32,
        terminated=np.frombuffer(terminated, dtype=np.int8).astype(bool),
        group=np.frombuffer(group, dtype=np.int64),
        anchor=np.frombuffer(anchors, dtype=np.int64) if with_anchor else None,
        rollout_logp=np.frombuffer(logprobs, dtype=np.float32) if with_lp else None,
    )
    _check_values(out)
    return out


def _locate(records: Records, step: int) -> tuple[int, int]:
    """(trajectory, step-in-trajectory) of a global step index."""
    cu = np.cumsum(records.traj_num_steps)
    b = int(np.searchsorted(cu, step, side="right"))
    return b, step - (int(cu[b - 1]) if b else 0)


def _check_values(r: Records) -> None:
    """Vectorised value checks; the first offender is mapped back to its trajectory and step."""
    if r.tokens.size > _INT32_MAX:
        raise ValueError(
            f"trajectories: {r.tokens.size} tokens exceed int32 offsets ({_INT32_MAX})"
        )
    if r.tokens.size and r.tokens.min() < 0:
        i = int(np.argmax(r.tokens < 0))
        step_end = np.cumsum(r.new_prompt_len + r.action_len)
        s = int(np.searchsorted(step_end, i, side="right"))
        raise ValueError(f"{_where(*_locate(r, s))}: token id {int(r.tokens[i])} is negative")
    bad = ~np.isfinite(r.rewards)
    if bad.any():
        s = int(np.argmax(bad))
        raise ValueError(
            f"{_where(*_locate(r, s))}: reward must be finite (as float32), got {r.rewards[s]}"
        )
    if r.rollout_logp is not None:
        bad = ~np.isfinite(r.rollout_logp)
        if bad.any():
            s = int(np.searchsorted(np.cumsum(r.action_len), int(np.argmax(bad)), side="right"))
            raise ValueError(f"{_where(*_locate(r, s))}: logprobs must be finite")


def csr_numpy(records: Records) -> Csr:
    """Vectorised CSR construction (numpy), O(S + A)."""
    new_len, act_len = records.new_prompt_len, records.action_len
    step_tokens = new_len + act_len
    step_end = np.cumsum(step_tokens)  # token position after each step's action
    action_start = step_end - act_len  # first action token of each step
    cu_steps = np.zeros(len(act_len) + 1, dtype=np.int64)
    np.cumsum(act_len, out=cu_steps[1:])
    num_actions = int(cu_steps[-1])
    action_index = np.repeat(action_start - cu_steps[:-1], act_len) + np.arange(num_actions)
    seq_start = (step_end - step_tokens)[records.starts_sequence]
    cu_seqlens = np.append(seq_start, records.tokens.size).astype(np.int32)
    cu_trajs = np.zeros(len(records.traj_num_steps) + 1, dtype=np.int32)
    np.cumsum(records.traj_num_steps, out=cu_trajs[1:])
    return Csr(
        cu_seqlens=cu_seqlens,
        action_index=action_index.astype(np.int64, copy=False),
        cu_steps=cu_steps.astype(np.int32),
        cu_trajs=cu_trajs,
        value_index=action_start - 1,
    )


def build_csr(records: Records, use_numba: bool | None = None) -> Csr:
    """CSR arrays from :class:`Records`; ``use_numba`` None = numba when installed and the
    batch is large enough to repay its dispatch (see :mod:`steppo_fast._packing_numba`)."""
    if _packing_numba.should_use(
        use_numba, work=records.action_len.size + records.tokens.size // 64
    ):
        return Csr(*_packing_numba.csr_numba(records))
    return csr_numpy(records)
