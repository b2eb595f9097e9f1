"""Shared set-up of the trainer tests: the smallest useful run configuration, a tiny policy and
a seeded rollout.

Each test module registers its own one-door environment name (``register(name, ...)``) so
modules stay independent, and passes it as ``env``."""

from __future__ import annotations

import torch

from steppo_fast.envs import DoorsEnv, make_env, register
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.policy import build_policy
from steppo_fast.trainer.rollout import rollout


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


def play(policy, tok, env="doors", n=6, grammar=True, seed=0, **rollout_kw):
    """``n`` episodes of ``env`` (task seeds 100.., two per group) sampled with a generator
    seeded ``seed``; ``rollout_kw`` go to :func:`~steppo_fast.trainer.rollout.rollout`."""
    return rollout(
        policy,
        tok,
        lambda: make_env(env),
        list(range(100, 100 + n)),
        [i // 2 for i in range(n)],
        use_grammar=grammar,
        generator=torch.Generator().manual_seed(seed),
        **rollout_kw,
    )
