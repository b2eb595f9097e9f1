"""The run-directory half of :class:`~.loop.Trainer`: preparing or continuing ``--out``, the
checkpoint (what it holds, writing it, restoring a run from it) and the exported model.

On every number of ranks: rank 0 reads and writes the files, the other ranks load the file rank
0 chose, and a failure on any rank is raised on every rank (:meth:`~.comm.Comm.together`). A
checkpoint holds full tensors in one format (FSDP shards are gathered for it and sliced again
on load), so a run resumes under any number of ranks, sharded or not.
"""

from __future__ import annotations

import os
import random

import torch

from .checkpoint import (
    CHECKPOINT,
    DAMAGED,
    CheckpointError,
    check_compatible,
    has_checkpoint,
    load_states,
    read_run_checkpoint,
    restore_generator,
    write_checkpoint,
)
from .fields import ConfigError
from .runfiles import clean_orphans, read_metrics, replace_dir


class RunState:
    """Run directory, checkpoint and export methods of :class:`~.loop.Trainer` (its base
    class). They use the trainer's ``cfg``, ``comm``, ``is_main``, ``models``, ``sharded``,
    ``optimizer``, ``sample_gen``, ``shuffle_gen``, ``iteration``, ``wall_offset``, ``rows``,
    ``tokenizer``, :meth:`~.loop.Trainer.inference_models` and :meth:`~.loop.Trainer.wall_s`."""

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
        iterations done is an error (config.yaml is then left unchanged).

        Rank 0 prepares the folder (and loads a checkpoint), then the other ranks load the same
        checkpoint; a failure on any rank is raised on every rank (never a hang)."""
        self.comm.together(lambda: self._prepare_folder(log) if self.is_main else None)

        def load() -> None:
            if not self.is_main and self.cfg.resume and has_checkpoint(self.out):
                self.load_checkpoint(warn=lambda m: None)  # the same file rank 0 chose

        self.comm.together(load)

    def _prepare_folder(self, log) -> None:
        """Rank 0's part of :meth:`prepare_run_dir`."""
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
        """Everything a resume needs, as tensors and plain containers (the checkpoint).
        Collective (call on every rank): it gathers every rank's sampling-generator state and,
        under FSDP, the sharded optimizer state (rank 0 keeps it; other ranks get ``None``)."""
        m = self.inference_models()
        gens = self.comm.all_gather_object(
            (self.sample_gen.device.type, self.sample_gen.get_state())
        )
        return {
            "iteration": self.iteration,
            "wall_s": self.wall_s(),
            "policy": m.policy.state_dict(),
            "critic": None if m.critic is None else m.critic.state_dict(),
            "reference": None if m.reference is None else m.reference.state_dict(),
            "optimizer": self.optimizer_state(),
            "sample_gen": self.sample_gen.get_state(),
            "sample_gen_device": self.sample_gen.device.type,
            "sample_gen_ranks": [g for _, g in gens],  # rank r's stream, r < the world saved
            "sample_gen_rank_devices": [d for d, _ in gens],
            "shuffle_gen": self.shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),  # (version, tuple of 625 ints, gauss or None)
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes :meth:`state` (:func:`~.checkpoint.write_checkpoint`); a failed write
        (a full disk) stops every rank."""
        state = self.state()  # every rank: the gathers are collective
        self.comm.together(lambda: write_checkpoint(state, self.out) if self.is_main else None)

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
        # rank r continues its sampling stream when the checkpoint holds one, else (more ranks
        # than saved, or a state of another device type) starts a fresh one per (iteration, rank)
        rank = self.comm.rank
        if "sample_gen_ranks" in state:  # every rank's stream (device types: CPU if unrecorded)
            saved = state["sample_gen_ranks"]
            kinds = state.get("sample_gen_rank_devices") or ["cpu"] * len(saved)
        else:  # a 1-process checkpoint of an earlier version: rank 0's stream alone
            saved, kinds = [state["sample_gen"]], [state.get("sample_gen_device", "cpu")]
        fresh = self.cfg.seed + 1_000_003 * self.iteration + rank
        if rank < len(saved):
            restore_generator(self.sample_gen, saved[rank], kinds[rank], reseed=fresh)
        else:  # more ranks than when saved
            self.sample_gen.manual_seed(fresh)
        self.shuffle_gen.set_state(state["shuffle_gen"])
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.wall_offset = state["wall_s"]
        self.rows = [
            r for r in read_metrics(self.path("metrics.jsonl")) if r["iter"] <= self.iteration
        ]

    def optimizer_state(self) -> dict | None:
        """The optimizer's ``state_dict`` with full tensors (under FSDP gathered from the
        shards: collective, and ``None`` on the ranks > 0, which write nothing)."""
        if self.sharded is None:
            return self.optimizer.state_dict()
        from .fsdp import full_optimizer_state

        return full_optimizer_state(self.optimizer, keep=self.is_main)

    def load_optimizer_state(self, state: dict) -> None:
        """Load an optimizer ``state_dict`` written by :meth:`optimizer_state` (under FSDP each
        rank slices it to its shards)."""
        if self.sharded is None:
            return self.optimizer.load_state_dict(state)
        from .fsdp import load_full_optimizer_state

        load_full_optimizer_state(self.optimizer, state)

    def load_model_states(self, state: dict, path: str = CHECKPOINT) -> None:
        """Load the ``policy`` / ``critic`` / ``reference`` state dicts of a checkpoint (under
        FSDP into the inference copy and this rank's shards)."""
        if self.sharded is None:
            return load_states(self.models, state, path)
        self.sharded.load_full(state, path)

    def export_model(self) -> None:
        """Rank 0 writes the policy in HF format to ``<out>/model`` (load with ``--model
        <out>/model``), through ``model.tmp`` and a swap (:func:`~.runfiles.replace_dir`)."""
        policy = self.inference_models().policy

        def write(tmp: str) -> None:
            policy.save_pretrained(tmp)
            if hasattr(self.tokenizer, "save_pretrained"):  # a model tokenizer travels with it
                self.tokenizer.save_pretrained(tmp)

        # rank 0 writes; a failure there is raised on every rank
        self.comm.together(lambda: replace_dir(self.path("model"), write) if self.is_main else None)
