"""Reading rollout records: check every trajectory and step, decide the layout, collect ids.

Stage 1 of building a :class:`~steppo_fast.StepBatch` from records (stage 2, the CSR offsets
and index arrays, is :mod:`steppo_fast.batch.packing`). :func:`read_records` walks the Python
records once (the only per-step Python work): it checks each step, decides whether the step
joins the previous step's sequence (the token prefix property) and appends the *new* tokens
only into typed ``array.array`` buffers with ``array.fromlist`` (C-level conversion, about
10 ns per id, that rejects non-integer ids instead of truncating floats; 2-4x faster than
``array.extend`` or per-step ``np.asarray``). The result is a :class:`Records` of numpy arrays.

Layout rule (docs/design.md §2): step t+1 joins step t's sequence exactly when its
``prompt_ids`` starts with step t's ``prompt_ids + action_ids``; the sequence is then extended
by the rest of the prompt (new observation tokens, possibly none) and the action. Prefix tokens
of a merged step are compared by value (``==``) against ids already read and validated, so they
are not re-read.

Costs: the prefix comparison is O(sum of prompt lengths) C-level list comparisons (inherent to
records that repeat the full context per step); the conversion is O(N + A).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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


def _where(b: int, t: int | None = None) -> str:
    return f"trajectories[{b}]" if t is None else f"trajectories[{b}].steps[{t}]"


def _as_list(x, where: str, key: str, what: str = "ints") -> list:
    """A list view of a step's sequence field (lists pass through untouched): an ordered
    sequence (list, tuple, range, ...) or a 1-D numpy array / torch tensor of a non-bool dtype.
    Sets and mappings are refused (no defined order; a dict would give its keys)."""
    tolist = getattr(x, "tolist", None)  # numpy arrays and torch tensors
    if callable(tolist) and hasattr(x, "dtype") and hasattr(x, "ndim"):
        if x.ndim != 1:
            raise ValueError(f"{where}: {key} must be 1-D, got {x.ndim}-D")
        if str(x.dtype) in ("bool", "torch.bool"):
            raise ValueError(f"{where}: {key} has dtype bool; expected {what}")
        return tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise ValueError(
            f"{where}: {key} must be a sequence of {what} (a list, tuple or 1-D array), "
            f"got {type(x).__name__}"
        )
    return list(x)


def _check_no_bool_ids(tokens: np.ndarray, chunk_start: array, chunks: list) -> None:
    """No token id was given as a bool (a bool is an int to Python, so a mask passed as ids
    would silently become ids 0/1). A bool can only have produced an id 0 or 1, so only those
    positions (few: BOS and the like) are traced back to their Python object: chunk k holds
    the ids from ``chunk_start[k]`` on, read from ``chunks[k] = (list, offset, b, t, key)``.
    Costs one vectorised pass over the ids instead of a type check of every id."""
    candidates = np.flatnonzero((tokens == 0) | (tokens == 1))
    if candidates.size == 0:
        return
    starts = np.frombuffer(chunk_start, dtype=np.int64)
    owner = np.searchsorted(starts, candidates, side="right") - 1
    for pos, k in zip(candidates.tolist(), owner.tolist()):
        ids, offset, b, t, key = chunks[k]
        i = offset + pos - int(starts[k])
        if isinstance(ids[i], (bool, np.bool_)):
            raise ValueError(
                f"{_where(b, t)}: {key}[{i}] is the bool {ids[i]!r}; token ids must be ints"
            )


def _as_int64(value, where: str, key: str) -> int:
    """An int (not bool) in int64 range, e.g. a group or anchor id."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: {key} must be an int, got {type(value).__name__}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{where}: {key} = {value} is outside the int64 range")
    return value


def _check_trajectories_arg(trajectories) -> None:
    """A list (or any iterable, e.g. a generator, consumed once) of trajectory mappings; one
    trajectory mapping by itself, a string or a non-iterable is refused."""
    if isinstance(trajectories, (Mapping, str, bytes)) or not isinstance(trajectories, Iterable):
        raise ValueError(
            "trajectories: expected a list (or iterable) of trajectory mappings, got "
            f"{type(trajectories).__name__}"
            + (" (wrap a single trajectory in a list)" if isinstance(trajectories, Mapping) else "")
        )


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
    group = _as_int64(group, _where(b), "'group'")
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise ValueError(
            f"{_where(b)}: 'steps' must be a list of step mappings, got {type(steps).__name__}"
        )
    if len(steps) == 0:
        raise ValueError(f"{_where(b)}: a trajectory needs at least one step, got zero steps")
    return steps, bool(terminated), group


def read_records(trajectories, layout: str = "auto") -> Records:
    """Check the records and extract token ids and per-step facts (see module docstring).

    ``trajectories`` is a list, tuple or any other iterable of trajectory mappings (a
    generator is consumed once); a mapping by itself (one trajectory not wrapped in a list), a
    string or a non-iterable is refused.

    Raises ``ValueError`` naming ``trajectories[b].steps[t]`` (or ``trajectories[b]`` for
    per-trajectory fields) and the rule for: a missing key, an empty ``prompt_ids`` or
    ``action_ids``, id fields that are not ordered sequences (sets and dicts are refused; lists,
    tuples, ranges and 1-D numpy arrays / torch tensors are taken), a non-integer, bool,
    negative or beyond-int64 id (a bool is an int to Python: a mask passed as ids would become
    ids 0/1), ``logprobs`` whose length differs from the action's, non-numeric or non-finite
    rewards, log-probs that are not finite and <= 0 (as float32), ``group`` / ``anchor`` ids
    that are not ints in int64 range, ``logprobs`` or ``anchor`` given for some steps only, a
    trajectory with zero steps, and (``layout="merged"``) a step whose prompt does not extend
    the previous step's prompt + action. Rewards may be bools or any real number within
    float32 range.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    _check_trajectories_arg(trajectories)
    may_merge, must_merge = layout != "rows", layout == "merged"
    tokens, new_len, act_len, starts = array("q"), array("q"), array("q"), array("b")
    chunk_start, chunks = array("q"), []  # where each step's ids came from (bool check)
    traj_steps, group, terminated = array("q"), array("q"), array("b")
    rewards, logprobs, anchors = array("d"), array("f"), array("q")
    with_lp = without_lp = with_anchor = without_anchor = None  # first (b, t) of each kind

    for b, traj in enumerate(trajectories):
        steps, term, grp = _check_trajectory(traj, b)
        traj_steps.append(len(steps))
        terminated.append(term)
        group.append(grp)
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
            # each id list appended is recorded as a chunk (for the bool check at the end)
            try:
                if merge:
                    if n_prompt > n_context:
                        chunk_start.append(len(tokens))
                        chunks.append((prompt, n_context, b, t, "prompt_ids"))
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
                    chunk_start.append(len(tokens))
                    chunks.append((prompt, 0, b, t, "prompt_ids"))
                    tokens.fromlist(prompt)
                    new_len.append(n_prompt)
                chunk_start.append(len(tokens))
                chunks.append((action, 0, b, t, "action_ids"))
                tokens.fromlist(action)
            except (TypeError, OverflowError) as e:
                key = chunks[-1][4]  # the list being converted
                raise ValueError(
                    f"{_where(b, t)}: {key} must be ints in int64 range ({e})"
                ) from None
            act_len.append(n_action)
            starts.append(not merge)
            try:
                rewards.append(reward)
            except (TypeError, OverflowError):
                raise ValueError(
                    f"{_where(b, t)}: reward must be a real number within float range, got "
                    f"{type(reward).__name__}"
                ) from None

            if lp is not None:
                if type(lp) is not list:
                    lp = _as_list(lp, _where(b, t), "logprobs", "real numbers")
                if len(lp) != n_action:
                    raise ValueError(
                        f"{_where(b, t)}: logprobs has {len(lp)} entries but action_ids has "
                        f"{n_action} (one log-prob per action token)"
                    )
                try:
                    logprobs.fromlist(lp)
                except (TypeError, OverflowError):
                    raise ValueError(
                        f"{_where(b, t)}: logprobs must be real numbers within float range"
                    ) from None
                with_lp = with_lp or (b, t)
            else:
                without_lp = without_lp or (b, t)
            if anchor is not None:
                anchors.append(_as_int64(anchor, _where(b, t), "anchor"))
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
    _check_no_bool_ids(out.tokens, chunk_start, chunks)
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
    if r.rollout_logp is not None and r.rollout_logp.size:
        # one pass in the common case: NaN propagates into max, and finite log-probs are <= 0
        high = r.rollout_logp.max()
        if not high <= 0.0 or not np.isfinite(r.rollout_logp.min()):
            bad = ~(np.isfinite(r.rollout_logp) & (r.rollout_logp <= 0.0))
            i = int(np.argmax(bad))
            cu = np.cumsum(r.action_len)
            s = int(np.searchsorted(cu, i, side="right"))
            k = i - (int(cu[s - 1]) if s else 0)
            raise ValueError(
                f"{_where(*_locate(r, s))}: logprobs must be finite and <= 0 (log-probs), got "
                f"logprobs[{k}] = {r.rollout_logp[i]} (as float32)"
            )
