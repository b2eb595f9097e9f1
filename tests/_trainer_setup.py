"""Shared set-up of the trainer tests: the smallest useful run configuration and a tiny policy.

Each test module registers its own one-door environment name (``register(name, ...)``) so
modules stay independent, and passes it as ``env``."""

from __future__ import annotations

import torch

from steppo_fast.envs import DoorsEnv, register
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.policy import build_policy


def register_one_door(name: str) -> str:
    """Register a one-door corridor (random success ~23%: a few episodes already carry a
    learning signal) under ``name``; returns ``name``."""
    register(name, lambda: DoorsEnv(n_doors=1, max_steps=3))
    return name


def small_cfg(tmp_path, env: str, **kw) -> TrainConfig:
    """A 2-iteration run of 4 groups x 4 episodes with a 32-wide model, checkpointing every
    iteration, writing to ``tmp_path/run`` (``tmp_path=None``: ``kw`` must give ``out``)."""
    base = dict(
        out=None if tmp_path is None else str(tmp_path / "run"),
        env=env,
        iters=2,
        groups=4,
        group_size=4,
        hidden_size=32,
        num_heads=2,
        eval_every=0,
        plot=False,
        progress=False,
        checkpoint_every=1,
        micro_batch_tokens=512,
    )
    base.update(kw)
    return TrainConfig(**base)


def tiny_policy(tok):
    """The 32-wide policy of ``small_cfg`` (seeded), in eval mode."""
    torch.manual_seed(3)
    return build_policy(TrainConfig(hidden_size=32, num_heads=2).resolved(), tok).eval()
