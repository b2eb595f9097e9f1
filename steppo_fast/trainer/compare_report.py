"""results.md and curves.png of ``steppo compare``, built from the run folders alone.

Per run (``<out>/*/config.yaml`` + ``metrics.jsonl``; finished = its last row is iteration
``iters``), from the held-out evaluations at iterations ``0, e, 2e, ..., iters``:

- final held-out success: the evaluation at ``iters``;
- held-out AUC: :func:`~.stats.auc` of held-out success over ``[0, iters]`` (in [0, 1]);
- training-success AUC: the mean of the per-iteration training success (sampled rollouts on the
  run's training tasks), iterations ``1..iters``;
- iteration and wall seconds of the first evaluation with held-out success >= 0.9.

Selection: each algorithm is reported at the grid point with the highest mean over its finished
seeds of ``--select`` (``eval-auc``: held-out AUC, default; ``train-auc``: training-success AUC);
ties go to the smaller learning rate. Selecting and reporting on the same seeds is optimistic
(the best of k noisy means is biased upwards); ``train-auc`` selects without looking at the
held-out curve, and ``select_seeds`` K > 0 selects on the K smallest seeds and reports the
others. Intervals: two-sided 95% t intervals over seeds (:func:`~.stats.t_interval`).
Paired tests: the reference algorithm (``steppo`` when compared, else the first) against each
other algorithm, each at its best grid point, on the per-seed held-out AUC of the seeds both
finished: paired t and the exact sign-flip permutation test (:mod:`.stats`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import subprocess

from .config import ALGO_DEFAULTS, ALGOS, TrainConfig
from .fields import flag_of
from .plot import plot_compare
from .runfiles import atomic_write_text, read_metrics
from .stats import auc, mean, min_sign_flip_p, paired_t, sign_flip_p, t_interval

THRESHOLD = 0.9
# fields that may differ between a run folder and the compare that continues it, and between
# the runs of one comparison: they do not change what is measured (where files go, logging,
# checkpoint cadence, threads, op backend)
FREE_FIELDS = ("out", "resume", "progress", "plot", "checkpoint_every", "threads", "impl", "device")
# fields that differ between the runs of one comparison (the rest is the shared budget)
PER_RUN = ("algo", "lr", "critic_lr", "critic_warmup", "critic", "seed", *ALGO_DEFAULTS["steppo"])


@dataclasses.dataclass
class Run:
    """One run folder's config and metrics, summarised."""

    path: str
    cfg: TrainConfig
    rows: list[dict]
    finished: bool
    final: float | None = None  # held-out success at the last iteration
    eval_auc: float | None = None
    train_auc: float | None = None
    hit_iter: int | None = None  # first evaluation with held-out success >= THRESHOLD
    hit_wall: float | None = None
    wall: float | None = None


def load_run(path: str) -> Run:
    """Read and summarise the run folder ``path`` (see the module docstring)."""
    cfg = TrainConfig.from_yaml(os.path.join(path, "config.yaml"))
    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    run = Run(path, cfg, rows, bool(rows) and rows[-1].get("iter") == cfg.iters)
    if not run.finished:
        return run
    evals = [(r["iter"], r["eval_success_rate"]) for r in rows if "eval_success_rate" in r]
    if len(evals) < 2 or evals[0][0] != 0 or evals[-1][0] != cfg.iters:
        raise ValueError(
            f"compare: {path}/metrics.jsonl: held-out evaluations at iterations "
            f"{[i for i, _ in evals]}; the AUC needs them at 0 and {cfg.iters}"
        )
    run.final = evals[-1][1]
    run.eval_auc = auc([float(i) for i, _ in evals], [s for _, s in evals])
    run.train_auc = mean([r["success_rate"] for r in rows if r["iter"] >= 1])
    hit = next((r for r in rows if r.get("eval_success_rate", -1.0) >= THRESHOLD), None)
    if hit is not None:
        run.hit_iter, run.hit_wall = hit["iter"], hit.get("wall_s")
    run.wall = rows[-1].get("wall_s")
    return run


def load_runs(out: str) -> list[Run]:
    """Every run folder under ``out``, checked to share one budget (fields outside
    :data:`PER_RUN` and :data:`FREE_FIELDS`) and to hold each (algo, lr, seed) once: a
    ``ValueError`` naming both folders and the field."""
    if not os.path.isdir(out):
        raise ValueError(f"--out: {out} is not a directory")
    runs = [
        load_run(os.path.join(out, n))
        for n in sorted(os.listdir(out))
        if os.path.isfile(os.path.join(out, n, "config.yaml"))
    ]
    if not runs:
        raise ValueError(f"--out: {out} holds no run folders (*/config.yaml)")
    seen: dict[tuple, str] = {}
    for run in runs:
        key = (run.cfg.algo, run.cfg.lr, run.cfg.seed)
        if key in seen:
            raise ValueError(
                f"compare: {seen[key]} and {run.path} both hold {key[0]} lr {key[1]:g} seed "
                f"{key[2]} (an older layout?); keep one of them in {out}"
            )
        seen[key] = run.path
    first = runs[0].cfg.to_dict()
    for run in runs[1:]:
        for key, value in run.cfg.to_dict().items():
            if key not in PER_RUN and key not in FREE_FIELDS and first[key] != value:
                raise ValueError(
                    f"compare: {runs[0].path} and {run.path} differ in {flag_of(key)} "
                    f"({first[key]!r} vs {value!r}): one comparison shares one budget"
                )
    return runs


def _ci(xs: list[float], fmt: str = ".3f") -> str:
    if not xs:
        return "-"
    m, lo, hi = t_interval(xs)
    return f"{m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if len(xs) > 1 else f"{m:{fmt}} (1 seed)"


def _mean(xs: list[float], fmt: str = ".1f") -> str:
    return f"{mean(xs):{fmt}}" if xs else "-"


def select_best(points: dict[float, list[Run]], select: str) -> float:
    """The learning rate whose finished seeds have the highest mean ``select`` score (ties: the
    smaller learning rate); points without a finished seed are not candidates."""
    key = "eval_auc" if select == "eval-auc" else "train_auc"
    scored = [
        (mean([getattr(r, key) for r in rs if r.finished]), -lr, lr)
        for lr, rs in points.items()
        if any(r.finished for r in rs)
    ]
    if not scored:
        raise ValueError("compare: no finished run to select from")
    return max(scored)[2]


def machine_info() -> dict:
    """CPU model, cores and the package's git commit (``unknown`` outside a checkout;
    ``+uncommitted changes`` when tracked files differ from it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            cpu = next(names, cpu)
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit += "+uncommitted changes" if commit and dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": commit or "unknown"}


def write_report(
    out: str,
    algos: list[str] | None = None,
    select: str = "eval-auc",
    log=print,
    select_seeds: int = 0,
):
    """Write ``out``/results.md and ``out``/curves.png from the run folders; return the text.
    ``algos``: which algorithms and in what order (default: every one found, in
    :data:`~.config.ALGOS` order). ``select_seeds`` K > 0: the K smallest seeds found only
    select the grid points (the grid table shows them) and every other table reports the
    remaining seeds, so the selection does not bias them; 0: select and report on all seeds."""
    runs = load_runs(out)
    found = {r.cfg.algo for r in runs}
    algos = [a for a in (algos or ALGOS) if a in found]
    grid: dict[str, dict[float, list[Run]]] = {a: {} for a in algos}
    for r in sorted(runs, key=lambda r: (r.cfg.lr, r.cfg.seed)):
        if r.cfg.algo in algos:
            grid.setdefault(r.cfg.algo, {}).setdefault(r.cfg.lr, []).append(r)
    seeds = sorted({r.cfg.seed for r in runs if r.cfg.algo in algos})
    if select_seeds and len(seeds) - select_seeds < 2:
        raise ValueError(
            f"--select-seeds: {select_seeds} of the {len(seeds)} seeds found leave "
            f"{len(seeds) - select_seeds} to report; need >= 2"
        )
    chosen = set(seeds[:select_seeds])
    sel_grid, rep_grid = grid, grid
    if chosen:
        sel_grid = _split(grid, lambda r: r.cfg.seed in chosen)
        rep_grid = _split(grid, lambda r: r.cfg.seed not in chosen)
    best = {a: select_best(sel_grid[a], select) for a in algos}
    text = _header(out, runs, grid, select, sorted(chosen)) + _best_table(rep_grid, best)
    text += _paired_table(rep_grid, best, algos) + _grid_table(sel_grid, best)
    atomic_write_text(os.path.join(out, "results.md"), text)
    cfg = runs[0].cfg
    plot_compare(
        {
            f"{a} (lr {best[a]:g})": [r.rows for r in rep_grid[a][best[a]] if r.finished]
            for a in algos
        },
        os.path.join(out, "curves.png"),
        f"{cfg.env}: mean and 95% t interval over seeds, each algorithm at its best lr "
        f"({select}); {cfg.iters} iterations x {cfg.groups * cfg.group_size} episodes",
    )
    if log:
        log(text)
    return text


def _split(grid, keep) -> dict:
    return {
        a: {lr: [r for r in rs if keep(r)] for lr, rs in pts.items()} for a, pts in grid.items()
    }


def _header(out: str, runs: list[Run], grid, select: str, chosen: list[int]) -> str:
    cfg, info = runs[0].cfg, machine_info()
    size = f" ({cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_layers} layers)"
    seeds = sorted({r.cfg.seed for r in runs})
    loads = [
        s[k]["load"]
        for r in runs
        for s in _segments(r.path)
        for k in ("start", "end")
        if isinstance(s.get(k), dict)
    ]
    unfinished = [
        f"{os.path.basename(r.path)} ({len(r.rows)} rows)" for r in runs if not r.finished
    ]
    grids = "; ".join(f"{a}: {', '.join(f'{lr:g}' for lr in pts)}" for a, pts in grid.items())
    critic_lrs = sorted({r.cfg.critic_lr for r in runs if r.cfg.uses_critic})
    lines = [
        f"# steppo compare: {cfg.env}, {len(seeds)} seeds ({seeds[0]}..{seeds[-1]})",
        "",
        f"Budget per run: {cfg.iters} iterations x {cfg.groups * cfg.group_size} episodes "
        f"({cfg.groups} tasks x {cfg.group_size}), model {cfg.model}"
        + (size if cfg.model == "tiny" else "")
        + f", init {cfg.init or 'none (random)'}, {cfg.epochs} epochs x {cfg.minibatches} "
        f"mini-batches. Held-out: {cfg.eval_episodes} fixed unseen tasks every {cfg.eval_every} "
        f"iterations, {'greedy' if cfg.eval_greedy else 'sampled'}. Training tasks depend on "
        "the seed only (the same for every algorithm and learning rate).",
        f"Learning-rate grid: {grids}. Critic lr (steppo, ppo): "
        f"{', '.join(f'{c:g}' for c in critic_lrs) or '-'}.",
        f"Selection: each algorithm at the lr with the highest mean {select} over its seeds "
        "(ties: the smaller lr). "
        + (
            f"Selected on seeds {', '.join(map(str, chosen))} only (--select-seeds; the grid "
            "table shows them); every other table reports the remaining seeds, unbiased by "
            "the selection."
            if chosen
            else "Selected and reported on the same seeds, so the best point's numbers are "
            "optimistic."
        )
        + " Intervals are 95% t intervals over seeds.",
        f"Machine: {info['cpu']}, {info['cores']} cores; commit {info['commit']}; written "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}, load average "
        f"{os.getloadavg()[0]:.2f}"
        + (f"; load average during the runs {min(loads):.1f}-{max(loads):.1f}" if loads else "")
        + " (wall times depend on it).",
    ]
    if unfinished:
        lines.append(f"Not finished (left out): {', '.join(unfinished)}.")
    return "\n".join(lines) + "\n"


def _segments(path: str) -> list[dict]:
    import json

    try:
        with open(os.path.join(path, "compare_run.json"), encoding="utf-8") as f:
            return json.load(f).get("segments", [])
    except (OSError, ValueError):
        return []


def _best_table(grid, best) -> str:
    lines = [
        "",
        "## Each algorithm at its best learning rate",
        "",
        "| algo | lr | seeds | final held-out success | held-out AUC | training-success AUC "
        f"| seeds reaching {THRESHOLD:.0%} held-out | iteration to {THRESHOLD:.0%} | wall s to "
        f"{THRESHOLD:.0%} | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, points in grid.items():
        rs = [r for r in points[best[algo]] if r.finished]
        hits = [r for r in rs if r.hit_iter is not None]
        lines.append(
            f"| {algo} | {best[algo]:g} | {len(rs)} | {_ci([r.final for r in rs])} "
            f"| {_ci([r.eval_auc for r in rs])} | {_ci([r.train_auc for r in rs])} "
            f"| {len(hits)}/{len(rs)} | {_mean([r.hit_iter for r in hits])} "
            f"| {_mean([r.hit_wall for r in hits])} | {_mean([r.wall for r in rs])} |"
        )
    lines += [
        "",
        "Mean [95% t interval] over seeds (with few seeds a t interval can pass 0 or 1). "
        f"Iteration / wall s to {THRESHOLD:.0%}: mean over the seeds that reached it, at the "
        "held-out evaluations (so a multiple of --eval-every); wall seconds include those "
        "evaluations and depend on the load.",
    ]
    return "\n".join(lines) + "\n"


def _paired_table(grid, best, algos) -> str:
    ref = "steppo" if "steppo" in algos else algos[0]
    others = [a for a in algos if a != ref]
    if not others:
        return ""
    lines = [
        "",
        f"## {ref} vs each other algorithm: paired by seed, held-out AUC",
        "",
        f"| vs | seeds | mean difference ({ref} - other) [95% t] | paired t | p (t) | "
        "p (exact sign-flip) | smallest possible p |",
        "|---|---|---|---|---|---|---|",
    ]
    ref_runs = {r.cfg.seed: r for r in grid[ref][best[ref]] if r.finished}
    for other in others:
        mine = {r.cfg.seed: r for r in grid[other][best[other]] if r.finished}
        seeds = sorted(set(ref_runs) & set(mine))
        a = [ref_runs[s].eval_auc for s in seeds]
        b = [mine[s].eval_auc for s in seeds]
        if len(seeds) < 2:
            lines.append(f"| {other} | {len(seeds)} | - | - | - | - | - |")
            continue
        t, p = paired_t(a, b)
        lines.append(
            f"| {other} | {len(seeds)} | {_ci([x - y for x, y in zip(a, b)])} | {t:.2f} "
            f"| {p:.3f} | {sign_flip_p(a, b):.4f} | {min_sign_flip_p(len(seeds)):.4f} |"
        )
    lines += [
        "",
        "Two-sided p, one comparison each (no multiple-comparison correction). With n seeds "
        "the exact sign-flip test cannot go below 2/2^n (1/16 = 0.0625 with 5 seeds): it "
        "cannot reach p < 0.05 with 5 seeds, whatever the data.",
    ]
    return "\n".join(lines) + "\n"


def _grid_table(grid, best) -> str:
    lines = [
        "",
        "## Every grid point",
        "",
        "| algo | lr | critic lr | seeds finished | final held-out success | held-out AUC | "
        "training-success AUC | selected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, points in grid.items():
        for lr, rs in points.items():
            done = [r for r in rs if r.finished]
            critic = f"{rs[0].cfg.critic_lr:g}" if rs[0].cfg.uses_critic else "-"
            lines.append(
                f"| {algo} | {lr:g} | {critic} | {len(done)}/{len(rs)} "
                f"| {_ci([r.final for r in done])} | {_ci([r.eval_auc for r in done])} "
                f"| {_ci([r.train_auc for r in done])} | {'yes' if lr == best[algo] else ''} |"
            )
    return "\n".join(lines) + "\n"
