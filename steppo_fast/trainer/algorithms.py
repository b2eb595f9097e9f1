"""Advantages and loss settings of each algorithm, computed with the package's ops.

Every algorithm produces advantages on a *unit axis*: steps (``steppo``, ``grpo``, ``gigpo``,
``gspo``) or action tokens (``ppo``). Token-level PPO is expressed with the same
``step_policy_loss`` by making every action token its own step: ``cu_units = arange(A + 1)``,
``ratio_level="token"``, ``agg="token-mean"`` and per-token advantages.

- ``steppo``: ``A, R = step_gae(r_s, V(value_index), cu_trajs)``, ``A = whiten(A)`` over steps
  (over the steps of every rank: :meth:`~.comm.Comm.whiten`).
- ``ppo``: token rewards (the step's reward on its last token, 0 elsewhere), token values
  V(logit_index) (the state before each action token), ``step_gae`` over the action axis with
  trajectory offsets ``cu_steps[cu_trajs]``, whitened over tokens.
- ``grpo`` / ``gspo``: ``group_advantages(sum_t r_t, group)`` broadcast to the steps.
- ``gigpo``: ``gigpo_advantages(r_s, cu_trajs, group, anchor, gamma=gamma)``.

Episodes cut at the step limit bootstrap with 0: in the built-in tasks nothing can follow the
limit, so 0 is the exact value of the state after it (``StepBatch.terminated`` still records the
truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import discounted_returns, gigpo_advantages, group_advantages, step_gae
from .comm import LOCAL, Comm
from .config import TrainConfig


@dataclass
class Targets:
    """Per-unit training targets of one batch (unit = step, or action token for ``ppo``)."""

    advantages: torch.Tensor  # [U] fp32
    returns: torch.Tensor | None  # [U] critic targets (critic algorithms)
    old_values: torch.Tensor | None  # [U] critic values at rollout time
    token_units: bool  # True: units are action tokens (ppo)
    raw_advantages: torch.Tensor | None = None  # [U] before whitening (critic algorithms)


def token_rewards(batch) -> torch.Tensor:
    """[A] the step reward on each step's last action token, 0 elsewhere."""
    out = torch.zeros(batch.num_actions, dtype=torch.float32, device=batch.device)
    if batch.num_steps:
        out[batch.cu_steps[1:].long() - 1] = batch.rewards.float()
    return out


def compute_targets(
    cfg: TrainConfig, batch, values: torch.Tensor | None, comm: Comm = LOCAL
) -> Targets:
    """Advantages (and critic targets) for ``batch``, this rank's part of the run's batch.

    ``values``: critic values, [S] at ``value_index`` (steppo) or [A] at ``logit_index`` (ppo);
    ``None`` for critic-free algorithms. ``comm``: the critic algorithms whiten over every
    rank's units (:meth:`~.comm.Comm.whiten`; the ``whiten`` op on one process); GAE runs per
    trajectory and the group algorithms per group, both local to a rank."""
    algo, impl = cfg.algo, cfg.impl
    if algo == "steppo":
        adv, ret = step_gae(
            batch.rewards, values, batch.cu_trajs, gamma=cfg.gamma, lam=cfg.lam, impl=impl
        )
        return Targets(comm.whiten(adv, impl), ret, values, token_units=False, raw_advantages=adv)
    if algo == "ppo":
        adv, ret = step_gae(
            token_rewards(batch),
            values,
            batch.token_traj_offsets,
            gamma=cfg.gamma,
            lam=cfg.lam,
            impl=impl,
        )
        return Targets(comm.whiten(adv, impl), ret, values, token_units=True, raw_advantages=adv)
    if algo in ("grpo", "gspo"):
        scores = discounted_returns(batch.rewards, batch.cu_trajs, gamma=cfg.gamma, impl=impl)
        first = batch.cu_trajs[:-1].long()
        traj_adv = group_advantages(scores[first], batch.group, mode="grpo", impl=impl)
        return Targets(traj_adv[batch.step_traj], None, None, token_units=False)
    if algo == "gigpo":
        adv = gigpo_advantages(
            batch.rewards, batch.cu_trajs, batch.group, batch.anchor, gamma=cfg.gamma, impl=impl
        )
        return Targets(adv, None, None, token_units=False)
    raise ValueError(f"algo: {algo!r} is unknown")


def unit_offsets(batch, token_units: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_units, cu_trajs_units)`` for ``step_policy_loss``: the batch's own offsets, or
    one unit per action token with trajectory offsets on the action axis."""
    if not token_units:
        return batch.cu_steps, batch.cu_trajs
    cu = torch.arange(batch.num_actions + 1, dtype=torch.int32, device=batch.device)
    return cu, batch.token_traj_offsets
