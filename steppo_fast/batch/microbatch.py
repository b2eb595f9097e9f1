"""Micro-batching of a :class:`~steppo_fast.StepBatch` by whole trajectories.

Planning (which trajectories go together) runs on the host over B trajectory sizes; gathering
(building each re-based sub-batch) is vectorised torch on the batch's device.

Methods:

- ``"ffd"``: first-fit decreasing bin packing under the token budget. Visit trajectories
  largest first (ties: parent order) and put each into the first micro-batch with room; a
  trajectory larger than the budget gets one of its own. Usually the fewest micro-batches
  (FFD uses at most 11/9 OPT + 6/9 bins), so the fewest, fullest forward passes. Inside a
  micro-batch trajectories keep parent order; micro-batches are ordered by their first
  trajectory. Indices are not contiguous in general.
- ``"contiguous"``: walk trajectories in parent order, start a new micro-batch when the next
  one does not fit. Contiguous index ranges, more micro-batches when sizes vary.

Both cost O(B * micro-batches) host work at most (numba above a size threshold for FFD).

Gathering: one gather permutes the batch so that every micro-batch's trajectories are adjacent
(skipped when the order is already the parent's, e.g. ``"contiguous"``); each micro-batch is
then a set of slices (views) of that permuted batch with its offsets re-based by a subtraction.
So all micro-batches together cost one copy of the batch, and they share its storage (treat
them as read-only, like the parent).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import packing_numba

METHODS = ("ffd", "contiguous")


class MicroBatch(NamedTuple):
    """A sub-batch and where its steps / trajectories sit in the parent batch."""

    batch: object  # StepBatch (re-based offsets, validates on its own)
    step_index: torch.Tensor  # [S_mb] int64: parent step of each sub-batch step
    traj_index: torch.Tensor  # [B_mb] int64: parent trajectory of each sub-batch trajectory


def ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` (int64, on starts' device)."""
    total = int(lengths.sum()) if lengths.numel() else 0
    begin = torch.cumsum(lengths, 0) - lengths  # where each range begins in the output
    shift = torch.repeat_interleave(starts - begin, lengths, output_size=total)
    return shift + torch.arange(total, device=starts.device)


def plan_ffd_numpy(sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """First-fit decreasing bins (lists of item indices, ascending) -- pure Python/numpy."""
    order = np.argsort(-sizes, kind="stable")
    room = np.empty(sizes.size, dtype=np.int64)  # remaining budget per bin, -1 = closed
    bin_of = np.empty(sizes.size, dtype=np.int64)
    num_bins = 0
    for item, size in zip(order.tolist(), sizes[order].tolist()):
        k = int(np.argmax(room[:num_bins] >= size)) if size <= max_tokens and num_bins else 0
        if num_bins == 0 or size > max_tokens or room[k] < size:  # no open bin has room
            k = num_bins
            room[k] = max_tokens if size <= max_tokens else -1
            num_bins += 1
        if room[k] >= 0:
            room[k] -= size
        bin_of[item] = k
    return _group_bins(bin_of, num_bins)


def _group_bins(bin_of: np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Item lists per bin (parent order inside a bin), bins ordered by their first item."""
    by_bin = np.argsort(bin_of, kind="stable")
    counts = np.bincount(bin_of, minlength=num_bins)
    bins = np.split(by_bin, np.cumsum(counts)[:-1]) if num_bins else []
    return sorted(bins, key=lambda m: int(m[0]))


def plan_ffd(sizes: np.ndarray, max_tokens: int, use_numba: bool | None = None):
    if not packing_numba.should_use(use_numba, work=sizes.size * 64):
        return plan_ffd_numpy(sizes, max_tokens)
    order = np.argsort(-sizes, kind="stable")
    bin_of, num_bins = packing_numba.ffd_numba(sizes.astype(np.int64), order, int(max_tokens))
    return _group_bins(bin_of, num_bins)


def plan_contiguous(sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Greedy in parent order; an oversized item closes the open bin and sits alone."""
    bins: list[np.ndarray] = []
    start, used = 0, 0
    for item, size in enumerate(sizes.tolist()):
        if item > start and used + size > max_tokens:
            bins.append(np.arange(start, item))
            start, used = item, 0
        used += size
    if sizes.size:
        bins.append(np.arange(start, sizes.size))
    return bins


def take_trajectories(batch, traj_index) -> MicroBatch:
    """The sub-batch of ``traj_index`` (in that order) with offsets re-based to 0."""
    dev = batch.device
    traj_index = torch.as_tensor(traj_index, dtype=torch.long, device=dev)
    if traj_index.numel() and (
        int(traj_index.min()) < 0 or int(traj_index.max()) >= batch.num_trajs
    ):
        raise ValueError(f"traj_index: entries must lie in [0, {batch.num_trajs})")
    cu_trajs, cu_steps = batch.cu_trajs.long(), batch.cu_steps.long()
    seq_off, tok_off = batch.traj_seq_offsets, batch.traj_token_offsets

    step0 = cu_trajs[traj_index]
    n_steps = cu_trajs[traj_index + 1] - step0
    step_index = ranges(step0, n_steps)
    seq_index = ranges(seq_off[traj_index], seq_off[traj_index + 1] - seq_off[traj_index])
    tok0 = tok_off[traj_index]
    n_tok = tok_off[traj_index + 1] - tok0
    token_index = ranges(tok0, n_tok)
    act0 = cu_steps[step0]
    n_act = cu_steps[step0 + n_steps] - act0
    action_entries = ranges(act0, n_act)

    # token shift of each trajectory: parent start - sub-batch start
    shift = tok0 - (torch.cumsum(n_tok, 0) - n_tok)
    step_shift = torch.repeat_interleave(shift, n_steps, output_size=step_index.numel())
    act_shift = torch.repeat_interleave(shift, n_act, output_size=action_entries.numel())

    def offsets(lengths: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=dev)
        out[1:] = torch.cumsum(lengths, 0)
        return out

    def pick(x, index):
        return None if x is None else x[index]

    sub = type(batch)(
        input_ids=batch.input_ids[token_index],
        cu_seqlens=offsets(batch.seqlens[seq_index]),
        action_index=batch.action_index[action_entries] - act_shift,
        cu_steps=offsets(batch.step_num_actions[step_index]),
        cu_trajs=offsets(n_steps),
        value_index=batch.value_index[step_index] - step_shift,
        rewards=batch.rewards[step_index],
        terminated=batch.terminated[traj_index],
        group=batch.group[traj_index],
        anchor=pick(batch.anchor, step_index),
        step_weight=pick(batch.step_weight, step_index),
        rollout_logp=pick(batch.rollout_logp, action_entries),
    )
    return MicroBatch(sub, step_index, traj_index)


def microbatches(batch, max_tokens: int, *, method: str = "ffd", use_numba=None):
    """See :meth:`StepBatch.microbatches`."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
        raise ValueError(f"max_tokens: must be an int, got {type(max_tokens).__name__}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: must be > 0, got {max_tokens}")
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(map(repr, METHODS))}")
    sizes = batch.traj_token_offsets.diff().cpu().numpy()
    if method == "ffd":
        bins = plan_ffd(sizes, int(max_tokens), use_numba=use_numba)
    else:
        bins = plan_contiguous(sizes, int(max_tokens))
    if not bins:
        return []
    # One gather puts every micro-batch's trajectories next to each other; each micro-batch is
    # then a slice of that permuted batch (views) with offsets re-based by a subtraction.
    order = np.concatenate(bins)
    if np.array_equal(order, np.arange(batch.num_trajs)):  # already in order: views of batch
        dev = batch.device
        whole = MicroBatch(
            batch,
            torch.arange(batch.num_steps, device=dev),
            torch.arange(batch.num_trajs, device=dev),
        )
    else:
        whole = take_trajectories(batch, torch.from_numpy(order).to(batch.device))
    # per-trajectory offsets of the permuted batch on the host (4 small transfers in total)
    p = whole.batch
    offsets = (
        p.cu_trajs.tolist(),  # steps
        p.traj_seq_offsets.tolist(),  # sequences
        p.traj_token_offsets.tolist(),  # tokens
        p.token_traj_offsets.tolist(),  # action entries
    )
    ends = np.cumsum([len(b) for b in bins]).tolist()
    return [_slice_trajectories(whole, offsets, t0, t1) for t0, t1 in zip([0] + ends[:-1], ends)]


def _slice_trajectories(whole: MicroBatch, offsets, t0: int, t1: int) -> MicroBatch:
    """Trajectories [t0, t1) of a (permuted) batch as a re-based sub-batch of views;
    ``offsets`` = host lists of the per-trajectory step / sequence / token / action offsets."""
    b = whole.batch
    steps, seqs, tokens, actions = offsets
    s0, s1, r0, r1 = steps[t0], steps[t1], seqs[t0], seqs[t1]
    n0, n1, a0, a1 = tokens[t0], tokens[t1], actions[t0], actions[t1]

    def view(x, start, stop):
        return None if x is None else x[start:stop]

    sub = type(b)(
        input_ids=b.input_ids[n0:n1],
        cu_seqlens=b.cu_seqlens[r0 : r1 + 1] - n0,
        action_index=b.action_index[a0:a1] - n0,
        cu_steps=b.cu_steps[s0 : s1 + 1] - a0,
        cu_trajs=b.cu_trajs[t0 : t1 + 1] - s0,
        value_index=b.value_index[s0:s1] - n0,
        rewards=b.rewards[s0:s1],
        terminated=b.terminated[t0:t1],
        group=b.group[t0:t1],
        anchor=view(b.anchor, s0, s1),
        step_weight=view(b.step_weight, s0, s1),
        rollout_logp=view(b.rollout_logp, a0, a1),
    )
    return MicroBatch(sub, whole.step_index[s0:s1], whole.traj_index[t0:t1])
