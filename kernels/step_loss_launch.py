"""Launchers of the fused step policy loss kernels (``step_loss.py``): grids, placeholders,
the O(S) trajectory pre/post-processing and the O(S) torch epilogue (loss and stats).

Forward launches (S steps, B trajectories, A action tokens):
- ratio "step"/"token" with agg "step-mean"/"token-mean": one fused kernel over the tokens,
  then an O(S) torch epilogue over the per-step table (loss, stats, no host sync).
- agg "traj-mean" adds 2 segment reductions + 2 broadcasts over ``cu_trajs`` (O(S)).
- ratio "trajectory" adds one reduction + one broadcast of the step log-ratio sums, the O(S)
  unit kernel, and one reduction + broadcast of the backward coefficients.
Backward: one kernel over the tokens (d logp, and d old_logp / d ref_logp when asked) plus an
O(S) product for d advantages.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from . import step_loss as _k
from .segment import segment_expand, segment_reduce

BLOCK_S = 16  # steps per program
BLOCK_T = 64  # tokens per step per loop iteration
UNIT_BLOCK = 1024  # steps per program of the trajectory unit kernel


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


def _traj_counts(cu_steps, cu_trajs, step_weight, num_steps):
    """Per trajectory: counted steps and counted tokens (steps with weight > 0), fp32 [B]."""
    n = (cu_steps[1:] - cu_steps[:-1]).to(torch.float32)
    if step_weight is None:
        valid = torch.ones(num_steps, dtype=torch.float32, device=n.device)
    else:
        valid = (step_weight > 0).to(torch.float32)
    return segment_reduce(valid, cu_trajs, mean=False), segment_reduce(
        valid * n, cu_trajs, mean=False
    )


def policy_loss_forward(logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp, o):
    """Run the forward kernels. Returns (loss 0-d, stats [6], table [S, NUM_COLS]) fp32."""
    logp, old_logp, advantages = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    cu_steps = cu_steps.contiguous()
    device, num_steps = logp.device, advantages.shape[0]
    # every column of every row is written by the forward kernel(s)
    table = torch.empty(num_steps, _k.NUM_COLS, dtype=torch.float32, device=device)
    lr_sum = torch.empty(num_steps, dtype=torch.float32, device=device)
    sw = step_weight.contiguous() if step_weight is not None else lr_sum  # placeholder if None
    ref = ref_logp.contiguous() if (ref_logp is not None and o.kl_type) else logp
    needs_traj = o.agg == _k.AGG_TRAJ or o.ratio_level == _k.RATIO_TRAJ
    tok_base = unit_base = lr_sum  # placeholders, read only for traj-mean
    if needs_traj and num_steps > 0:
        cu_trajs = cu_trajs.contiguous()
        steps_b, toks_b = _traj_counts(cu_steps, cu_trajs, step_weight, num_steps)
        if o.agg == _k.AGG_TRAJ:
            tok_base = segment_expand(1.0 / toks_b.clamp_min(1.0), cu_trajs, num_steps, mean=False)
            unit_base = segment_expand(
                1.0 / steps_b.clamp_min(1.0), cu_trajs, num_steps, mean=False
            )
    dual = o.dual_clip if o.dual_clip is not None else 0.0
    if num_steps > 0:
        _k._policy_fwd_kernel[(triton.cdiv(num_steps, BLOCK_S),)](
            logp,
            old_logp,
            ref,
            advantages,
            sw,
            tok_base,
            unit_base,
            cu_steps,
            table,
            lr_sum,
            num_steps,
            o.length_power,
            o.clip_low,
            o.clip_high,
            dual,
            RATIO=o.ratio_level,
            AGG=o.agg,
            KL_TYPE=o.kl_type,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            BLOCK_S=BLOCK_S,
            BLOCK_T=BLOCK_T,
        )
    if o.ratio_level == _k.RATIO_TRAJ and num_steps > 0:
        norm_b = toks_b.clamp_min(1.0) ** o.length_power
        traj_l = segment_reduce(lr_sum, cu_trajs, mean=False) / norm_b
        traj_l_steps = segment_expand(traj_l, cu_trajs, num_steps, mean=False)
        _k._policy_unit_kernel[(triton.cdiv(num_steps, UNIT_BLOCK),)](
            traj_l_steps,
            advantages,
            sw,
            table,
            num_steps,
            o.clip_low,
            o.clip_high,
            dual,
            HAS_WEIGHT=step_weight is not None,
            HAS_DUAL=o.dual_clip is not None,
            NUM_COLS=_k.NUM_COLS,
            BLOCK=UNIT_BLOCK,
        )
        coef_b = (
            segment_reduce(table[:, _k.COL_DLR.value].contiguous(), cu_trajs, mean=False) / norm_b
        )
        table[:, _k.COL_DLR.value] = segment_expand(coef_b, cu_trajs, num_steps, mean=False)
    return _finish(table, o)


def _denominator(total_w: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    if normalizer is not None:
        return torch.full_like(total_w, normalizer)
    return torch.where(total_w > 0, total_w, torch.ones_like(total_w))


def _finish(table: torch.Tensor, o: LossOptions):
    """Loss and the 6 stats (clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_min,
    ratio_max) from the per-step table, as tensors (no host sync)."""
    sums = table.sum(0)
    if table.shape[0]:
        rho_min, rho_max = (
            table[:, _k.COL_RHO_MIN.value].min(),
            table[:, _k.COL_RHO_MAX.value].max(),
        )
    else:
        rho_min = rho_max = sums.new_ones(())
    w, tok_w = sums[_k.COL_W.value], sums[_k.COL_TOKW.value]
    denominator = _denominator(w, o.normalizer)
    loss = (sums[_k.COL_WL.value] + o.kl_coef * sums[_k.COL_WK.value]) / denominator
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    one, zero = torch.ones_like(w), torch.zeros_like(w)
    counted = w > 0
    stats = torch.stack(
        [
            torch.where(counted, sums[_k.COL_WCLIP.value] / safe_w, zero),
            torch.where(counted, sums[_k.COL_WDUAL.value] / safe_w, zero),
            torch.where(
                tok_w > 0, sums[_k.COL_WAKL.value] / torch.where(tok_w > 0, tok_w, one), zero
            ),
            torch.where(counted, sums[_k.COL_WRHO.value] / safe_w, one),
            torch.where(counted, rho_min, one),
            torch.where(counted, rho_max, one),
        ]
    )
    return loss, stats, table


def policy_loss_backward(
    grad, logp, old_logp, advantages, cu_steps, step_weight, ref_logp, table, o, need_old, need_ref
):
    """(d logp, d old_logp, d ref_logp, d advantages), fp32; unneeded ones are empty."""
    logp, old_logp, advantages = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    device, num_tokens, num_steps = logp.device, logp.shape[0], advantages.shape[0]
    scale = grad.to(torch.float32) / _denominator(table[:, _k.COL_W.value].sum(), o.normalizer)
    scale = scale.reshape(1).contiguous()
    # The kernel writes every token of every step (cu_steps ends at A): no memset needed,
    # except for d ref_logp when there is no KL term.
    d_logp = torch.empty(num_tokens, dtype=torch.float32, device=device)
    if num_steps == 0:
        d_logp.zero_()
    d_old = torch.empty_like(d_logp) if need_old else d_logp.new_empty(0)
    d_ref = torch.zeros_like(d_logp) if need_ref else d_logp.new_empty(0)
    d_adv = scale * table[:, _k.COL_DADV.value]
    if num_steps > 0:
        kl_type = o.kl_type if ref_logp is not None else _k.KL_NONE
        ref = ref_logp.contiguous() if kl_type else logp
        sw = step_weight.contiguous() if step_weight is not None else d_logp
        _k._policy_bwd_kernel[(triton.cdiv(num_steps, BLOCK_S),)](
            logp,
            old_logp,
            ref,
            advantages,
            sw,
            cu_steps.contiguous(),
            table,
            scale,
            d_logp,
            d_old if need_old else d_logp,
            d_ref if need_ref else d_logp,
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
            NUM_COLS=_k.NUM_COLS,
            BLOCK_S=BLOCK_S,
            BLOCK_T=BLOCK_T,
        )
    return d_logp, d_old, d_ref, d_adv
