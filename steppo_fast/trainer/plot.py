"""Learning-curve figures (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
import math

from .runfiles import atomic_write_bytes

PANELS = (
    ("success_rate", "success rate (train rollouts, sampled)"),
    ("eval_success_rate", "success rate (held-out seeds)"),
    ("mean_return", "mean return"),
    ("episode_len", "episode length (steps)"),
    ("policy_loss", "policy loss"),
    ("value_loss", "value loss"),
    ("entropy", "entropy (per action token)"),
    ("kl", "approx KL(old || new)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())


def plot_run(rows: list[dict], path: str, title: str = "") -> None:
    """One panel per metric of :data:`PANELS` (those present) against the iteration."""
    plt = _pyplot()
    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    if not panels:
        return
    cols = 4
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["iter"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("iteration", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_compare(curves: dict[str, list[list[dict]]], path: str, key: str, title: str) -> None:
    """Mean +- std over seeds of ``key`` (per iteration where present) for each algorithm;
    x axis = iteration (left) and wall seconds (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for algo, runs in curves.items():
        by_iter: dict[int, list[float]] = {}
        by_iter_wall: dict[int, list[float]] = {}
        for rows in runs:
            for r in rows:
                if r.get(key) is not None:
                    by_iter.setdefault(r["iter"], []).append(r[key])
                    by_iter_wall.setdefault(r["iter"], []).append(r["wall_s"])
        its = sorted(by_iter)
        if not its:
            continue
        mean = [sum(by_iter[i]) / len(by_iter[i]) for i in its]
        std = [_std(by_iter[i]) for i in its]
        wall = [sum(by_iter_wall[i]) / len(by_iter_wall[i]) for i in its]
        for ax, x in zip(axes, (its, wall)):
            (line,) = ax.plot(x, mean, label=algo)
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=line.get_color(),
                alpha=0.2,
            )
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time (s, mean over seeds)")
    for ax in axes:
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
