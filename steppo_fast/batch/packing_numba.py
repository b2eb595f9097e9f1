"""Optional numba acceleration of host-side ragged bookkeeping (CSR construction, bin packing).

numba is an optional dependency (``pip install steppo_fast[numba]``). Nothing here imports numba
at module import: the loops below are plain module-level Python functions that are compiled with
``numba.njit(cache=True)`` on first use (compiled code is cached on disk next to this file, so
later processes only load it). Without numba, callers use the numpy versions in
:mod:`steppo_fast.batch.packing` and :mod:`steppo_fast.batch.microbatch`; both paths give
identical arrays (tested).

``should_use(None, work)`` picks numba only when it is installed and the job is big enough to
repay importing numba and loading the compiled code (about 0.4 s once per process). Measured
(bench/bench_packing.py, 1024 trajectories x 32 steps): the CSR stage takes 0.5 ms with numpy
vs 0.3 ms with numba, and FFD over 1024 trajectories 2.6 ms (vectorised numpy) vs 0.6 ms, while
``from_trajectories`` spends ~200 ms CPU in the per-record Python walk (list slicing / comparison
and id conversion, which numba cannot take over from Python lists). So numba only pays for very
large batches, hence the high default threshold.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np

# Below this much work (action tokens + tokens / 64 for the CSR stage, 64 x trajectories for bin
# packing), numpy costs less than numba's one-off per-process import + load (~0.4 s).
MIN_WORK_FOR_NUMBA = 1 << 22


@functools.cache
def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def should_use(use_numba: bool | None, work: int) -> bool:
    """Resolve the ``use_numba`` switch: True = numba (error if missing), False = numpy,
    None = numba when installed and ``work >= MIN_WORK_FOR_NUMBA``."""
    if use_numba is None:
        return numba_available() and work >= MIN_WORK_FOR_NUMBA
    if use_numba and not numba_available():
        raise RuntimeError("use_numba=True but numba is not installed (pip install numba)")
    return bool(use_numba)


def _csr_loop(new_len, act_len, starts_sequence, traj_num_steps, num_tokens):
    """One pass over the steps: offsets and index arrays of the StepBatch.

    new_len[S] int64: prompt tokens a step adds; act_len[S] int64: its action tokens;
    starts_sequence[S] bool: it opens a sequence; traj_num_steps[B] int64; num_tokens = N.
    """
    num_steps = new_len.shape[0]
    num_actions = 0
    num_seqs = 0
    for s in range(num_steps):
        num_actions += act_len[s]
        num_seqs += 1 if starts_sequence[s] else 0
    cu_seqlens = np.empty(num_seqs + 1, dtype=np.int32)
    action_index = np.empty(num_actions, dtype=np.int64)
    cu_steps = np.empty(num_steps + 1, dtype=np.int32)
    value_index = np.empty(num_steps, dtype=np.int64)
    pos = 0  # next token position
    a = 0  # next action entry
    r = 0  # next sequence
    cu_steps[0] = 0
    for s in range(num_steps):
        if starts_sequence[s]:
            cu_seqlens[r] = pos
            r += 1
        pos += new_len[s]
        value_index[s] = pos - 1
        for _ in range(act_len[s]):
            action_index[a] = pos
            a += 1
            pos += 1
        cu_steps[s + 1] = a
    cu_seqlens[num_seqs] = num_tokens
    cu_trajs = np.empty(traj_num_steps.shape[0] + 1, dtype=np.int32)
    cu_trajs[0] = 0
    for b in range(traj_num_steps.shape[0]):
        cu_trajs[b + 1] = cu_trajs[b] + traj_num_steps[b]
    return cu_seqlens, action_index, cu_steps, cu_trajs, value_index


def _ffd_loop(sizes, order, max_tokens):
    """First-fit decreasing: visit items in ``order`` (largest first) and put each into the first
    open bin with room; an item larger than ``max_tokens`` gets a closed bin of its own.
    Returns bin_of[B] (bin id per item, ids in creation order) and the number of bins."""
    num_items = sizes.shape[0]
    bin_of = np.empty(num_items, dtype=np.int64)
    room = np.empty(num_items, dtype=np.int64)  # remaining budget per bin, -1 = closed
    num_bins = 0
    for i in range(num_items):
        item = order[i]
        size = sizes[item]
        chosen = -1
        if size <= max_tokens:
            for k in range(num_bins):
                if room[k] >= size:
                    chosen = k
                    break
        if chosen < 0:
            chosen = num_bins
            room[chosen] = max_tokens if size <= max_tokens else -1
            num_bins += 1
        if room[chosen] >= 0:
            room[chosen] -= size
        bin_of[item] = chosen
    return bin_of, num_bins


@functools.cache
def _jit(fn):
    import numba

    return numba.njit(cache=True, nogil=True)(fn)


def csr_numba(records) -> tuple:
    """numba version of :func:`steppo_fast.batch.packing.csr_numpy`: the same arrays, as the
    tuple ``(cu_seqlens, action_index, cu_steps, cu_trajs, value_index)`` (the caller wraps it
    in ``packing.Csr``; this module imports nothing of the package: it is a leaf)."""
    return _jit(_csr_loop)(
        records.new_prompt_len,
        records.action_len,
        records.starts_sequence,
        records.traj_num_steps,
        records.tokens.size,
    )


def ffd_numba(sizes: np.ndarray, order: np.ndarray, max_tokens: int):
    return _jit(_ffd_loop)(sizes, order, max_tokens)
