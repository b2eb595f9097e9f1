"""StepPO for verl 0.9: registers steppo_fast's step-level loss and advantage with verl.

Importing this module (it imports verl; ``import steppo_fast`` alone never does) registers, in
verl's own registries:

- policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode``, resolved by
  ``verl.trainer.ppo.core_algos.get_policy_loss_fn``):

  - ``"steppo"``: StepPO's clipped loss with one length-normalised (GSPO-style) importance
    ratio per step, ``rho_s = exp(mean_{i in s}(logp_i - old_logp_i))``, PPO-clipped with the
    actor's ``clip_ratio_low`` / ``clip_ratio_high`` (``clip_ratio`` when unset);
  - ``"steppo_dual_clip"``: the same plus the dual clip ``L_s <= -clip_ratio_c * A_s`` for
    A_s < 0 (verl's ``gspo`` ignores ``clip_ratio_c``; StepPO's scripts set it to 10).

- advantage estimators (``algorithm.adv_estimator``, resolved by ``get_adv_estimator_fn``):

  - ``"steppo"``: step GAE with the critic's value at the token before each step, whitened over
    steps. verl 0.9's ``compute_advantage`` hands critic values only to its built-in ``"gae"``,
    so this estimator needs ``values=`` (and optionally ``traj_uid=`` / ``step_idx=``): from
    stock verl's trainers by loading :mod:`.verl_critic` (which also trains the critic at
    step boundaries), or from your own trainer via :func:`apply_steppo_advantage`;
  - ``"steppo_mc"``: the critic-free variant (V = 0: the advantage is the discounted step
    return-to-go, whitened over steps); works from stock verl's ``compute_advantage``.

Steps are the runs of ``response_mask == 1`` in each row (see :mod:`._verl_rows`): one per row
in the StepPO / verl-agent rows layout, one per assistant turn in verl's multi-turn
``ToolAgentLoop`` rows (observation tokens are 0). The loss honours verl's ``loss_agg_mode``
and the global normalisers verl puts in ``config.global_batch_info`` (``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``), so micro-batch and rank
losses sum to the mini-batch loss exactly as verl's own losses do (see
:func:`._verl_rows.verl_loss_aggregation`). With one step per row and
``seq-mean-token-mean`` the ``"steppo"`` loss equals verl's ``"gspo"`` loss, gradients included
(up to the ratio clamp: StepPO clamps the log-ratio to [-20, 20], verl's gspo to <= 10).

Load it in every verl process (driver and Ray workers): ``VERL_USE_EXTERNAL_MODULES=
steppo_fast.integrations.verl`` (verl imports it on ``import verl``), or
``actor_rollout_ref.model.external_lib=steppo_fast.integrations.verl``. See docs/verl.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from ..ops.loss import step_policy_loss
from ..ops.segments import segment_mean
from ._verl_advantage import step_advantages
from ._verl_rows import steps_from_response_mask, verl_loss_aggregation

__all__ = [
    "apply_steppo_advantage",
    "compute_policy_loss_steppo",
    "compute_policy_loss_steppo_dual_clip",
    "compute_steppo_advantage",
    "compute_steppo_mc_advantage",
    "make_policy_loss",
]


def _clip_ratios(config) -> tuple[float, float]:
    """(clip_low, clip_high) from a verl ActorConfig / DictConfig, as verl's gspo reads them."""
    clip = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
    return float(clip if low is None else low), float(clip if high is None else high)


def make_policy_loss(
    *, length_power: float = 1.0, dual_clip: bool = False, impl: str = "auto"
) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """A verl ``PolicyLossFn`` computing ``steppo_fast.step_policy_loss`` on verl's rows.

    Args:
        length_power: step ratio l_s = sum_i (logp_i - old_i) / n_s ** length_power
            (1 = mean, GSPO-style; 0.5 = sqrt normalisation).
        dual_clip: use the actor's ``clip_ratio_c`` as the dual clip for negative advantages.
        impl: steppo_fast backend ("auto", "torch", "triton", "cpp").

    Register your own variant with ``register_policy_loss("name")(make_policy_loss(...))``.
    """

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "seq-mean-token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """verl policy loss: tensors [R, L] (R rows, L response tokens) -> (loss, metrics).

        The step advantage is the mean of ``advantages`` over the step's tokens (the value
        itself when constant per step, as every step-level or outcome estimator produces);
        ``rollout_is_weights`` [R, L] scale each step by their mean over its tokens, which is
        exact for the loss value since L_s is the same on all the step's tokens.
        """
        if config is None:
            raise ValueError(
                "config: the actor config (clip ratios, global_batch_info) is required"
            )
        shape = tuple(response_mask.shape)
        for name, t in (
            ("old_log_prob", old_log_prob),
            ("log_prob", log_prob),
            ("advantages", advantages),
            ("rollout_is_weights", rollout_is_weights),
        ):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != response_mask {shape}")
        steps = steps_from_response_mask(response_mask)
        info = config.get("global_batch_info", None) or {}
        agg, step_weight, normalizer = verl_loss_aggregation(
            loss_agg_mode,
            steps,
            dp_size=info.get("dp_size", 1),
            batch_num_tokens=info.get("batch_num_tokens", None),
            global_batch_size=info.get("global_batch_size", None),
            loss_scale_factor=info.get("loss_scale_factor", None),
        )
        dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
        if step_weight is not None:
            step_weight = step_weight.to(dtype)
        if rollout_is_weights is not None:
            is_weight = segment_mean(steps.gather(rollout_is_weights.detach()), steps.cu_steps)
            step_weight = is_weight if step_weight is None else step_weight * is_weight.to(dtype)
        clip_low, clip_high = _clip_ratios(config)
        loss, stats = step_policy_loss(
            steps.gather(log_prob),
            steps.gather(old_log_prob).detach(),
            segment_mean(steps.gather(advantages).detach(), steps.cu_steps),
            steps.cu_steps,
            length_power=length_power,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=float(config.get("clip_ratio_c", 3.0)) if dual_clip else None,
            agg=agg,
            step_weight=step_weight,
            normalizer=normalizer,
            impl=impl,
        )
        metrics = {
            "actor/pg_clipfrac": stats["clip_frac"],
            "actor/ppo_kl": stats["approx_kl"],
            "actor/pg_clipfrac_lower": stats["dual_clip_frac"],
            "actor/steppo_ratio_mean": stats["ratio_mean"],
            "actor/steppo_ratio_min": stats["ratio_min"],
            "actor/steppo_ratio_max": stats["ratio_max"],
            "actor/steppo_num_steps": float(steps.num_steps),
        }
        return loss, metrics

    return policy_loss


compute_policy_loss_steppo = register_policy_loss("steppo")(make_policy_loss())
compute_policy_loss_steppo_dual_clip = register_policy_loss("steppo_dual_clip")(
    make_policy_loss(dual_clip=True)
)

_NO_VALUES = (
    "values: StepPO's step GAE needs the critic's values [R, L], but none were given. verl 0.9's "
    "compute_advantage passes values only to its built-in 'gae' estimator: load "
    "steppo_fast.integrations.verl_critic (VERL_USE_EXTERNAL_MODULES; it routes steppo to the "
    "critic's values), call steppo_fast.integrations.verl.apply_steppo_advantage(data) in your "
    "trainer, pass values= yourself, or use algorithm.adv_estimator=steppo_mc (critic-free)"
)


def _discount(name: str, explicit, config) -> float:
    if explicit is not None:
        return float(explicit)
    return float(config.get(name, 1.0)) if config is not None else 1.0


def compute_steppo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    index=None,
    *,
    values: torch.Tensor | None = None,
    traj_uid=None,
    step_idx=None,
    reward_baselines: torch.Tensor | None = None,
    gamma: float | None = None,
    lam: float | None = None,
    whiten: bool = True,
    batch=None,
    non_tensor_batch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"steppo"``: step GAE on verl rows -> (advantages, returns) [R, L].

    Args:
        token_level_rewards, response_mask: verl's [R, L] tensors.
        config: verl ``AlgoConfig`` (``gamma``, ``lam`` are read from it unless given).
        index: verl's prompt ``uid`` per row (unused: StepPO needs no group baseline).
        values: [R, L] critic values (required; see :data:`_NO_VALUES`).
        traj_uid, step_idx: per-row trajectory ids / step indices (verl-agent's
            ``non_tensor_batch["traj_uid"]`` / ``["step_idx"]``); None: each row is a trajectory.
        reward_baselines: not supported (a ``ValueError`` when given, never silently ignored).
        gamma, lam: override the config's discount / GAE lambda.
        whiten: whiten advantages over steps.
        batch, non_tensor_batch: a ``DataProto``'s ``batch`` / ``non_tensor_batch``, as verl
            hands them to an estimator that accepts them (verl PR #7473; 0.9.1 does so only for
            ``gdpo``): ``values`` is then read from ``batch["values"]`` and ``traj_uid`` /
            ``step_idx`` from ``non_tensor_batch`` unless given explicitly.
    """
    if values is None and batch is not None and "values" in batch.keys():
        values = batch["values"]
    if non_tensor_batch is not None and traj_uid is None and "traj_uid" in non_tensor_batch:
        traj_uid = non_tensor_batch["traj_uid"]
        if step_idx is None:
            step_idx = non_tensor_batch.get("step_idx", None)
    if values is None:
        raise ValueError(_NO_VALUES)
    if reward_baselines is not None:
        raise ValueError("reward_baselines: not supported by the steppo estimator")
    return step_advantages(
        token_level_rewards,
        values,
        response_mask,
        traj_uid=traj_uid,
        step_idx=step_idx,
        gamma=_discount("gamma", gamma, config),
        lam=_discount("lam", lam, config),
        whiten=whiten,
    )


def compute_steppo_mc_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    index=None,
    *,
    traj_uid=None,
    step_idx=None,
    reward_baselines: torch.Tensor | None = None,
    gamma: float | None = None,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"steppo_mc"``: critic-free StepPO advantage (V = 0).

    A_s = sum_{k >= s} gamma^(k-s) r_k over the steps of the trajectory, whitened over steps;
    returns are the unwhitened A_s. Arguments as :func:`compute_steppo_advantage`.
    """
    if reward_baselines is not None:
        raise ValueError("reward_baselines: not supported by the steppo_mc estimator")
    return step_advantages(
        token_level_rewards,
        None,
        response_mask,
        traj_uid=traj_uid,
        step_idx=step_idx,
        gamma=_discount("gamma", gamma, config),
        whiten=whiten,
    )


register_adv_est("steppo")(compute_steppo_advantage)
register_adv_est("steppo_mc")(compute_steppo_mc_advantage)


def apply_steppo_advantage(
    data,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    use_critic: bool = True,
    traj_key: str = "traj_uid",
    step_key: str = "step_idx",
    whiten: bool = True,
):
    """Write StepPO advantages and returns into a verl ``DataProto`` (in place; returns it).

    Reads ``data.batch["token_level_rewards"]``, ``["response_mask"]``, ``["values"]`` (when
    ``use_critic``) and, when present, ``data.non_tensor_batch[traj_key]`` /
    ``[step_key]`` (rows layout: one row per step, rows of a trajectory share ``traj_key``);
    writes ``data.batch["advantages"]`` and ``["returns"]`` [R, L].
    """
    batch, extra = data.batch, data.non_tensor_batch
    for key in ("token_level_rewards", "response_mask") + (("values",) if use_critic else ()):
        if key not in batch.keys():
            raise ValueError(f"data.batch[{key!r}]: missing (needed by the StepPO advantage)")
    traj_uid = extra.get(traj_key, None)
    step_idx = extra.get(step_key, None) if traj_uid is not None else None
    if traj_uid is None and step_key in extra:
        raise ValueError(f"data.non_tensor_batch[{step_key!r}]: given without {traj_key!r}")
    advantages, returns = step_advantages(
        batch["token_level_rewards"],
        batch["values"] if use_critic else None,
        batch["response_mask"],
        traj_uid=traj_uid,
        step_idx=step_idx,
        gamma=gamma,
        lam=lam,
        whiten=whiten,
    )
    batch["advantages"] = advantages
    batch["returns"] = returns
    return data
