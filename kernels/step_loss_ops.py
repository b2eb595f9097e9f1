"""Registered ops (namespace ``steppo_fast_triton``) and the backend function of the fused
step policy loss (kernels in ``step_loss.py``, launchers in ``step_loss_launch.py``).

Differentiable w.r.t. logp, old_logp, advantages, step_weight and ref_logp (one backward
kernel writes them all). fp64 inputs go to the torch reference (gradcheck path).
"""

from __future__ import annotations

import dataclasses

import torch

from steppo_fast.reference.loss import PackedStats

from . import step_loss as _k
from .step_loss_launch import LossOptions, policy_loss_backward, policy_loss_forward

_NS = "steppo_fast_triton"
_RATIO = {"token": _k.RATIO_TOKEN, "step": _k.RATIO_STEP, "trajectory": _k.RATIO_TRAJ}
_AGG = {"step-mean": _k.AGG_STEP, "token-mean": _k.AGG_TOKEN, "traj-mean": _k.AGG_TRAJ}
_KL = {"k1": _k.KL_K1, "k2": _k.KL_K2, "k3": _k.KL_K3}


# ---- registered ops ----


@torch.library.custom_op(f"{_NS}::step_policy_loss", mutates_args=())
def step_policy_loss_op(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_steps: torch.Tensor,
    cu_trajs: torch.Tensor | None,
    step_weight: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    ratio_level: int,
    agg: int,
    kl_type: int,
    length_power: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    normalizer: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, stats [6], denominator 0-d, per-step table [S, NUM_COLS]), fp32."""
    o = LossOptions(
        ratio_level, agg, kl_type, length_power, clip_low, clip_high, dual_clip, kl_coef, normalizer
    )
    return policy_loss_forward(
        logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, o
    )


@step_policy_loss_op.register_fake
def _(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, *options):
    f32 = dict(dtype=torch.float32, device=logp.device)
    return (
        torch.empty((), **f32),
        torch.empty(6, **f32),
        torch.empty((), **f32),
        torch.empty(advantages.shape[0], _k.NUM_COLS, **f32),
    )


@torch.library.custom_op(f"{_NS}::step_policy_loss_backward", mutates_args=())
def step_policy_loss_backward_op(
    grad: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_steps: torch.Tensor,
    step_weight: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    loss: torch.Tensor,
    denominator: torch.Tensor,
    table: torch.Tensor,
    ratio_level: int,
    agg: int,
    kl_type: int,
    length_power: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    normalizer: float | None,
    need_old: bool,
    need_ref: bool,
    need_sw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d logp [A], d old_logp [A] or [0], d ref_logp [A] or [0], d advantages [S],
    d step_weight [S] or [0]), fp32."""
    o = LossOptions(
        ratio_level, agg, kl_type, length_power, clip_low, clip_high, dual_clip, kl_coef, normalizer
    )
    inputs = (logp, old_logp, advantages, cu_steps, step_weight, ref_logp)
    fwd = (loss, denominator, table)
    return policy_loss_backward(grad, *inputs, fwd, o, (need_old, need_ref, need_sw))


@step_policy_loss_backward_op.register_fake
def _(grad, logp, old_logp, advantages, cu_steps, step_weight, ref_logp, *rest):
    need_old, need_ref, need_sw = rest[-3:]
    f32 = dict(dtype=torch.float32, device=logp.device)
    num_tokens, num_steps = logp.shape[0], advantages.shape[0]
    return (
        torch.empty(num_tokens, **f32),
        torch.empty(num_tokens if need_old else 0, **f32),
        torch.empty(num_tokens if need_ref else 0, **f32),
        torch.empty(num_steps, **f32),
        torch.empty(num_steps if need_sw else 0, **f32),
    )


_OPTION_NAMES = [f.name for f in dataclasses.fields(LossOptions)]


def _setup(ctx, inputs, output):
    logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, *options = inputs
    loss, _, denominator, table = output
    ctx.options = options
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs[:7])
    ctx.save_for_backward(
        logp, old_logp, advantages, cu_steps, step_weight, ref_logp, loss, denominator, table
    )


def _backward(ctx, grad_loss, grad_stats, grad_denominator, grad_table):
    need = ctx.needs_input_grad
    need_old, need_sw, need_ref = bool(need[1]), bool(need[5]), bool(need[6])
    # saved: the op's inputs, then (loss, denominator, table), in the backward op's order
    saved = ctx.saved_tensors
    grads = step_policy_loss_backward_op(
        grad_loss, *saved, *ctx.options, need_old, need_ref, need_sw
    )
    # input order: logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp
    d_logp, d_old, d_ref, d_adv, d_sw = grads
    per_input = (d_logp, d_old, d_adv, None, None, d_sw, d_ref)
    return (
        *(
            g.to(dtype) if (g is not None and needed) else None
            for g, dtype, needed in zip(per_input, ctx.dtypes, need[:7])
        ),
        *([None] * len(_OPTION_NAMES)),
    )


step_policy_loss_op.register_autograd(_backward, setup_context=_setup)


# ---- backend function (reference signature) ----


def step_policy_loss(
    logp,
    old_logp,
    advantages,
    cu_steps,
    *,
    cu_trajs=None,
    ratio_level="step",
    length_power=1.0,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="step-mean",
    step_weight=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_type="k3",
    normalizer=None,
):
    """Triton backend of :func:`steppo_fast.step_policy_loss` -> (loss, stats), the stats a
    dict of detached fp32 0-d tensors, views of the finishing kernel's [6] output
    (``PackedStats``; no host sync, no stacking launch; the public wrapper converts them).

    fp64 inputs run the torch reference."""
    tensors = (logp, old_logp, advantages, step_weight, ref_logp)
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        from steppo_fast.reference import step_policy_loss as ref

        return ref(
            logp,
            old_logp,
            advantages,
            cu_steps,
            cu_trajs=cu_trajs,
            ratio_level=ratio_level,
            length_power=length_power,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            agg=agg,
            step_weight=step_weight,
            ref_logp=ref_logp,
            kl_coef=kl_coef,
            kl_type=kl_type,
            normalizer=normalizer,
        )
    o = LossOptions(
        ratio_level=_RATIO[ratio_level],
        agg=_AGG[agg],
        kl_type=_KL[kl_type] if kl_coef != 0.0 else _k.KL_NONE,
        length_power=float(length_power),
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        kl_coef=float(kl_coef),
        normalizer=None if normalizer is None else float(normalizer),
    )
    loss, stats, _, _ = step_policy_loss_op(
        logp,
        old_logp,
        advantages,
        cu_steps,
        cu_trajs,
        step_weight,
        ref_logp if o.kl_type != _k.KL_NONE else None,
        **dataclasses.asdict(o),
    )
    return loss, PackedStats(stats.detach())
