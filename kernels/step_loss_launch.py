"""Launchers of the fused step policy loss kernels (``step_loss.py``, ``step_loss_traj.py``,
``step_loss_finish.py``): grids, placeholders, outputs.

Forward launches (S steps, B trajectories, A action tokens), no host sync, no torch op but
allocations:
- ratio "step"/"token" with agg "step-mean"/"token-mean": 2 launches, the fused kernel over
  the tokens (per-step table) and the one-program finishing kernel (loss, stats, denominator).
- ratio "trajectory" or agg "traj-mean": 3 launches, the trajectory pass
  (``_policy_traj_kernel``, O(S) work over ``cu_trajs``) between the two.
Backward: 1 launch, one kernel over the tokens (d logp, and d old_logp / d ref_logp when
asked) that also writes d advantages and d step_weight per step (the trajectory coefficients
are in the forward's table).
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from . import _configs
from . import step_loss as _k
from .step_loss_finish import _policy_finish_kernel, finish_cols
from .step_loss_traj import _policy_traj_kernel

# Launch configurations come from _configs: the [BLOCK_S, BLOCK_T] tile of the token kernels
# (per device, by the mean step length and the step count), the trajectory pass's [BLOCK_B,
# BLOCK_K] tile (by the mean steps per trajectory and the trajectory count) and the finishing
# kernel's BLOCK_S, with their num_warps.


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Scalar options of the loss, encoded for the registered op (ints for the choices)."""

    ratio_level: int  # _k.RATIO_*
    agg: int  # _k.AGG_*
    kl_type: int  # _k.KL_* (KL_NONE when kl_coef == 0)
    length_power: float
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    normalizer: float | None


def policy_loss_forward(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, o):
    """Run the forward kernels. Returns (loss 0-d, stats [6], denominator 0-d,
    table [S, NUM_COLS]), all fp32."""
    logp, old_logp, advantages = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    cu_steps = cu_steps.contiguous()
    device, num_steps = logp.device, advantages.shape[0]
    # every column of every row is written by the forward kernel(s)
    table = torch.empty(num_steps, _k.NUM_COLS, dtype=torch.float32, device=device)
    lr_sum = torch.empty(num_steps, dtype=torch.float32, device=device)
    sw = step_weight.contiguous() if step_weight is not None else lr_sum  # placeholder if None
    ref = ref_logp.contiguous() if (ref_logp is not None and o.kl_type) else logp
    needs_traj = o.agg == _k.AGG_TRAJ or o.ratio_level == _k.RATIO_TRAJ
    dual = o.dual_clip if o.dual_clip is not None else 0.0
    gpu = _configs.gpu_of(device)
    if num_steps > 0:
        tile = _configs.step_loss(gpu, num_steps, logp.shape[0])
        _k._policy_fwd_kernel[(triton.cdiv(num_steps, tile["BLOCK_S"]),)](
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
            RATIO=o.ratio_level,
            AGG=o.agg,
            KL_TYPE=o.kl_type,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            **tile.kwargs(),
        )
    if needs_traj and num_steps > 0:
        num_trajs = cu_trajs.shape[0] - 1
        traj_tile = _configs.step_loss_traj(gpu, num_trajs, num_steps)
        _policy_traj_kernel[(triton.cdiv(num_trajs, traj_tile["BLOCK_B"]),)](
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
            RATIO=o.ratio_level,
            AGG=o.agg,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            **traj_tile.kwargs(),
        )
    f32 = dict(dtype=torch.float32, device=device)
    loss, stats, denominator = torch.empty((), **f32), torch.empty(6, **f32), torch.empty((), **f32)
    _policy_finish_kernel[(1,)](
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
    kl_type = o.kl_type if ref_logp is not None else _k.KL_NONE
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
        _k._policy_bwd_kernel[(triton.cdiv(num_steps, tile["BLOCK_S"]),)](
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
            RATIO=o.ratio_level,
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
