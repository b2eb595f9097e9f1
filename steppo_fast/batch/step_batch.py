"""StepBatch: the step-level CSR batch every op and the trainer consume (docs/design.md §2).

Three nested ragged axes, all with int32 cumulative offsets:

====== ====== ========================================= =============================
axis   length what                                      offsets
====== ====== ========================================= =============================
token  N      all sequences concatenated (model input)  ``cu_seqlens`` [R+1]
action A      every action token, (trajectory, step,    ``cu_steps`` [S+1]
              position) order
step   S      every step, (trajectory, time) order      ``cu_trajs`` [B+1]
====== ====== ========================================= =============================

The batch is an immutable value (frozen dataclass): derived tensors (``position_ids``,
``action_ids``, ``step_traj``, ...) are computed on first access and cached on the instance; do
not modify its tensors in place. Build it with :meth:`StepBatch.from_trajectories`, check it with
:meth:`StepBatch.validate`, split it with :meth:`StepBatch.microbatches`.

There is deliberately no ``__len__``: a batch has five lengths (N, R, A, S, B); use
``num_tokens``, ``num_seqs``, ``num_actions``, ``num_steps``, ``num_trajs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checks, microbatch, packing, records
from .fields import OPTIONAL, TENSOR_FIELDS
from .microbatch import MicroBatch


def position_ids(cu_seqlens: torch.Tensor, num_tokens: int, *, numpy: bool) -> torch.Tensor:
    """[N] int64 position of each token in its sequence, from ``cu_seqlens`` [R+1].

    One N-sized array and one in-place cumsum: +1 per token, and at each (non-empty) sequence
    start a jump back to 0. ``numpy=True`` (CPU tensors) runs it in numpy, several times faster
    than torch's ``arange - repeat_interleave`` (which also needs three N-sized arrays).
    """
    seqlens = cu_seqlens.diff().long()
    lengths = seqlens[seqlens > 0]
    starts = cu_seqlens[:-1].long()[seqlens > 0]
    if numpy:
        pos = np.ones(num_tokens, dtype=np.int64)
        if num_tokens:
            pos[starts[1:].cpu().numpy()] = 1 - lengths[:-1].cpu().numpy()
            pos[0] = 0
        return torch.from_numpy(np.cumsum(pos, out=pos)).to(cu_seqlens.device)
    pos = torch.ones(num_tokens, dtype=torch.long, device=cu_seqlens.device)
    if num_tokens:
        pos[starts[1:]] = 1 - lengths[:-1]
        pos[0] = 0
    return pos.cumsum_(0)


@dataclass(frozen=True, eq=False, repr=False)
class StepBatch:
    """A batch of multi-step trajectories in the CSR layout of docs/design.md §2 (tensors on
    one device).

    Fields (N tokens, R sequences, A action tokens, S steps, B trajectories; the table
    :data:`steppo_fast.batch.fields.FIELDS`, which drives :meth:`validate`):

    - ``input_ids`` [N] int64 -- every sequence's tokens, concatenated (what the model sees);
      token ids >= 0.
    - ``cu_seqlens`` [R+1] int32 -- sequence r is tokens ``[cu_seqlens[r], cu_seqlens[r+1])``;
      offsets over N; every sequence holds a step; a trajectory's sequences are its own
      (contiguous, shared with no other trajectory).
    - ``action_index`` [A] int64 -- token position of each action token; ``logit_index =
      action_index - 1`` predicts it; in [0, N), strictly increasing; never the first token of a
      sequence.
    - ``cu_steps`` [S+1] int32 -- step s is action entries ``[cu_steps[s], cu_steps[s+1])``;
      offsets over A; every step has >= 1 action token; a step's tokens stay in one sequence.
    - ``cu_trajs`` [B+1] int32 -- trajectory b is steps ``[cu_trajs[b], cu_trajs[b+1])``;
      offsets over S; every trajectory has >= 1 step.
    - ``value_index`` [S] int64 -- the token before step s's first action token (the critic
      reads V(s_t) there); equals ``action_index[cu_steps[s]] - 1``.
    - ``rewards`` [S] float32 -- reward of each step; finite.
    - ``terminated`` [B] bool -- True: the trajectory ended (bootstrap 0); False: truncated.
    - ``group`` [B] int64 -- task/prompt group id (the baseline of GRPO-style advantages).
    - ``anchor`` [S] int64 (optional) -- GiGPO anchor-state id of each step.
    - ``step_weight`` [S] float32 (optional) -- weight of each step in the losses; 0 = a padding
      step that never reaches a loss; finite, >= 0.
    - ``rollout_logp`` [A] float32 (optional) -- the sampler's log-prob of each action token;
      finite, <= 0.

    Each trajectory owns whole sequences (its own, contiguous); one sequence may hold several
    steps (merged layout) or one (rows layout).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    action_index: torch.Tensor
    cu_steps: torch.Tensor
    cu_trajs: torch.Tensor
    value_index: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    group: torch.Tensor
    anchor: torch.Tensor | None = None
    step_weight: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self):
        # Structure only (types, dtypes, 1-D, lengths implied by shapes, one device): no host
        # sync, no value reads. validate() checks everything.
        checks.check_structure(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_trajectories(
        cls, trajectories: Sequence[Mapping], layout: str = "auto", *, device=None
    ) -> StepBatch:
        """Build a batch from rollout records (docs/design.md §2).

        ``trajectories``: list (or any iterable, e.g. a generator) of ``{"steps": [step, ...],
        "terminated": bool, "group": int}``; a step is ``{"prompt_ids": [int], "action_ids":
        [int], "reward": float}`` with optional ``"logprobs": [float]`` (one per action token,
        finite and <= 0) and ``"anchor": int``. Id fields are ordered sequences of ints (lists,
        tuples, 1-D int arrays/tensors; never bools, sets or dicts); ids, groups and anchors
        fit int64.

        ``layout``: ``"rows"`` -- one sequence per step (prompt + action); ``"merged"`` -- step
        t+1 continues step t's sequence (which must be a prefix of its prompt, else
        ``ValueError`` naming trajectory and step); ``"auto"`` -- merge exactly when the prefix
        property holds, else start a new sequence. Token ids are taken as given (never
        re-tokenised). ``rollout_logp`` / ``anchor`` are set when every step has them (and S > 0);
        given for some steps only is a ``ValueError``. Tensors are built on CPU, then moved to
        ``device`` if given. Raises ``ValueError`` naming ``trajectories[b].steps[t]`` and the
        rule for any malformed record (see :func:`steppo_fast.batch.records.read_records`).
        """
        return cls._from_records(trajectories, layout, device=device)

    @classmethod
    def _from_records(cls, trajectories, layout="auto", *, device=None, use_numba=None):
        recs = records.read_records(trajectories, layout)
        csr = packing.build_csr(recs, use_numba=use_numba)

        def t(x):
            return None if x is None else torch.from_numpy(x)

        batch = cls(
            input_ids=t(recs.tokens),
            cu_seqlens=t(csr.cu_seqlens),
            action_index=t(csr.action_index),
            cu_steps=t(csr.cu_steps),
            cu_trajs=t(csr.cu_trajs),
            value_index=t(csr.value_index),
            rewards=t(recs.rewards),
            terminated=t(recs.terminated),
            group=t(recs.group),
            anchor=t(recs.anchor),
            rollout_logp=t(recs.rollout_logp),
        )
        return batch if device is None else batch.to(device)

    # ------------------------------------------------------------------ checks
    def validate(self) -> StepBatch:
        """Check every invariant of docs/design.md §2; raise ``ValueError`` naming the field,
        the index and the rule broken. O(N + A + S) vectorised, one host sync per check on
        accelerators. Returns ``self`` (so ``StepBatch(...).validate()`` chains)."""
        checks.validate(self)
        return self

    # ------------------------------------------------------------------ counts
    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def num_tokens(self) -> int:
        """N: tokens on the token axis."""
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        """R: sequences."""
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_actions(self) -> int:
        """A: action tokens (entries of the action axis)."""
        return self.action_index.shape[0]

    @property
    def num_steps(self) -> int:
        """S: steps."""
        return self.cu_steps.shape[0] - 1

    @property
    def num_trajs(self) -> int:
        """B: trajectories."""
        return self.cu_trajs.shape[0] - 1

    # ------------------------------------------------------------------ derived (cached)
    def _cached(self, key: str, compute: Callable[[], object]):
        if key not in self._cache:
            # never cache an inference tensor (a batch first read under torch.inference_mode,
            # e.g. for old log-probs, is trained on afterwards)
            with torch.inference_mode(False):
                self._cache[key] = compute()
        return self._cache[key]

    @property
    def seqlens(self) -> torch.Tensor:
        """[R] int64: length of each sequence."""
        return self._cached("seqlens", lambda: self.cu_seqlens.diff().long())

    @property
    def position_ids(self) -> torch.Tensor:
        """[N] int64: position of each token inside its sequence (restarts at 0 per sequence)."""
        return self._cached(
            "position_ids",
            lambda: position_ids(self.cu_seqlens, self.num_tokens, numpy=self.device.type == "cpu"),
        )

    @property
    def max_seqlen(self) -> int:
        """Longest sequence (0 for an empty batch); a host int (syncs once, then cached)."""
        return self._cached("max_seqlen", lambda: int(self.seqlens.max()) if self.num_seqs else 0)

    @property
    def logit_index(self) -> torch.Tensor:
        """[A] int64: ``action_index - 1``, the hidden state that predicts each action token."""
        return self._cached("logit_index", lambda: self.action_index - 1)

    @property
    def action_ids(self) -> torch.Tensor:
        """[A] int64: ``input_ids[action_index]``, the sampled action tokens."""
        return self._cached("action_ids", lambda: self.input_ids[self.action_index])

    @property
    def step_num_actions(self) -> torch.Tensor:
        """[S] int64: action tokens per step (n_s)."""
        return self._cached("step_num_actions", lambda: self.cu_steps.diff().long())

    @property
    def step_traj(self) -> torch.Tensor:
        """[S] int64: trajectory of each step."""

        def compute():
            return torch.repeat_interleave(
                torch.arange(self.num_trajs, device=self.device),
                self.cu_trajs.diff().long(),
                output_size=self.num_steps,
            )

        return self._cached("step_traj", compute)

    @property
    def step_seq(self) -> torch.Tensor:
        """[S] int64: sequence holding each step (the one containing its ``value_index``)."""

        def compute():
            return torch.searchsorted(self.cu_seqlens.long(), self.value_index, right=True) - 1

        return self._cached("step_seq", compute)

    @property
    def token_traj_offsets(self) -> torch.Tensor:
        """[B+1] int32: ``cu_steps[cu_trajs]``, trajectory offsets on the action axis (for
        token-level GAE over action tokens)."""
        return self._cached("token_traj_offsets", lambda: self.cu_steps[self.cu_trajs.long()])

    @property
    def traj_seq_offsets(self) -> torch.Tensor:
        """[B+1] int64: trajectory b owns sequences ``[traj_seq_offsets[b], traj_seq_offsets[b+1])``
        (valid batches only: every sequence holds a step, trajectories own whole sequences)."""

        def compute():
            first = self.step_seq[self.cu_trajs[:-1].long()]
            end = torch.full((1,), self.num_seqs, dtype=torch.long, device=self.device)
            return torch.cat([first, end])

        return self._cached("traj_seq_offsets", compute)

    @property
    def traj_token_offsets(self) -> torch.Tensor:
        """[B+1] int64: trajectory b's tokens are ``[traj_token_offsets[b], ...[b+1])`` of the
        token axis (its sequences are contiguous)."""
        return self._cached(
            "traj_token_offsets", lambda: self.cu_seqlens.long()[self.traj_seq_offsets]
        )

    def actions_of_steps(self, step_index: torch.Tensor) -> torch.Tensor:
        """[sum n_s] int64: the action-axis entries of the given steps, step after step -- index
        A-long tensors (``old_logp``, ``rollout_logp``) with it, e.g. for a micro-batch:
        ``old_logp[batch.actions_of_steps(mb.step_index)]``."""
        step_index = step_index.to(device=self.device, dtype=torch.long)
        starts = self.cu_steps.long()[step_index]
        return microbatch.ranges(starts, self.step_num_actions[step_index])

    # ------------------------------------------------------------------ splitting / moving
    def microbatches(self, max_tokens: int, *, method: str = "ffd") -> list[MicroBatch]:
        """Split into micro-batches of whole trajectories with at most ``max_tokens`` input
        tokens (N) each; a trajectory longer than the budget gets a micro-batch of its own.

        ``method="ffd"`` (default): first-fit-decreasing bin packing -- fewest micro-batches in
        practice (fuller forward passes); each micro-batch lists its trajectories in parent
        order, but a micro-batch's trajectories need not be adjacent in the parent.
        ``method="contiguous"``: greedy in parent order, so indices are contiguous ranges.

        Returns a list of :class:`MicroBatch` ``(batch, step_index, traj_index)``: ``batch`` is a
        valid StepBatch with re-based offsets; ``step_index`` [S_mb] / ``traj_index`` [B_mb]
        (int64, on the batch's device) locate its steps / trajectories in the parent, so
        ``advantages[mb.step_index]`` slices a per-step tensor and
        ``old_logp[parent.actions_of_steps(mb.step_index)]`` a per-action one. An empty batch
        gives an empty list.
        """
        return microbatch.microbatches(self, max_tokens, method=method)

    def select_trajectories(self, traj_index: torch.Tensor) -> MicroBatch:
        """The sub-batch of the given trajectories (in the given order), re-based; returned as
        a :class:`MicroBatch` with the step / trajectory index maps into this batch."""
        return microbatch.take_trajectories(self, traj_index)

    def to(self, device=None, *, non_blocking: bool = False) -> StepBatch:
        """A copy with every tensor on ``device`` (derived caches are recomputed there)."""
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> StepBatch:
        """A copy in pinned host memory (for ``.to("cuda", non_blocking=True)``)."""
        return self._map(lambda x: x.pin_memory())

    def _map(self, fn) -> StepBatch:
        kwargs = {
            name: (None if getattr(self, name) is None else fn(getattr(self, name)))
            for name in TENSOR_FIELDS
        }
        return type(self)(**kwargs)

    def replace(self, **changes) -> StepBatch:
        """A copy with some fields replaced (e.g. ``step_weight=w``); caches start empty."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        optional = [n for n in OPTIONAL if getattr(self, n) is not None]
        return (
            f"StepBatch(trajs={self.num_trajs}, steps={self.num_steps}, seqs={self.num_seqs}, "
            f"tokens={self.num_tokens}, action_tokens={self.num_actions}, "
            f"device={self.device}, optional=[{', '.join(optional)}])"
        )
