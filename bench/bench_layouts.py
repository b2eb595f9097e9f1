"""Merged vs rows layout on the same trajectories: tokens encoded and wall time per update.

``python bench/bench_layouts.py [--env doors,quest] [--episodes 64] [--reps 3] [--threads 1]``
(or ``python -m bench.bench_layouts``; results in ``bench/results/layouts.json``)

For each environment: one rollout of ``episodes`` episodes with a fresh tiny policy (close to
the random grammar policy, so episodes run long), packed twice from the *same* records:
``layout="auto"`` (each episode one merged sequence) and ``layout="rows"`` (one sequence per
step, re-encoding the whole prefix). Each is timed over one StepPO update (old log-probs and
values, one epoch, one optimizer step; best of ``reps``) from identical initial weights.
Expect rows / merged tokens of about (steps per episode + 1) / 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import print_table, write_results  # noqa: E402
from steppo_fast import StepBatch  # noqa: E402
from steppo_fast.envs import default_tokenizer, make_env  # noqa: E402
from steppo_fast.trainer.algorithms import compute_targets  # noqa: E402
from steppo_fast.trainer.config import TrainConfig  # noqa: E402
from steppo_fast.trainer.policy import Critic, build_policy  # noqa: E402
from steppo_fast.trainer.rollout import rollout  # noqa: E402
from steppo_fast.trainer.update import Models, forward, ppo_update  # noqa: E402


def time_update(cfg: TrainConfig, models: Models, batch, masks, reps: int) -> float:
    """Best wall seconds of one full update (no-grad pass + epochs x mini-batches)."""
    best = float("inf")
    for _ in range(reps):
        m = copy.deepcopy(models)
        params = list(m.policy.parameters()) + list(m.critic.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = forward(m, batch, masks, cfg.temperature, "step")
        targets = compute_targets(cfg, batch, out.values)
        shuffle = torch.Generator(device="cpu")  # the CPU benchmark's model is on the CPU
        ppo_update(cfg, m, opt, batch, masks, targets, out.logp, None, shuffle)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(env: str, episodes: int, reps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    cfg = TrainConfig(env=env, epochs=1, minibatches=1, micro_batch_tokens=1 << 30).resolved()
    tok = default_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(cfg, tok).eval()
    models = Models(policy, Critic(policy, shared=False).eval(), None)
    res = rollout(
        policy,
        tok,
        lambda: make_env(env),
        list(range(episodes)),
        list(range(episodes)),
        generator=torch.Generator(device="cpu").manual_seed(0),  # a CPU benchmark
    )
    rows = []
    for layout in ("auto", "rows"):
        batch = StepBatch.from_trajectories(res.trajectories, layout=layout)
        rows.append(
            {
                "env": env,
                "layout": "merged" if layout == "auto" else "rows",
                "episodes": batch.num_trajs,
                "steps_per_episode": round(batch.num_steps / batch.num_trajs, 2),
                "sequences": batch.num_seqs,
                "tokens": batch.num_tokens,
                "update_s": round(time_update(cfg, models, batch, res.masks, reps), 3),
            }
        )
    rows[1]["tokens_vs_merged"] = round(rows[1]["tokens"] / rows[0]["tokens"], 2)
    rows[1]["time_vs_merged"] = round(rows[1]["update_s"] / rows[0]["update_s"], 2)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/bench_layouts.py")
    parser.add_argument("--env", default="doors,quest")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    print(f"loadavg {load_start:.1f}, torch threads {args.threads}, torch {torch.__version__}")
    rows = [
        r
        for env in args.env.split(",")
        for r in measure(env, args.episodes, args.reps, args.threads)
    ]
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))  # every row's columns
    if not args.no_save:
        path = write_results(
            "layouts",
            rows,
            threads=args.threads,
            reps=args.reps,
            loadavg_start=load_start,
            loadavg_end=os.getloadavg()[0],
        )
        print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
