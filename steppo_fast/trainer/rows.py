"""The rows of ``metrics.jsonl`` and the one-line summary printed per iteration."""

from __future__ import annotations

import torch

from .. import kl_penalty


def update_fields(stats: dict, wall_s: float, t0: float, t1: float, t2: float) -> dict:
    """The timing and update-stat fields of one metrics row: the iteration ran rollout
    ``[t0, t1)`` and update ``[t1, t2)`` (perf_counter seconds); ``stats`` from ``ppo_update``."""
    return dict(
        wall_s=round(wall_s, 3),
        iter_s=round(t2 - t0, 3),
        rollout_s=round(t1 - t0, 3),
        update_s=round(t2 - t1, 3),
        policy_loss=stats.get("policy_loss", 0.0),
        value_loss=stats.get("value_loss"),
        clip_frac=stats.get("clip_frac", 0.0),
        kl=stats.get("approx_kl", 0.0),
        entropy=stats.get("entropy", 0.0),
        grad_norm=stats.get("grad_norm"),
    )


def mean_ref_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Mean over the action tokens of ``kl_penalty(logp, ref_logp, "k3")`` (the loss's k3,
    clamped to [-10, 10]); 0.0 without action tokens."""
    return float(kl_penalty(logp, ref_logp, "k3").mean()) if logp.numel() else 0.0


def episode_stats(trajectories: list[dict]) -> dict:
    n = max(1, len(trajectories))
    return {
        "success_rate": sum(t["success"] for t in trajectories) / n,
        "mean_return": sum(t["return"] for t in trajectories) / n,
        "episode_len": sum(len(t["steps"]) for t in trajectories) / n,
    }


def summary_line(row: dict, iters: int) -> str:
    """The one-line per-iteration summary."""

    def f(key, fmt):
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    text = (
        f"it {row['iter']}/{iters} | succ {f('success_rate', '.2f')} ret {f('mean_return', '.2f')} "
        f"len {f('episode_len', '.1f')}"
    )
    if "eval_success_rate" in row:
        text += f" | held-out succ {row['eval_success_rate']:.2f}"
    text += (
        f" | pol {f('policy_loss', '+.4f')} val {f('value_loss', '.4f')}"
        + (
            f" ev {f('critic/explained_var', '+.2f')} astd {f('critic/adv_std', '.3f')}"
            if "critic/adv_std" in row
            else ""
        )
        + f" clip {f('clip_frac', '.3f')} kl {f('kl', '.4f')} ent {f('entropy', '.3f')}"
        f" | {row['tokens']} tok | {row['iter_s']:.1f}s (roll {row['rollout_s']:.1f}"
        f" upd {row['update_s']:.1f}) total {row['wall_s']:.0f}s"
    )
    return text
