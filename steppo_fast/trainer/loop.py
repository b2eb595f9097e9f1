"""The training loop: rollout -> StepBatch -> old/reference log-probs and values -> targets ->
PPO update, with held-out evaluation, metrics, curves and checkpoints.

Data flows one way: rollout records -> ``StepBatch.from_trajectories`` -> ops -> update.

Seeds: iteration ``i`` trains on tasks ``train_seed(cfg.seed, i, g)`` for ``g < cfg.groups``
(each task played ``cfg.group_size`` times: one GRPO group); evaluation uses the fixed held-out
seeds ``EVAL_SEED_BASE + k``, never used for training, the same for every run (so algorithms
and seeds are compared on the same tasks). Sampling and mini-batch shuffling draw from two
dedicated ``torch.Generator``s whose states are checkpointed, so ``--resume`` reproduces the
uninterrupted run's next updates exactly (same thread count).

Devices (``--device``, :func:`~.config.resolve_device`): the models, the sampling generator
and every tensor that reaches a model or an op live on ``Trainer.device``; the rollout records,
environments and tokenizer are Python objects on the host. The batch is built on the CPU from
the records and moved once per iteration (``StepBatch.from_trajectories(..., device=)``). The
mini-batch shuffle generator stays on the CPU (it only permutes trajectory ids), so the
mini-batches do not depend on the device. A sampling-generator state saved on another device
type (CPU and CUDA states differ) cannot be restored; the generator is then reseeded from
``(seed, iteration, rank)`` and the run continues with a different, still deterministic, stream.

Ranks: one loop for 1..W processes. The trainer talks to the other ranks through its
communicator (:mod:`.comm`): a :class:`~.comm.LocalComm` in one process (every collective is
the identity), a :class:`~.comm.Comm` under ``torchrun``. Rank ``r`` plays the task groups
``g % W == r``; advantages are whitened, normalisers and metrics reduced over the ranks; rank 0
alone logs and writes files; a failure on one rank is raised on every rank. With ``cfg.shard ==
"fsdp"`` and a process group the policy and critic are sharded with FSDP2 (:mod:`.fsdp`). A
checkpoint holds full tensors in one format (plus every rank's sampling-generator state) and
resumes under any number of ranks, sharded or not.
"""

from __future__ import annotations

import copy
import random
import time

import torch
from tqdm.auto import tqdm

from .. import StepBatch
from ..envs import make_env
from .algorithms import compute_targets
from .checkpoint import CHECKPOINT
from .comm import Comm, LocalComm, global_traj_ids, rank_groups
from .config import TrainConfig, resolve_device
from .critic_metrics import critic_fields, critic_sums
from .memory import compute_dtype, enable_grad_checkpointing
from .plot import plot_run
from .policy import Critic, build_policy, build_tokenizer
from .rollout import rollout
from .rows import episode_stats, mean_ref_kl, summary_line, update_fields
from .run_state import RunState
from .runfiles import write_metrics
from .update import ForwardOut, Models, forward, ppo_update, reference_logprobs
from .warmstart import load_init

EVAL_SEED_BASE = 1 << 40  # held-out task seeds: EVAL_SEED_BASE + k
__all__ = [  # (CHECKPOINT, episode_stats: imported from here by other modules and tests)
    "CHECKPOINT",
    "EVAL_SEED_BASE",
    "Trainer",
    "episode_stats",
    "train_seed",
]


def train_seed(run_seed: int, iteration: int, group: int, groups: int) -> int:
    """Task seed of ``group`` at ``iteration``: always < 2**40 = ``EVAL_SEED_BASE``, so never a
    held-out seed; each run seed (< 2**16, the range ``--seed`` accepts) owns its own block of
    2**24 task seeds."""
    return (run_seed % (1 << 16)) * (1 << 24) + (iteration * groups + group) % (1 << 24)


class Trainer(RunState):
    """Owns the models, optimizer, RNGs and run directory of one training run, on one rank of
    ``comm`` (default: a :class:`~.comm.LocalComm` on ``cfg.device`` resolved)."""

    def __init__(self, cfg: TrainConfig, comm: Comm | None = None):
        self.cfg = cfg = cfg.resolved()
        self.comm = comm = LocalComm(resolve_device(cfg.device)) if comm is None else comm
        if cfg.groups < comm.world:
            raise ValueError(f"--groups: {cfg.groups} < {comm.world} ranks")
        self.device = comm.device
        self.is_main = comm.is_main  # ranks > 0 write no files and print no logs
        torch.set_num_threads(cfg.threads)
        self.tokenizer = build_tokenizer(cfg)  # word vocabulary, or --model PATH's own
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # initialised on the CPU (the same weights on every device), then moved
        policy = build_policy(cfg, self.tokenizer).eval()
        if cfg.init:  # before the critic and the reference copy it (steppo sft's warm start)
            load_init(policy, cfg.init)
        critic = Critic(policy, shared=cfg.critic == "shared").eval() if cfg.uses_critic else None
        policy.to(self.device)
        if critic is not None:
            critic.to(self.device)
        reference = None
        if cfg.kl_coef != 0:
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if cfg.grad_checkpointing:  # before sharding: the FSDP units inherit the wrapping
            enable_grad_checkpointing(policy)
            enable_grad_checkpointing(None if critic is None else critic.backbone)
        self.models = Models(policy, critic, reference, forward_mode=cfg.forward, impl=cfg.impl)
        for module in (policy, critic, reference):
            if module is not None:
                comm.broadcast_params(module)  # every rank starts from rank 0's weights
        self.sharded = None  # the FSDP2 strategy (a process group and cfg.shard == "fsdp")
        if comm.can_shard and cfg.shard == "fsdp":
            from .fsdp import ShardedModels

            # shards policy and critic in place (mesh: the default process group, this device)
            self.sharded = ShardedModels(self.models)
        self.optimizer = self.build_optimizer()  # (over the DTensor shards under FSDP)
        # a sampling stream per rank; rank 0's is the 1-process run's
        self.sample_gen = torch.Generator(device=self.device)
        self.sample_gen.manual_seed(cfg.seed + 1_000_003 * comm.rank)
        # host: permutes trajectory ids only (device-independent mini-batches)
        self.shuffle_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        self.iteration = 0  # iterations completed
        self.wall_offset = 0.0  # wall seconds spent before a resume
        self.rows: list[dict] = []
        self.env_factory = lambda: make_env(cfg.env)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the policy (``lr``) then the critic (``critic_lr``) parameters."""
        policy, critic = self.models.policy, self.models.critic
        groups = [{"params": list(policy.parameters()), "lr": self.cfg.lr}]
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": self.cfg.critic_lr})
        return torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)

    def inference_models(self) -> Models:
        """The models rollouts, evaluation and export run (``self.models``; the gathered full
        copies under FSDP sharding)."""
        return self.models if self.sharded is None else self.sharded.inference

    # ------------------------------------------------------------------ rollouts
    def wall_s(self) -> float:
        return self.wall_offset + (
            time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0
        )

    def _bar(self, total: int, desc: str, unit: str = "ep"):
        return tqdm(total=total, desc=desc, leave=False, disable=not self.cfg.progress, unit=unit)

    def collect(self, seeds, groups, *, greedy: bool, generator, desc: str):
        with self._bar(len(seeds), desc) as bar:
            return rollout(
                self.inference_models().policy,
                self.tokenizer,
                self.env_factory,
                seeds,
                groups,
                use_grammar=self.cfg.grammar,
                temperature=self.cfg.temperature,
                greedy=greedy,
                max_action_tokens=self.cfg.max_action_tokens,
                generator=generator,
                on_step=bar.update,
            )

    def evaluate(self, episodes: int | None = None, greedy: bool | None = None) -> dict:
        """Success rate, mean return and episode length on the held-out seeds."""
        n = self.cfg.eval_episodes if episodes is None else episodes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"episodes: must be an integer >= 1, got {n!r}")
        greedy = self.cfg.eval_greedy if greedy is None else greedy
        seeds = [EVAL_SEED_BASE + k for k in range(n)]
        # eval never touches the training RNGs
        gen = torch.Generator(device=self.device).manual_seed(12345)
        res = self.collect(seeds, list(range(n)), greedy=greedy, generator=gen, desc="eval")
        return episode_stats(res.trajectories)

    # ------------------------------------------------------------------ one iteration
    def score(self, batch, masks) -> tuple[ForwardOut, torch.Tensor | None]:
        """The old policy's log-probs / entropies, the critic's values (step units, token units
        for ``ppo``, none without a critic) and the reference log-probs (``None`` without a KL
        term) of ``batch``, on :meth:`inference_models`: under ``torch.inference_mode()`` and
        ``--dtype``, through the same action-only path as training (no [N, V] logits). The
        results are cloned out of inference mode (plain fp32 tensors, usable by autograd and
        in-place collectives)."""
        cfg, models = self.cfg, self.inference_models()
        value_units = None if not cfg.uses_critic else ("token" if cfg.algo == "ppo" else "step")
        with torch.inference_mode(), compute_dtype(cfg.dtype, self.device):
            out = forward(models, batch, masks, cfg.temperature, value_units)
            ref_logp = None
            if models.reference is not None:
                ref_logp = reference_logprobs(
                    models.reference, batch, masks, cfg.temperature, models.forward_mode, cfg.impl
                )
        out = ForwardOut(*(None if t is None else t.clone() for t in vars(out).values()))
        return out, None if ref_logp is None else ref_logp.clone()

    def step(self) -> dict:
        """One iteration: rollout of this rank's task groups, targets, update. Returns its
        metrics row (the global batch's: means weighted and sums taken over the ranks)."""
        cfg, comm, it = self.cfg, self.comm, self.iteration
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
        targets = compute_targets(cfg, batch, out.values, comm)
        n_steps = cfg.epochs * max(1, min(cfg.minibatches, cfg.groups * cfg.group_size))
        with self._bar(n_steps, f"update {it + 1}", unit="step") as bar:
            stats = ppo_update(
                cfg,
                self.models,
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
        local = episode_stats(res.trajectories)
        row = {"iter": self.iteration}
        row.update(zip(local, comm.mean(list(local.values()), len(res.trajectories))))
        tokens, actions, seqs = comm.all_reduce_sum(
            [batch.num_tokens, batch.num_actions, batch.num_seqs]
        )
        ref_kl = None
        if ref_logp is not None:
            (ref_kl,) = comm.mean([mean_ref_kl(out.logp, ref_logp)], batch.num_actions)
        diff = float((batch.rollout_logp - out.logp).abs().max()) if batch.num_actions else 0.0
        row.update(
            tokens=int(tokens),
            action_tokens=int(actions),
            sequences=int(seqs),
            **update_fields(stats, self.wall_s(), t0, t1, t2),
            ref_kl=ref_kl,
            logp_diff=comm.all_reduce_max([diff])[0],
            ranks=comm.world,
        )
        if targets.returns is not None:  # summed statistics: the global batch's metrics
            sums = critic_sums(targets.returns, targets.old_values, targets.raw_advantages)
            row.update(critic_fields(comm.all_reduce_sum(sums)))
        return row

    # ------------------------------------------------------------------ whole run
    def train(self, log=print) -> list[dict]:
        """Run up to ``cfg.iters`` iterations (continuing after a resume). Returns the rows."""
        cfg = self.cfg
        log = log if self.is_main else _silent
        self.prepare_run_dir(log)
        self._t_start = time.perf_counter()
        if self.iteration == 0 and cfg.eval_every:
            row0 = {"iter": 0, "wall_s": 0.0}
            row0.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            self.rows.append(row0)
            log(f"it 0 | held-out success {row0['eval_success_rate']:.2f} (before training)")
        while self.iteration < cfg.iters:
            row = self.step()
            last = self.iteration == cfg.iters
            if cfg.eval_every and (self.iteration % cfg.eval_every == 0 or last):
                row.update({f"eval_{k}": v for k, v in self.evaluate().items()})
                row["wall_s"] = round(self.wall_s(), 3)
            self.rows.append(row)
            if self.is_main:  # rank 0 writes the run's files
                write_metrics(self.path("metrics.jsonl"), self.rows)
            log(summary_line(row, cfg.iters))
            if cfg.plot and self.is_main and ("eval_success_rate" in row or last):
                try:
                    plot_run(
                        self.rows,
                        self.path("curves.png"),
                        title=f"{cfg.env} / {cfg.algo} / seed {cfg.seed}",
                    )
                except ImportError:
                    log("note: matplotlib is not installed; curves.png is not drawn (--no-plot)")
                    cfg.plot = False
            if self.iteration % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
        if cfg.iters == self.iteration:
            self.export_model()
        return self.rows


def _silent(*args, **kwargs) -> None:
    pass
