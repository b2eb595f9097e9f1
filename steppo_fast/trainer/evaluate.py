"""``steppo eval RUN_DIR``: reload a run's checkpoint and play held-out seeds.

The run's ``config.yaml`` names its ``--model``; the tokenizer is rebuilt the same way as in
training (the word tokenizer for ``tiny``, the model directory's own tokenizer otherwise)."""

from __future__ import annotations

import os
import sys

from .checkpoint import CHECKPOINT, has_checkpoint
from .config import TrainConfig
from .loop import EVAL_SEED_BASE, Trainer


def load_run(run_dir: str, warn=None, **overrides) -> Trainer:
    """A Trainer rebuilt from ``run_dir/config.yaml`` with the weights of the run's newest good
    checkpoint (``checkpoint.prev.pt`` when ``checkpoint.pt`` is damaged: ``warn(message)``
    says so). The checkpoint is read as data only: it never runs code."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"RUN_DIR: {run_dir!r} has no config.yaml (not a run directory?)")
    if not has_checkpoint(run_dir):
        raise ValueError(f"RUN_DIR: {run_dir!r} has no {CHECKPOINT} (not a finished run?)")
    cfg = TrainConfig.from_yaml(cfg_path)
    cfg = TrainConfig.from_dict({**overrides, "out": run_dir, "resume": True}, cfg)
    trainer = Trainer(cfg)
    trainer.load_checkpoint(warn=warn)
    return trainer


def evaluate_run(
    run_dir: str,
    *,
    episodes: int = 200,
    greedy: bool = True,
    show: int = 1,
    device: str | None = None,
) -> dict:
    """Print and return held-out success rate, mean return and episode length. ``device``
    overrides the run's ``--device`` (e.g. ``"cpu"`` for a run trained on a GPU)."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"--episodes: must be an integer >= 1, got {episodes!r}")
    overrides = {"progress": False} if device is None else {"progress": False, "device": device}
    if isinstance(show, bool) or not isinstance(show, int) or show < 0:
        raise ValueError(f"--show: must be an integer >= 0, got {show!r}")
    warn = lambda m: print(f"warning: {m}", file=sys.stderr)
    trainer = load_run(run_dir, warn=warn, **overrides)
    cfg = trainer.cfg
    seeds = [EVAL_SEED_BASE + k for k in range(episodes)]
    import torch

    res = trainer.collect(
        seeds,
        list(range(episodes)),
        greedy=greedy,
        generator=torch.Generator(device=trainer.device).manual_seed(12345),
        desc="eval",
    )
    from .loop import episode_stats

    stats = episode_stats(res.trajectories)
    mode = "greedy" if greedy else f"sampled (T={cfg.temperature})"
    print(
        f"{run_dir}: {cfg.algo} on {cfg.env}, iteration {trainer.iteration}, {episodes} held-out "
        f"episodes, {mode}: success {stats['success_rate']:.3f}, mean return "
        f"{stats['mean_return']:.3f}, episode length {stats['episode_len']:.2f}"
    )
    for traj in res.trajectories[:show]:
        last = traj["steps"][-1]
        print(f"--- seed {traj['seed']} (success={traj['success']}):")
        print(transcript(trainer.tokenizer, last["prompt_ids"] + last["action_ids"]))
    return stats


def transcript(tokenizer, ids: list[int]) -> str:
    """Readable text of an episode's tokens: ``obs:`` / ``act:`` lines for the word tokenizer,
    the model tokenizer's own plain-text framing (indented) otherwise."""
    from ..envs.tokenizer import WordTokenizer

    text = tokenizer.decode(ids)
    if isinstance(tokenizer, WordTokenizer):
        return text.replace(" <obs> ", "\n  obs: ").replace(" <act> ", "\n  act: ")
    return "\n".join("  " + line for line in text.splitlines())
