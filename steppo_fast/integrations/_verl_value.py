"""StepPO's step-boundary value loss on verl's padded rows (pure torch; never imports verl).

StepPO reads the critic once per step: V(s) = ``values[row, step_start]``, the critic's output
at the token before the step's first action token (verl's critic writes the value predicted
from the hidden state before response token t at ``values[:, t]``). So it trains the value only
there: for every step s (a run of ``response_mask == 1``, see :mod:`._verl_rows`) with
v_s = ``vpreds[row, start]``, v_old = ``values[row, start]``, R_s = ``returns[row, start]``:

    e_s = 0.5 * max((v_s - R_s)^2, (v_old + clamp(v_s - v_old, -c, c) - R_s)^2)

(verl's clipped value loss, ``c = critic.cliprange_value``). Every other position gets no
gradient. The loss is aggregated exactly as verl's ``agg_loss`` aggregates a loss matrix that
holds e_s on each token of step s, with verl's global normalisers (``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``): see
:func:`._verl_rows.verl_loss_aggregation`. So micro-batch and rank losses add up to the
mini-batch loss whatever the split (the defect verl fixed for its own critic loss, by passing
the same global counts), and ``critic.loss_agg_mode`` keeps verl's meaning:
``seq-mean-token-mean`` weighs every row once (one step per row: every step once, StepPO's
step mean; multi-turn rows: every trajectory once, its steps by their token share).
"""

from __future__ import annotations

import torch

from ..ops.loss import value_loss
from ._verl_rows import steps_from_response_mask, verl_loss_aggregation


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} != response_mask {shape}")


def step_value_loss_rows(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "seq-mean-token-mean",
    clip: float | None = None,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step-boundary value loss of a micro-batch -> ``(loss, stats)``.

    Args:
        vpreds: [R, L] current critic values (differentiable; only step starts get gradient).
        old_values, returns: [R, L] values at rollout time and the targets (verl's
            ``values`` / ``returns``), read at step starts only.
        response_mask: [R, L] 0/1; steps are its runs of 1s.
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: verl's
            aggregation and global counts (see the module docstring).
        clip: verl's ``cliprange_value`` (None: unclipped).

    Returns:
        0-d loss (fp32; fp64 for fp64 ``vpreds``) and stats: ``clip_frac`` (weighted share of
        steps whose clipped term is the larger), ``vpred_mean`` / ``return_mean`` (plain
        means over the steps), ``num_steps``.
    """
    shape = tuple(response_mask.shape)
    for name, t in (("vpreds", vpreds), ("old_values", old_values), ("returns", returns)):
        _check_shape(name, t, shape)
    steps = steps_from_response_mask(response_mask)
    agg, step_weight, normalizer = verl_loss_aggregation(
        loss_agg_mode,
        steps,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    dtype = torch.float64 if vpreds.dtype == torch.float64 else torch.float32
    lengths = (steps.cu_steps[1:] - steps.cu_steps[:-1]).to(dtype)
    weight = lengths if agg == "token-mean" else step_weight.to(dtype)
    at = (steps.step_row, steps.step_start)
    v, v_old, ret = vpreds[at].to(dtype), old_values[at].detach().to(dtype), returns[at].to(dtype)
    if normalizer is None:  # no step anywhere in this micro-batch's global counts: loss 0
        loss = (v * 0).sum()
    else:
        loss = value_loss(v, v_old, ret.detach(), clip=clip, weight=weight, normalizer=normalizer)
    with torch.no_grad():
        num = steps.num_steps
        if clip is not None and num:
            clipped = v_old + (v - v_old).clamp(-clip, clip)
            is_clipped = ((clipped - ret) ** 2 > (v - ret) ** 2).to(dtype)
            clip_frac = float((is_clipped * weight).sum() / weight.sum()) if weight.sum() else 0.0
        else:
            clip_frac = 0.0
        stats = {
            "clip_frac": clip_frac,
            "vpred_mean": float(v.mean()) if num else 0.0,
            "return_mean": float(ret.mean()) if num else 0.0,
            "num_steps": float(num),
        }
    return loss, stats
