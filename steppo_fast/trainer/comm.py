"""The communicator of a run: :class:`Comm` (W ranks under ``torchrun``) or :class:`LocalComm`
(one process), so the trainer runs one loop for 1..W ranks.

::

    torchrun --nproc-per-node 2 -m steppo_fast.trainer train --groups 16 ...

Both offer the same collectives over plain numbers, gradients, parameters and Python objects.
On :class:`LocalComm` (rank 0 of 1) every collective is the identity (or does nothing) and
returns its input exactly, so a 1-process run computes exactly what a loop written for one
process would; the one exception is by design: :meth:`LocalComm.whiten` is the ``whiten`` op
(on the backend ``impl`` picks; exact on equal entries, which it whitens to 0 bit for bit)
where :meth:`Comm.whiten` is :func:`global_whiten` (the same mean and unbiased std over the
union of the ranks' entries, accumulated in float64 through two all-reduces; both round once
into fp32, so they agree to about one fp32 rounding).

Devices (:func:`init_from_env`): with ``--device auto`` (the default) or ``cuda`` on a CUDA
machine, rank ``r`` runs on ``cuda:LOCAL_RANK`` and the process group uses NCCL; with
``--device cpu`` (or no CUDA) every rank runs on the CPU over gloo. The collectives of
:class:`Comm` are issued on tensors of the rank's device (NCCL takes CUDA tensors only).

How the W-rank update equals the 1-rank update (:class:`~.loop.Trainer`,
:func:`~.update.ppo_update`):

- *rollouts*: rank ``r`` plays the task groups ``g`` with ``g % W == r`` (:func:`rank_groups`;
  a whole GRPO group stays on one rank, so group baselines and GiGPO anchor groups are exact
  locally). Its trajectories have the global ids ``g * group_size + k`` they have in the 1-rank
  batch (:func:`global_traj_ids`).
- *advantages*: ``steppo`` / ``ppo`` whiten with global statistics (:meth:`Comm.whiten`).
- *mini-batches*: every rank draws the same permutation of the *global* trajectory ids (same
  shuffle generator) and keeps its own trajectories of each chunk.
- *normalisers*: the loss normaliser (sum of ``loss_normalizer`` over the micro-batches) and the
  value-loss count are all-reduced before the loss, so each rank's loss is its share of the
  global mean; :meth:`Comm.all_reduce_grads` then *sums* the gradients, which gives exactly the
  gradient of the global mini-batch loss; clipping and AdamW see identical gradients on every
  rank, so the parameters stay replicated.
- *metrics*: means are weighted over ranks (:meth:`Comm.mean`), critic statistics summed.

Sharding (``cfg.shard``, a strategy of multi-process runs: :attr:`Comm.can_shard`): ``"fsdp"``
(default) shards the policy and critic with FSDP2 ``fully_shard`` (:mod:`.fsdp`: gradients
reduce-scattered as sums, lock-step dummy micro-batches, rollouts on a full inference copy
refreshed after each update); ``"none"`` keeps full replicas and all-reduces the gradients once
per optimizer step (:meth:`Comm.all_reduce_grads`, DDP-equivalent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import whiten
from .config import resolve_device


@dataclass(frozen=True)
class Comm:
    """The process group of a run: this process's ``rank`` among ``world`` ranks, whose models
    and collective buffers live on ``device`` (CUDA for NCCL, the CPU for gloo)."""

    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    can_shard = True  # a process group exists: FSDP2 can shard over it (cfg.shard)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs and writes the run's files."""
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of numbers (in float64)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks of a list of numbers (in float64)."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, values: list[float], weight: float) -> list[float]:
        """Element-wise mean over ranks of ``values`` weighted by each rank's ``weight``
        (``sum_r w_r v_r / max(sum_r w_r, 1)``): the global mean of a per-rank mean over
        ``weight`` items."""
        sums = self.all_reduce_sum([weight, *(v * weight for v in values)])
        total = max(sums[0], 1.0)
        return [s / total for s in sums[1:]]

    def whiten(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """``whiten`` over the union of every rank's 1-D ``x`` (:func:`global_whiten`)."""
        return global_whiten(x, self)

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (the same list on every rank)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every ``p.grad`` by the sum over ranks (one flat fp32 all-reduce). A parameter
        that no rank gave a gradient keeps ``grad = None`` (as in a 1-rank step, so AdamW skips
        it); one that some rank did not touch counts as zeros there."""
        if not params:
            return
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes) + len(params), dtype=torch.float32, device=self.device)
        grads, flags = flat[: sum(sizes)].split(sizes), flat[sum(sizes) :]
        for i, p in enumerate(params):
            if p.grad is not None:
                grads[i].copy_(p.grad.reshape(-1))
                flags[i] = 1.0
        dist.all_reduce(flat)
        present = flags.tolist()  # one device -> host read, not one per parameter
        for i, p in enumerate(params):
            if present[i] > 0:
                p.grad = grads[i].view_as(p).to(p.dtype).clone()
            else:
                p.grad = None

    def broadcast_params(self, module: torch.nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers."""
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def together(self, fn) -> None:
        """Run ``fn()`` on every rank; if it raises on any rank, raise on every rank (the
        rank's own exception, or a ``RuntimeError`` quoting the first failing rank's), so no
        rank waits forever in a collective for one that failed. Synchronises like a barrier
        (the error texts travel between the ranks of this job, never from a file)."""
        error = None
        try:
            fn()
        except Exception as e:
            error = e
        texts = self.all_gather_object(None if error is None else f"{error}")
        if error is not None:
            raise error
        failed = next(((r, t) for r, t in enumerate(texts) if t is not None), None)
        if failed is not None:
            raise RuntimeError(f"rank {failed[0]} failed: {failed[1]}")

    def close(self) -> None:
        """Leave the process group (end of a run)."""
        dist.barrier()
        dist.destroy_process_group()


class LocalComm(Comm):
    """The communicator of a single process: rank 0 of 1 on ``device`` (default: the CPU), no
    process group. Every collective returns its input unchanged (numbers as ``float``) or does
    nothing; :meth:`together` runs ``fn`` and lets its exception through."""

    can_shard = False  # no process group: cfg.shard does not apply

    def __init__(self, device: torch.device | str = "cpu"):
        # (a frozen dataclass: its fields are set once, here)
        object.__setattr__(self, "rank", 0)
        object.__setattr__(self, "world", 1)
        object.__setattr__(self, "device", torch.device(device))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def mean(self, values: list[float], weight: float) -> list[float]:
        return [float(v) for v in values]  # one rank: its mean, exactly (no v * w / w rounding)

    def whiten(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        return whiten(x, impl=impl)  # the op itself, not the collective path

    def all_gather_object(self, obj) -> list:
        return [obj]

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        pass

    def broadcast_params(self, module: torch.nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass

    def together(self, fn) -> None:
        fn()

    def close(self) -> None:
        pass


def init_from_env(device: str = "auto", backend: str | None = None) -> Comm:
    """The communicator of this launch: a :class:`Comm` under ``torchrun`` (``WORLD_SIZE`` >
    1, the process group initialised here), else a :class:`LocalComm` on ``device`` resolved.

    ``device``: the ``--device`` value; a CUDA device becomes ``cuda:LOCAL_RANK`` (and the
    current CUDA device of the process), see :func:`~.config.resolve_device`. ``backend``
    defaults to ``"nccl"`` on CUDA and ``"gloo"`` on the CPU. The environment is read when
    this is called (never at import)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return LocalComm(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL, all_gather_object and FSDP use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return Comm(dist.get_rank(), dist.get_world_size(), dev)


def rank_groups(groups: int, comm: Comm) -> list[int]:
    """The task groups rank ``comm.rank`` plays: ``g % world == rank`` (all of them on 1 rank)."""
    return [g for g in range(groups) if g % comm.world == comm.rank]


def global_traj_ids(my_groups: list[int], group_size: int) -> torch.Tensor:
    """Ids in the 1-rank batch (``g * group_size + k``) of a rank's trajectories, in order
    (host: matched against the CPU mini-batch permutation). [T_local] int64."""
    ids = [g * group_size + k for g in my_groups for k in range(group_size)]
    return torch.tensor(ids, dtype=torch.long)  # host: see the docstring


def global_whiten(x: torch.Tensor, comm: Comm, eps: float = 1e-8) -> torch.Tensor:
    """``whiten(x)`` over the union of every rank's ``x`` (1-D): mean and unbiased std of all
    n entries of the global batch, ``(x - mean) / (std + eps)``, accumulated in float64 (two
    all-reduces), same degenerate cases as ``whiten`` (n < 2: scale 1). [n] -> [n] fp32."""
    xd = x.detach().double()
    count, total = comm.all_reduce_sum([xd.numel(), float(xd.sum())])
    mean = total / max(count, 1.0)
    (sq,) = comm.all_reduce_sum([float((xd - mean).square().sum())])
    scale = (sq / max(count - 1.0, 1.0)) ** 0.5 + eps if count >= 2 else 1.0
    return ((x.double() - mean) / scale).float()


LOCAL = LocalComm()  # the single-process communicator on the CPU (a default argument)
