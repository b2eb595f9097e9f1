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
``(seed, iteration)`` and the run continues with a different, still deterministic, stream.
"""

from __future__ import annotations

import copy
import os
import random
import time

import torch
from tqdm.auto import tqdm

from .. import StepBatch
from ..envs import make_env
from .algorithms import compute_targets
from .checkpoint import (
    CHECKPOINT,
    DAMAGED,
    CheckpointError,
    check_compatible,
    has_checkpoint,
    load_into,
    read_run_checkpoint,
    restore_generator,
    write_checkpoint,
)
from .config import TrainConfig, resolve_device
from .critic_metrics import critic_fields, critic_sums
from .fields import ConfigError
from .memory import compute_dtype, enable_grad_checkpointing
from .plot import plot_run
from .policy import Critic, build_policy, build_tokenizer
from .rollout import rollout
from .rows import episode_stats, mean_ref_kl, summary_line, update_fields
from .runfiles import clean_orphans, read_metrics, replace_dir, write_metrics
from .update import ForwardOut, Models, forward, ppo_update, reference_logprobs
from .warmstart import load_init

EVAL_SEED_BASE = 1 << 40  # held-out task seeds: EVAL_SEED_BASE + k
__all__ = [  # (CHECKPOINT, episode_stats, ... are imported from here by other modules)
    "CHECKPOINT",
    "EVAL_SEED_BASE",
    "Trainer",
    "episode_stats",
    "mean_ref_kl",
    "restore_generator",
    "summary_line",
    "train_seed",
    "update_fields",
]


def train_seed(run_seed: int, iteration: int, group: int, groups: int) -> int:
    """Task seed of ``group`` at ``iteration``: always < 2**40 = ``EVAL_SEED_BASE``, so never a
    held-out seed; each run seed (< 2**16, the range ``--seed`` accepts) owns its own block of
    2**24 task seeds."""
    return (run_seed % (1 << 16)) * (1 << 24) + (iteration * groups + group) % (1 << 24)


class Trainer:
    """Owns the models, optimizer, RNGs and run directory of one training run."""

    is_main = True  # False on the ranks > 0 of a data-parallel run (they write no files, no logs)

    def __init__(self, cfg: TrainConfig, device: torch.device | str | None = None):
        """``device``: where the models run (default: ``cfg.device`` resolved; the data-parallel
        trainer passes its rank's device)."""
        self.cfg = cfg = cfg.resolved()
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
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
        self.optimizer = self.build_optimizer()
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
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
        """The models rollouts, evaluation and export run (``self.models`` in one process; the
        gathered full copies under FSDP sharding)."""
        return self.models

    # ------------------------------------------------------------------ run directory
    @property
    def out(self) -> str:
        return self.cfg.out

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def prepare_run_dir(self, log=print) -> None:
        """Create the run directory, or continue the run in it; never overwrite a run silently.

        Leftovers of a crash (temporary files, an interrupted model export) are cleaned first.
        ``--resume`` loads the newest good checkpoint (``checkpoint.prev.pt`` when
        ``checkpoint.pt`` is damaged; the damaged file is then renamed
        ``checkpoint.damaged.pt``, kept for inspection and out of the rotation); a run
        stopped before its first checkpoint starts again from iteration 0, with or without
        ``--resume``. A folder with a checkpoint needs ``--resume``; ``--iters`` below the
        iterations done is an error (config.yaml is then left unchanged)."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out: {self.out} is a file, not a run directory")
        for name in clean_orphans(self.out):
            log(f"note: removed {name} left by an interrupted run in {self.out}")
        started = any(
            os.path.exists(self.path(n)) for n in ("config.yaml", "metrics.jsonl", "model")
        )
        if has_checkpoint(self.out):
            if not self.cfg.resume:
                raise ValueError(
                    f"--out: {self.out} already holds a run; pass --resume or another --out"
                )
            used = self.load_checkpoint(warn=lambda m: log(f"warning: {m}"), training=True)
            if used != self.path(CHECKPOINT) and os.path.exists(self.path(CHECKPOINT)):
                # set aside, so the next checkpoint does not rotate it over the good one
                os.replace(self.path(CHECKPOINT), self.path(DAMAGED))
                log(f"note: the damaged checkpoint is kept as {self.path(DAMAGED)}")
        elif self.cfg.resume and not started:
            raise ValueError(f"--resume: no checkpoint at {self.path(CHECKPOINT)}")
        elif started:
            log(
                f"note: {self.out} holds a run stopped before its first checkpoint; "
                "starting it again from iteration 0"
            )
        os.makedirs(self.out, exist_ok=True)
        self.cfg.save_yaml(self.path("config.yaml"))

    def state(self) -> dict:
        """Everything a resume needs, as tensors and plain containers (the checkpoint)."""
        m = self.inference_models()
        return {
            "iteration": self.iteration,
            "wall_s": self.wall_s(),
            "policy": m.policy.state_dict(),
            "critic": None if m.critic is None else m.critic.state_dict(),
            "reference": None if m.reference is None else m.reference.state_dict(),
            "optimizer": self.optimizer_state(),
            "sample_gen": self.sample_gen.get_state(),
            "sample_gen_device": self.sample_gen.device.type,
            "shuffle_gen": self.shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),  # (version, tuple of 625 ints, gauss or None)
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> None:
        write_checkpoint(self.state(), self.out)

    def load_checkpoint(self, path: str | None = None, warn=None, training: bool = False) -> str:
        """Restore the run's newest good checkpoint (see :mod:`.checkpoint`), checked against
        this run's models. ``path``: the run directory's checkpoint file or the directory
        (default: this run's). ``training``: the run continues, so ``cfg.iters`` must be at
        least the iterations done. Returns the file used."""
        run_dir = (
            self.out
            if path is None
            else (path if os.path.isdir(path) else os.path.dirname(path) or ".")
        )
        state, used = read_run_checkpoint(run_dir, warn)
        check_compatible(state, self.cfg.to_dict(), used)
        done = state["iteration"]
        if training and self.cfg.iters < done:
            raise ConfigError(
                f"--iters: {self.cfg.iters} is fewer than the {done} iterations {run_dir} has "
                f"done; give --iters {done} or more (the run is left unchanged)"
            )
        self.restore(state, used)
        return used

    def restore(self, state: dict, path: str) -> None:
        """Load a verified checkpoint ``state`` (read from ``path``) into this trainer."""
        self.load_model_states(state, path)
        try:
            self.load_optimizer_state(state["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from None
        self.iteration = state["iteration"]
        restore_generator(
            self.sample_gen,
            state["sample_gen"],
            state.get("sample_gen_device", "cpu"),
            reseed=self.cfg.seed + 1_000_003 * self.iteration,
        )
        self.shuffle_gen.set_state(state["shuffle_gen"])
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.wall_offset = state["wall_s"]
        self.rows = [
            r for r in read_metrics(self.path("metrics.jsonl")) if r["iter"] <= self.iteration
        ]

    def optimizer_state(self) -> dict:
        """The optimizer's ``state_dict`` in the single-process format (full tensors)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        """Load an optimizer ``state_dict`` written by :meth:`optimizer_state`."""
        self.optimizer.load_state_dict(state)

    def load_model_states(self, state: dict, path: str = CHECKPOINT) -> None:
        """Load the ``policy`` / ``critic`` / ``reference`` state dicts of a checkpoint."""
        load_states(self.models, state, path)

    def export_model(self) -> None:
        """Write the policy in HF format to ``<out>/model`` (load with ``--model <out>/model``),
        through ``model.tmp`` and a swap (:func:`~.runfiles.replace_dir`)."""
        policy = self.inference_models().policy

        def write(tmp: str) -> None:
            policy.save_pretrained(tmp)
            if hasattr(self.tokenizer, "save_pretrained"):  # a model tokenizer travels with it
                self.tokenizer.save_pretrained(tmp)

        replace_dir(self.path("model"), write)

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
        """One iteration: rollout, targets, update. Returns its metrics row."""
        cfg, models, it = self.cfg, self.models, self.iteration
        t0 = time.perf_counter()
        seeds = [
            train_seed(cfg.seed, it, g, cfg.groups)
            for g in range(cfg.groups)
            for _ in range(cfg.group_size)
        ]
        groups = [g for g in range(cfg.groups) for _ in range(cfg.group_size)]
        res = self.collect(
            seeds, groups, greedy=False, generator=self.sample_gen, desc=f"rollout {it + 1}"
        )
        t1 = time.perf_counter()
        batch = StepBatch.from_trajectories(res.trajectories, layout=cfg.layout, device=self.device)
        out, ref_logp = self.score(batch, res.masks)
        old_logp = out.logp
        targets = compute_targets(cfg, batch, out.values)
        n_steps = cfg.epochs * max(1, min(cfg.minibatches, batch.num_trajs))
        with self._bar(n_steps, f"update {it + 1}", unit="step") as bar:
            stats = ppo_update(
                cfg,
                models,
                self.optimizer,
                batch,
                res.masks,
                targets,
                old_logp,
                ref_logp,
                self.shuffle_gen,
                on_step=bar.update,
                train_policy=it >= cfg.critic_warmup,
            )
        t2 = time.perf_counter()
        self.iteration += 1
        row = {"iter": self.iteration, **episode_stats(res.trajectories)}
        if targets.returns is not None:
            sums = critic_sums(targets.returns, targets.old_values, targets.raw_advantages)
            row.update(critic_fields(sums))
        row.update(
            tokens=batch.num_tokens,
            action_tokens=batch.num_actions,
            sequences=batch.num_seqs,
            **update_fields(stats, self.wall_s(), t0, t1, t2),
            ref_kl=None if ref_logp is None else mean_ref_kl(old_logp, ref_logp),
            logp_diff=float((batch.rollout_logp - old_logp).abs().max())
            if batch.num_actions
            else 0.0,
        )
        return row

    # ------------------------------------------------------------------ whole run
    def train(self, log=print) -> list[dict]:
        """Run up to ``cfg.iters`` iterations (continuing after a resume). Returns the rows."""
        cfg = self.cfg
        if not self.is_main:
            log = _silent
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
            if self.is_main:
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


def load_states(models: Models, state: dict, path: str = CHECKPOINT) -> None:
    """Load a checkpoint's ``policy`` / ``critic`` / ``reference`` state dicts into ``models``
    (a mismatch is a ``CheckpointError`` naming ``path``)."""
    load_into(models.policy, state.get("policy"), path, "policy")
    if models.critic is not None:
        load_into(models.critic, state.get("critic"), path, "critic")
    if models.reference is not None:
        load_into(models.reference, state.get("reference"), path, "reference")


def _silent(*args, **kwargs) -> None:
    pass
