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


COMPARE_PANELS = (
    ("eval_success_rate", "held-out success (greedy)"),
    ("success_rate", "training success (sampled)"),
)


def band(values: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the 95% t interval of ``values`` (one value: no band)."""
    from .stats import t_interval

    return t_interval(values)


def plot_compare(curves: dict[str, list[list[dict]]], path: str, title: str) -> None:
    """One row per metric of :data:`COMPARE_PANELS`: for each label (an algorithm at its
    selected learning rate) the mean over its runs (seeds) and the 95% t interval band, against
    the iteration (left) and the wall time (right: mean over seeds of the wall seconds at that
    iteration)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(COMPARE_PANELS), 2, figsize=(10, 3.2 * len(COMPARE_PANELS)))
    for row, (key, label) in zip(axes, COMPARE_PANELS):
        for name, runs in curves.items():
            values: dict[int, list[float]] = {}
            walls: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if r.get(key) is not None:
                        values.setdefault(r["iter"], []).append(r[key])
                        walls.setdefault(r["iter"], []).append(r["wall_s"])
            its = sorted(values)
            if not its:
                continue
            mean, low, high = zip(*(band(values[i]) for i in its))
            wall = [sum(walls[i]) / len(walls[i]) for i in its]
            for ax, x in zip(row, (its, wall)):
                (line,) = ax.plot(x, mean, label=name)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        row[0].set_xlabel("iteration", fontsize=8)
        row[1].set_xlabel("wall time (s, mean over seeds)", fontsize=8)
        for ax in row:
            ax.set_ylabel(label, fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
