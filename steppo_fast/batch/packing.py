"""Packing: the CSR offsets and index arrays of a :class:`~steppo_fast.StepBatch` from
:class:`~steppo_fast.batch.records.Records` (stage 2 of ``StepBatch.from_trajectories``).

Inputs are per-step lengths (``new_prompt_len`` [S], ``action_len`` [S], ``starts_sequence``
[S], ``traj_num_steps`` [B]); outputs (all numpy, the StepBatch dtypes):

- ``cu_seqlens`` [R+1] int32: a sequence starts at every step with ``starts_sequence``;
- ``action_index`` [A] int64: a step's action tokens follow its new prompt tokens;
- ``cu_steps`` [S+1] int32 and ``cu_trajs`` [B+1] int32: cumulative sums of ``action_len`` and
  ``traj_num_steps``;
- ``value_index`` [S] int64: the token right before each step's first action token.

Two implementations give identical arrays (tested): vectorised numpy (:func:`csr_numpy`) and one
numba loop (:mod:`steppo_fast.batch.packing_numba`), chosen by :func:`build_csr`. O(S + A).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import packing_numba
from .records import Records


@dataclass
class Csr:
    """The StepBatch index arrays (numpy, final dtypes)."""

    cu_seqlens: np.ndarray  # [R+1] int32
    action_index: np.ndarray  # [A] int64
    cu_steps: np.ndarray  # [S+1] int32
    cu_trajs: np.ndarray  # [B+1] int32
    value_index: np.ndarray  # [S] int64


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
    batch is large enough to repay its dispatch (see :mod:`steppo_fast.batch.packing_numba`)."""
    if packing_numba.should_use(
        use_numba, work=records.action_len.size + records.tokens.size // 64
    ):
        return Csr(*packing_numba.csr_numba(records))
    return csr_numpy(records)
