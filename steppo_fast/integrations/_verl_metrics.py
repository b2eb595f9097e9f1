"""Per-step diagnostics on verl's padded rows (pure torch; never imports verl).

verl's own rollout-vs-training diagnostics (``calculate_debug_metrics``) are per token; in
multi-turn rows a mismatch confined to one turn is diluted by the others (verl PR #5229 asks
for per-turn numbers). StepPO's ratio is per step, so the number that matters is the step's
mean log-ratio between the training engine and the rollout engine:

    m_s = mean_{i in s}(old_logp_i - rollout_logp_i)

(``old_log_probs`` recomputed by the actor, ``rollout_log_probs`` recorded by vLLM / SGLang).
exp(m_s) is the factor by which the step's importance ratio is off at the first update.
"""

from __future__ import annotations

import torch

from ..ops.segments import segment_mean
from ._verl_rows import steps_from_response_mask

MAX_TURNS_REPORTED = 8


def step_logp_mismatch(
    rollout_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    prefix: str = "actor/",
    max_turns: int = MAX_TURNS_REPORTED,
) -> dict[str, float]:
    """Per-step rollout-vs-training log-prob metrics of ``[R, L]`` rows (empty dict: no step).

    - ``steppo_step_logp_mismatch``: mean over steps of |m_s|;
    - ``steppo_step_logp_mismatch_max``: max over steps of |m_s|;
    - ``steppo_step_logp_abs_diff_mean``: mean over steps of mean_{i in s}|old_i - rollout_i|;
    - ``steppo_step_logp_mismatch/turn_{k}``: mean |m_s| over the k-th step of each row
      (k < ``max_turns``; multi-turn rows: the k-th assistant turn).
    """
    shape = tuple(response_mask.shape)
    for name, t in (("rollout_log_probs", rollout_log_probs), ("old_log_probs", old_log_probs)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != response_mask {shape}")
    steps = steps_from_response_mask(response_mask)
    if steps.num_steps == 0:
        return {}
    diff = steps.gather(old_log_probs.detach().double() - rollout_log_probs.detach().double())
    per_step = segment_mean(diff, steps.cu_steps).abs()
    abs_mean = segment_mean(diff.abs(), steps.cu_steps)
    turn = torch.arange(steps.num_steps, device=per_step.device) - steps.cu_row_steps[
        steps.step_row
    ].to(per_step.device)
    out = {
        f"{prefix}steppo_step_logp_mismatch": float(per_step.mean()),
        f"{prefix}steppo_step_logp_mismatch_max": float(per_step.max()),
        f"{prefix}steppo_step_logp_abs_diff_mean": float(abs_mean.mean()),
    }
    for k in range(min(max_turns, int(turn.max()) + 1)):
        out[f"{prefix}steppo_step_logp_mismatch/turn_{k}"] = float(per_step[turn == k].mean())
    return out
