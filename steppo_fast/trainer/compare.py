"""``steppo compare``: several algorithms x seeds on identical tasks and budgets.

Every run gets the same config except ``algo`` and ``seed`` (so the same iterations, episodes
per iteration, model size and evaluation seeds); each seed's training tasks are the same for
every algorithm. Runs go one after another (``<out>/<algo>-s<seed>/``); a finished run is
reused and an interrupted one resumed, so re-running the command continues where it stopped.
Writes ``<out>/results.md`` (a markdown table, mean +- std over seeds) and ``<out>/curves.png``
(held-out success rate against iterations and wall time).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform

from .checkpoint import checkpoint_iteration
from .config import TrainConfig
from .loop import Trainer
from .plot import plot_compare
from .runfiles import atomic_write_text, read_metrics


def run_compare(base: TrainConfig, algos: list[str], seeds: int, out: str = "") -> str:
    """Run (or reuse) every (algo, seed); write results.md and curves.png; return the table."""
    out = out or os.path.join("runs", f"compare-{base.env}")
    os.makedirs(out, exist_ok=True)
    curves: dict[str, list[list[dict]]] = {}
    for algo in algos:
        for seed in range(seeds):
            run_dir = os.path.join(out, f"{algo}-s{seed}")
            done = checkpoint_iteration(run_dir)  # -1: none yet (the run starts again)
            cfg = dataclasses.replace(base, algo=algo, seed=seed, out=run_dir, resume=done >= 0)
            if done < cfg.iters:
                print(f"compare: {algo} seed {seed} -> {run_dir}")
                Trainer(cfg).train()
            curves.setdefault(algo, []).append(read_metrics(os.path.join(run_dir, "metrics.jsonl")))
    table = results_table(base, curves)
    atomic_write_text(os.path.join(out, "results.md"), table)
    plot_compare(
        curves,
        os.path.join(out, "curves.png"),
        f"{base.env}: mean +- std over {seeds} seeds ({base.iters} iterations x "
        f"{base.groups * base.group_size} episodes)",
    )
    print(table)
    return table


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    fmt = ".3f" if abs(m) < 10 else (".1f" if abs(m) < 1000 else ".0f")
    return f"{m:{fmt}} +- {s:{fmt}}"


def _first_iter(rows: list[dict], key: str, threshold: float):
    """First iteration whose ``key`` reaches ``threshold`` (None if never)."""
    return next((r["iter"] for r in rows if (r.get(key) or 0.0) >= threshold), None)


def _reached(runs: list[list[dict]], threshold: float) -> str:
    its = [_first_iter(r, "eval_success_rate", threshold) for r in runs]
    hit = [i for i in its if i is not None]
    if not hit:
        return f"0/{len(runs)}"
    return f"{len(hit)}/{len(runs)} (mean iter {sum(hit) / len(hit):.0f})"


def _last_mean(rows: list[dict], key: str, n: int = 10):
    vals = [r[key] for r in rows if r.get(key) is not None][-n:]
    return sum(vals) / len(vals) if vals else None


def _final(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def results_table(base: TrainConfig, curves: dict[str, list[list[dict]]]) -> str:
    """Markdown: per algorithm, final held-out success / return / episode length, training
    success over the last 10 iterations, seeds reaching 90% held-out success (and when), wall
    time and tokens per iteration (mean +- std over seeds)."""
    seeds = max((len(v) for v in curves.values()), default=0)
    lines = [
        f"# steppo compare: {base.env}, {seeds} seeds",
        "",
        f"Budget per run: {base.iters} iterations x {base.groups * base.group_size} episodes "
        f"({base.groups} tasks x {base.group_size}), tiny {base.arch} model "
        f"(hidden {base.hidden_size}, {base.num_layers} layers), {base.epochs} epochs x "
        f"{base.minibatches} mini-batches, lr {base.lr}. Held-out evaluation: "
        f"{base.eval_episodes} fixed unseen seeds, {'greedy' if base.eval_greedy else 'sampled'}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {base.threads}, load average at write {os.getloadavg()[0]:.1f}; "
        f"written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "| algo | held-out success | held-out return | held-out episode len | train success "
        "(last 10 iters) | seeds reaching 90% held-out | wall s | tokens / iter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, runs in curves.items():
        lines.append(
            f"| {algo} | {_mean_std([_final(r, 'eval_success_rate') for r in runs])} "
            f"| {_mean_std([_final(r, 'eval_mean_return') for r in runs])} "
            f"| {_mean_std([_final(r, 'eval_episode_len') for r in runs])} "
            f"| {_mean_std([_last_mean(r, 'success_rate') for r in runs])} "
            f"| {_reached(runs, 0.9)} "
            f"| {_mean_std([_final(r, 'wall_s') for r in runs])} "
            f"| {_mean_std([_avg(r, 'tokens') for r in runs])} |"
        )
    return "\n".join(lines) + "\n"


def _avg(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None
