"""Data-parallel training under ``torchrun``: rollouts split across ranks, global normalisers,
one update on W ranks == the same update on 1 rank (within fp32 rounding).

::

    torchrun --nproc-per-node 2 -m steppo_fast.trainer train --groups 16 ...

Devices (:func:`init_from_env`): with ``--device auto`` (the default) or ``cuda`` on a CUDA
machine, rank ``r`` runs on ``cuda:LOCAL_RANK`` and the process group uses NCCL; with
``--device cpu`` (or no CUDA) every rank runs on the CPU over gloo. The collectives of
:class:`Comm` are issued on tensors of the rank's device (NCCL takes CUDA tensors only).

How the W-rank update equals the 1-rank update:

- *rollouts*: rank ``r`` plays the task groups ``g`` with ``g % W == r`` (a whole GRPO group
  stays on one rank, so group baselines and GiGPO anchor groups are exact locally). Its
  trajectories have the global ids ``g * group_size + k`` they have in the 1-rank batch.
- *advantages*: ``steppo`` / ``ppo`` whiten with global statistics (:func:`global_whiten`:
  all-reduced count, sum, then sum of squared deviations; unbiased std, as ``whiten``).
- *mini-batches*: every rank draws the same permutation of the *global* trajectory ids (same
  shuffle generator) and keeps its own trajectories of each chunk.
- *normalisers*: the loss normaliser (sum of ``loss_normalizer`` over the micro-batches) and the
  value-loss count are all-reduced before the loss, so each rank's loss is its share of the
  global mean; :meth:`Comm.all_reduce_grads` then *sums* the gradients, which gives exactly the
  gradient of the global mini-batch loss; clipping and AdamW see identical gradients on every
  rank, so the parameters stay replicated.

Sharding (``cfg.shard``): ``"fsdp"`` (default) shards the policy and critic with FSDP2
``fully_shard`` (:mod:`steppo_fast.trainer.fsdp`: gradients reduce-scattered as sums, lock-step
dummy micro-batches, rollouts on a full inference copy refreshed after each update);
``"none"`` keeps full replicas and all-reduces the gradients once per optimizer step
(:meth:`Comm.all_reduce_grads`, DDP-equivalent).

Checkpoints: rank 0 writes the single-process format with full tensors (plus every rank's
sampling-generator state); a checkpoint resumes under any number of ranks, sharded or not.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import StepBatch, step_gae
from .algorithms import Targets, compute_targets, token_rewards
from .checkpoint import has_checkpoint, write_checkpoint
from .config import TrainConfig, resolve_device
from .critic_metrics import critic_fields, critic_sums
from .loop import (
    Trainer,
    episode_stats,
    mean_ref_kl,
    restore_generator,
    train_seed,
    update_fields,
)
from .update import Models, ppo_update


@dataclass(frozen=True)
class Comm:
    """The process group of a run: this process's ``rank`` among ``world`` ranks, whose models
    and collective buffers live on ``device`` (CUDA for NCCL, the CPU for gloo)."""

    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
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
        texts = [None] * self.world
        dist.all_gather_object(texts, None if error is None else f"{error}")
        if error is not None:
            raise error
        failed = next(((r, t) for r, t in enumerate(texts) if t is not None), None)
        if failed is not None:
            raise RuntimeError(f"rank {failed[0]} failed: {failed[1]}")

    def close(self) -> None:
        """Leave the process group (end of a run)."""
        dist.barrier()
        dist.destroy_process_group()


def init_from_env(device: str = "auto", backend: str | None = None) -> Comm | None:
    """The :class:`Comm` of a ``torchrun`` launch (``WORLD_SIZE`` > 1), else ``None``.

    ``device``: the ``--device`` value; a CUDA device becomes ``cuda:LOCAL_RANK`` (and the
    current CUDA device of the process), see :func:`~.config.resolve_device`. ``backend``
    defaults to ``"nccl"`` on CUDA and ``"gloo"`` on the CPU. The environment is read when
    this is called (never at import)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL, all_gather_object and FSDP use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return Comm(dist.get_rank(), dist.get_world_size(), dev)


def rank_groups(groups: int, comm: Comm) -> list[int]:
    """The task groups rank ``comm.rank`` plays: ``g % world == rank``."""
    return [g for g in range(groups) if g % comm.world == comm.rank]


def global_traj_ids(my_groups: list[int], group_size: int) -> torch.Tensor:
    """Ids in the 1-rank batch (``g * group_size + k``) of a rank's trajectories, in order
    (host: matched against the CPU mini-batch permutation)."""
    ids = [g * group_size + k for g in my_groups for k in range(group_size)]
    return torch.tensor(ids, dtype=torch.long)  # host: see the docstring


def global_whiten(x: torch.Tensor, comm: Comm, eps: float = 1e-8) -> torch.Tensor:
    """``whiten(x)`` over the union of every rank's ``x`` (1-D): mean and unbiased std of all
    entries of the global batch (two all-reduces in float64), same degenerate cases as
    ``whiten`` (fewer than 2 entries: scale 1). [n] -> [n] fp32."""
    xd = x.detach().double()
    count, total = comm.all_reduce_sum([xd.numel(), float(xd.sum())])
    mean = total / max(count, 1.0)
    (sq,) = comm.all_reduce_sum([float((xd - mean).square().sum())])
    scale = (sq / max(count - 1.0, 1.0)) ** 0.5 + eps if count >= 2 else 1.0
    return ((x.double() - mean) / scale).float()


def compute_targets_global(cfg: TrainConfig, batch, values, comm: Comm | None) -> Targets:
    """:func:`compute_targets` with advantages whitened over the global batch (critic
    algorithms). Group-based algorithms are exact locally (a group lives on one rank)."""
    if comm is None or cfg.algo not in ("steppo", "ppo"):
        return compute_targets(cfg, batch, values)
    if cfg.algo == "steppo":
        rewards, offsets = batch.rewards, batch.cu_trajs
    else:
        rewards, offsets = token_rewards(batch), batch.token_traj_offsets
    adv, ret = step_gae(rewards, values, offsets, gamma=cfg.gamma, lam=cfg.lam, impl=cfg.impl)
    return Targets(
        global_whiten(adv, comm), ret, values, token_units=cfg.algo == "ppo", raw_advantages=adv
    )


class DistributedTrainer(Trainer):
    """:class:`Trainer` on one rank of a data-parallel run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, comm: Comm):
        super().__init__(cfg, device=comm.device)
        if self.cfg.groups < comm.world:
            raise ValueError(f"--groups: {self.cfg.groups} < {comm.world} ranks")
        self.comm = comm
        self.is_main = comm.is_main
        for module in (self.models.policy, self.models.critic, self.models.reference):
            if module is not None:
                comm.broadcast_params(module)
        self.sample_gen.manual_seed(self.cfg.seed + 1_000_003 * comm.rank)
        self.sharded = None
        if self.cfg.shard == "fsdp":
            from .fsdp import ShardedModels

            self.sharded = ShardedModels(self.models)  # shards policy and critic in place
            # (mesh: the default process group on this rank's device)
            self.optimizer = self.build_optimizer()  # over the DTensor shards

    def inference_models(self) -> Models:
        return self.models if self.sharded is None else self.sharded.inference

    def optimizer_state(self) -> dict | None:
        if self.sharded is None:
            return super().optimizer_state()
        from .fsdp import full_optimizer_state

        return full_optimizer_state(self.optimizer, keep=self.is_main)  # rank 0 writes it

    def load_optimizer_state(self, state: dict) -> None:
        if self.sharded is None:
            return super().load_optimizer_state(state)
        from .fsdp import load_full_optimizer_state

        load_full_optimizer_state(self.optimizer, state)

    def load_model_states(self, state: dict, path: str = "checkpoint.pt") -> None:
        if self.sharded is None:
            return super().load_model_states(state, path)
        self.sharded.load_full(state, path)

    # ------------------------------------------------------------------ run directory
    def prepare_run_dir(self, log=print) -> None:
        """Rank 0 prepares the folder (and loads a checkpoint), then the other ranks load the
        same checkpoint; a failure on any rank is raised on every rank (never a hang)."""
        prepare = super().prepare_run_dir
        self.comm.together(lambda: prepare(log) if self.is_main else None)

        def load() -> None:
            if not self.is_main and self.cfg.resume and has_checkpoint(self.out):
                self.load_checkpoint(warn=lambda m: None)  # the same file rank 0 chose

        self.comm.together(load)

    def save_checkpoint(self) -> None:
        states = [None] * self.comm.world
        dist.all_gather_object(states, (self.sample_gen.device.type, self.sample_gen.get_state()))
        state = self.state()  # every rank: gathering sharded optimizer state is collective
        if self.is_main:
            state["sample_gen_ranks"] = [s for _, s in states]
            state["sample_gen_rank_devices"] = [d for d, _ in states]
        # a failed write (a full disk) on rank 0 stops every rank
        self.comm.together(lambda: write_checkpoint(state, self.out) if self.is_main else None)

    def restore(self, state: dict, path: str) -> None:
        super().restore(state, path)
        saved, rank = state.get("sample_gen_ranks"), self.comm.rank
        fresh = self.cfg.seed + 1_000_003 * rank + self.iteration  # a stream per (iteration, rank)
        if saved and rank < len(saved):
            kinds = state.get("sample_gen_rank_devices") or ["cpu"] * len(saved)
            restore_generator(self.sample_gen, saved[rank], kinds[rank], reseed=fresh)
        else:  # more ranks than when saved: a fresh stream per (iteration, rank)
            self.sample_gen.manual_seed(fresh)

    def export_model(self) -> None:
        export = super().export_model
        self.comm.together(lambda: export() if self.is_main else None)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        cfg, models, comm, it = self.cfg, self.models, self.comm, self.iteration
        t0 = time.perf_counter()
        mine = rank_groups(cfg.groups, comm)
        seeds = [
            train_seed(cfg.seed, it, g, cfg.groups) for g in mine for _ in range(cfg.group_size)
        ]
        groups = [g for g in mine for _ in range(cfg.group_size)]
        res = self.collect(
            seeds, groups, greedy=False, generator=self.sample_gen, desc=f"rollout {it + 1}"
        )
        t1 = time.perf_counter()
        batch = StepBatch.from_trajectories(res.trajectories, layout=cfg.layout, device=self.device)
        out, ref_logp = self.score(batch, res.masks)
        targets = compute_targets_global(cfg, batch, out.values, comm)
        n_steps = cfg.epochs * max(1, min(cfg.minibatches, cfg.groups * cfg.group_size))
        with self._bar(n_steps, f"update {it + 1}", unit="step") as bar:
            stats = ppo_update(
                cfg,
                models,
                self.optimizer,
                batch,
                res.masks,
                targets,
                out.logp,
                ref_logp,
                self.shuffle_gen,
                on_step=bar.update,
                comm=comm,
                traj_ids=global_traj_ids(mine, cfg.group_size),
                sharded=self.sharded,
                train_policy=it >= cfg.critic_warmup,
            )
        if self.sharded is not None:
            self.sharded.refresh()  # rollouts, evaluation and checkpoints read the full copy
        t2 = time.perf_counter()
        self.iteration += 1
        n = len(res.trajectories)
        local = episode_stats(res.trajectories)
        ref_kl = 0.0 if ref_logp is None else mean_ref_kl(out.logp, ref_logp) * batch.num_actions
        diff = float((batch.rollout_logp - out.logp).abs().max()) if batch.num_actions else 0.0
        sums = comm.all_reduce_sum(
            [
                n,
                *(local[k] * n for k in local),
                batch.num_tokens,
                batch.num_actions,
                batch.num_seqs,
                ref_kl,
            ]
        )
        (max_diff,) = comm.all_reduce_max([diff])
        total = max(sums[0], 1.0)
        row = {"iter": self.iteration, **{k: sums[1 + i] / total for i, k in enumerate(local)}}
        row.update(
            tokens=int(sums[4]),
            action_tokens=int(sums[5]),
            sequences=int(sums[6]),
            **update_fields(stats, self.wall_s(), t0, t1, t2),
            ref_kl=None if ref_logp is None else sums[7] / max(sums[5], 1.0),
            logp_diff=max_diff,
            ranks=comm.world,
        )
        if targets.returns is not None:  # summed statistics: the global batch's metrics
            sums = critic_sums(targets.returns, targets.old_values, targets.raw_advantages)
            row.update(critic_fields(comm.all_reduce_sum(sums)))
        return row
