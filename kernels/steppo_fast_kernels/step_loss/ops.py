"""Launchers, registered ops (namespace ``steppo_fast_triton``) and the backend function of the
fused step policy loss (kernels in ``kernel.py``, ``kernel_traj.py``, ``kernel_finish.py``).

Forward launches (S steps, B trajectories, A action tokens), no host sync, no torch op but
allocations:
- ratio "step"/"token" with agg "step-mean"/"token-mean": 2 launches, the fused kernel over
  the tokens (per-step table) and the one-program finishing kernel (loss, stats, denominator).
- ratio "trajectory" or agg "traj-mean": 3 launches, the trajectory pass
  (``policy_traj_kernel``, O(S) work over ``cu_trajs``) between the two.
Backward: 1 launch, one kernel over the tokens (d logp, and d old_logp / d ref_logp when
asked) that also writes d advantages and d step_weight per step (the trajectory coefficients
are in the forward's table).

Differentiable w.r.t. logp, old_logp, advantages, step_weight and ref_logp (one backward
kernel writes them all). The options travel as one ``StepLossOptions`` (the registered ops take
its scalars in ``StepLossOptions.scalars()`` order, then ``normalizer``). fp64 calls never reach
this backend: steppo_fast._dispatch routes them to the reference.
"""

from __future__ import annotations

import torch
import triton

from steppo_fast._defs import PackedStats, StepLossOptions

from .. import _configs
from . import kernel as _k
from .kernel_finish import policy_finish_kernel
from .kernel_traj import policy_traj_kernel

_NS = "steppo_fast_triton"
_RATIO = {"token": _k.RATIO_TOKEN, "step": _k.RATIO_STEP, "trajectory": _k.RATIO_TRAJ}
_AGG = {"step-mean": _k.AGG_STEP, "token-mean": _k.AGG_TOKEN, "traj-mean": _k.AGG_TRAJ}
_KL = {"k1": _k.KL_K1, "k2": _k.KL_K2, "k3": _k.KL_K3}


# Launch configurations come from _configs: the [BLOCK_S, BLOCK_T] tile of the token kernels
# (per device, by the mean step length and the step count), the trajectory pass's [BLOCK_B,
# BLOCK_K] tile (by the mean steps per trajectory and the trajectory count) and the finishing
# kernel's BLOCK_S, with their num_warps.


def _codes(o: StepLossOptions) -> tuple[int, int, int]:
    """(ratio level, agg, KL kind) as the kernels' constexpr codes (KL_NONE when kl_coef == 0)."""
    kl = _KL[o.kl_type] if o.kl_coef != 0.0 else _k.KL_NONE
    return _RATIO[o.ratio_level], _AGG[o.agg], kl


def policy_loss_forward(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, o):
    """Run the forward kernels. Returns (loss 0-d, stats [6], denominator 0-d,
    table [S, NUM_COLS]), all fp32."""
    logp, old_logp, advantages = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    cu_steps = cu_steps.contiguous()
    device, num_steps = logp.device, advantages.shape[0]
    ratio, agg, kl_type = _codes(o)
    # every column of every row is written by the forward kernel(s)
    table = torch.empty(num_steps, _k.NUM_COLS, dtype=torch.float32, device=device)
    lr_sum = torch.empty(num_steps, dtype=torch.float32, device=device)
    sw = step_weight.contiguous() if step_weight is not None else lr_sum  # placeholder if None
    ref = ref_logp.contiguous() if (ref_logp is not None and kl_type) else logp
    needs_traj = agg == _k.AGG_TRAJ or ratio == _k.RATIO_TRAJ
    dual = o.dual_clip if o.dual_clip is not None else 0.0
    gpu = _configs.gpu_of(device)
    if num_steps > 0:
        tile = _configs.step_loss(gpu, num_steps, logp.shape[0])
        _k.policy_fwd_kernel[(triton.cdiv(num_steps, tile["BLOCK_S"]),)](
            logp,
            old_logp,
            ref,
            advantages,
            sw,
            cu_steps,
            table,
            lr_sum,
            num_steps,
            o.length_power,
            o.clip_low,
            o.clip_high,
            dual,
            o.kl_coef,
            RATIO=ratio,
            AGG=agg,
            KL_TYPE=kl_type,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            **tile.kwargs(),
        )
    if needs_traj and num_steps > 0:
        num_trajs = cu_trajs.shape[0] - 1
        traj_tile = _configs.step_loss_traj(gpu, num_trajs, num_steps)
        policy_traj_kernel[(triton.cdiv(num_trajs, traj_tile["BLOCK_B"]),)](
            advantages,
            sw,
            cu_steps,
            cu_trajs.contiguous(),
            table,
            lr_sum,
            num_trajs,
            o.length_power,
            o.clip_low,
            o.clip_high,
            dual,
            o.kl_coef,
            RATIO=ratio,
            AGG=agg,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            **traj_tile.kwargs(),
        )
    f32 = dict(dtype=torch.float32, device=device)
    loss, stats, denominator = torch.empty((), **f32), torch.empty(6, **f32), torch.empty((), **f32)
    policy_finish_kernel[(1,)](
        table,
        loss,
        stats,
        denominator,
        num_steps,
        o.kl_coef,
        o.normalizer if o.normalizer is not None else 1.0,
        HAS_NORMALIZER=o.normalizer is not None,
        NUM_COLS=_k.NUM_COLS,
        COLS=finish_cols(),
        **_configs.fixed(gpu, "finish").kwargs(),
    )
    return loss, stats, denominator, table


def policy_loss_backward(
    grad, logp, old_logp, advantages, cu_steps, step_weight, ref_logp, fwd, o, need
):
    """(d logp [A], d old_logp, d ref_logp, d advantages [S], d step_weight), fp32.

    ``fwd`` = (loss, denominator, table) from the forward; ``need`` = (need_old, need_ref,
    need_sw): the unneeded gradients are [0]-shaped."""
    loss, denominator, table = fwd
    need_old, need_ref, need_sw = need
    logp, old_logp, advantages = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    device, num_tokens, num_steps = logp.device, logp.shape[0], advantages.shape[0]
    ratio, _, kl_type = _codes(o)
    kl_type = kl_type if ref_logp is not None else _k.KL_NONE
    # The kernel writes every token of every step (cu_steps ends at A) and every step: no
    # memset, except for d ref_logp without a KL term and for an empty batch.
    d_logp = torch.empty(num_tokens, dtype=torch.float32, device=device)
    if num_steps == 0:
        d_logp.zero_()
    d_old = torch.empty_like(d_logp) if need_old else d_logp.new_empty(0)
    if not need_ref:
        d_ref = d_logp.new_empty(0)
    else:  # without a KL term ref_logp does not reach the loss: zero gradient
        d_ref = torch.empty_like(d_logp) if kl_type else torch.zeros_like(d_logp)
    d_adv = torch.empty(num_steps, dtype=torch.float32, device=device)
    d_sw = torch.empty(num_steps if need_sw else 0, dtype=torch.float32, device=device)
    if num_steps > 0:
        ref = ref_logp.contiguous() if kl_type else logp
        sw = step_weight.contiguous() if step_weight is not None else d_logp
        tile = _configs.step_loss(_configs.gpu_of(device), num_steps, num_tokens)
        _k.policy_bwd_kernel[(triton.cdiv(num_steps, tile["BLOCK_S"]),)](
            logp,
            old_logp,
            ref,
            advantages,
            sw,
            cu_steps.contiguous(),
            table,
            grad.reshape(1).contiguous(),
            loss,
            denominator,
            d_logp,
            d_old if need_old else d_logp,
            d_ref if need_ref else d_logp,
            d_adv,
            d_sw if need_sw else d_adv,
            num_steps,
            o.clip_low,
            o.clip_high,
            o.dual_clip if o.dual_clip is not None else 0.0,
            o.kl_coef,
            RATIO=ratio,
            KL_TYPE=kl_type,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NEED_OLD=need_old,
            NEED_REF=need_ref and bool(kl_type),
            NEED_SW=need_sw,
            SW_IN_DENOM=o.normalizer is None,
            NUM_COLS=_k.NUM_COLS,
            **tile.kwargs(),
        )
    return d_logp, d_old, d_ref, d_adv, d_sw


def finish_cols() -> int:
    """Tile width of the finishing kernel: the next power of two >= FINISH_COLS."""
    return triton.next_power_of_2(_k.FINISH_COLS.value)


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
    ratio_level: str,
    length_power: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    kl_coef: float,
    kl_type: str,
    normalizer: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, stats [6], denominator 0-d, per-step table [S, NUM_COLS]), fp32; the scalars
    are a ``StepLossOptions``'s fields in order."""
    o = StepLossOptions(
        ratio_level, length_power, clip_low, clip_high, dual_clip, agg, kl_coef, kl_type, normalizer
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
    ratio_level: str,
    length_power: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    kl_coef: float,
    kl_type: str,
    normalizer: float | None,
    need_old: bool,
    need_ref: bool,
    need_sw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d logp [A], d old_logp [A] or [0], d ref_logp [A] or [0], d advantages [S],
    d step_weight [S] or [0]), fp32."""
    o = StepLossOptions(
        ratio_level, length_power, clip_low, clip_high, dual_clip, agg, kl_coef, kl_type, normalizer
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


_NUM_SCALARS = 9  # the StepLossOptions fields, in order


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
        *([None] * _NUM_SCALARS),
    )


step_policy_loss_op.register_autograd(_backward, setup_context=_setup)


# ---- backend function ----


def step_policy_loss(
    logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, options: StepLossOptions
):
    """Triton backend of :func:`steppo_fast.step_policy_loss` -> (loss, stats), the stats a
    dict of detached fp32 0-d tensors, views of the finishing kernel's [6] output
    (``PackedStats``; no host sync, no stacking launch; the public wrapper converts them)."""
    loss, stats, _, _ = step_policy_loss_op(
        logp,
        old_logp,
        advantages,
        cu_steps,
        cu_trajs,
        step_weight,
        ref_logp if options.kl_coef != 0.0 else None,
        *options.scalars(),
        None if options.normalizer is None else float(options.normalizer),
    )
    return loss, PackedStats(stats.detach())
