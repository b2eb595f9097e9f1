"""Table, fitted lines and plot of ``bench/results/long_context.json``.

Per method: the measured rows (workspace of the whole update, of forward + backward alone, wall
time), a least-squares line ``fwd_bwd_workspace = a + b * tokens`` over its measured 32-turn
points from 4k tokens on (all its points when fewer than two; ``b``: bytes per token; labelled
*fitted*; none for (a), whose workspace is set by its micro-batch of rows), the longest
measured context within 4 / 8 / 16 GiB of workspace, and the context the fitted line predicts
for each budget (labelled *fitted*, never presented as measured). Prints Markdown; writes
``bench/results/long_context.png``.
"""

from __future__ import annotations

import json
import os
import sys

GIB = 1 << 30
NAMES = {
    "a": "(a) StepPO ref.: rows, full logits",
    "b": "(b) verl multi-turn: merged, full logits",
    "c": "(c) steppo_fast: merged, action-only log-probs",
    "d": "(d) (c) + checkpointing",
    "d16": "(d) + bf16",
}


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of y = a + b x; None with fewer than 2 distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    m = data["machine"]
    print(
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {data['threads']} thread; "
        f"commit {data['commit']}, {data['date']}, loadavg at start {data['loadavg_start']}"
    )
    print()
    print(
        "| method | turns | context | tokens fed | status | workspace GiB | fwd+bwd GiB "
        "| s/update |"
    )
    print("|---|---|---|---|---|---|---|---|")
    bases = sorted(r["base_rss"] for r in rows if r["status"] == "ok")
    base = bases[len(bases) // 2] if bases else 0  # RSS before the update (same in every run)
    for r in rows:
        ok = r["status"] == "ok"
        # a run killed at the RSS limit needed more than limit - base of workspace
        ws = f"{r['workspace'] / GIB:.2f}" if ok else f"> {(r['max_rss'] - base) / GIB:.1f}"
        fb = f"{r['fwd_bwd_workspace'] / GIB:.2f}" if ok else "-"
        t = f"{r['wall_s']:.0f} ({r['cores_used']:.2f} cores)" if ok else "-"
        tokens = r.get("tokens", "-")
        print(
            f"| {NAMES.get(r['method'], r['method'])} | {r['turns']} | {r['context']} | "
            f"{tokens} | {r['status']} | {ws} | {fb} | {t} |"
        )
    print()
    print(
        "| method | fitted fwd+bwd bytes/token | longest measured within 4 / 8 / 16 GiB | "
        "fitted longest within 4 / 8 / 16 GiB |"
    )
    print("|---|---|---|---|")
    fits = {}
    for method in NAMES:
        mine = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        if not mine:
            continue
        # the fit: turns = 32 rows; from 4k tokens on when there are two such points (below,
        # the context-independent [V, H] gradient temporaries set the peak); none for (a),
        # whose workspace is set by its micro-batch of rows, not by the trajectory's tokens
        pts = [(r["tokens"], r["fwd_bwd_workspace"]) for r in mine if r["turns"] == 32]
        big = [pt for pt in pts if pt[0] >= 4096]
        line = None if method == "a" else fit(big if len(big) >= 2 else pts)
        fits[method] = line
        measured = []
        fitted = []
        for budget in (4, 8, 16):
            within = [r["context"] for r in mine if r["workspace"] <= budget * GIB]
            measured.append(str(max(within)) if within else "none")
            if line and line[1] > 0:
                # tokens fed grow with the context as in the measured rows (rows layout: ~T/2 x)
                ratio = mine[-1]["tokens"] / mine[-1]["context"]
                step_ws = max(r["step_workspace"] for r in mine)
                room = budget * GIB - max(line[0], 0)
                ctx = int(room / line[1] / ratio) if budget * GIB > step_ws else 0
                fitted.append(f"{ctx:,}")
            else:
                fitted.append("-")
        slope = f"{line[1]:,.0f}" if line else "-"
        print(f"| {NAMES[method]} | {slope} | {' / '.join(measured)} | {' / '.join(fitted)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, label in NAMES.items():
        mine = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        if not mine:
            continue
        mine = sorted(mine, key=lambda r: (r["turns"], r["context"]))
        xs = [r["context"] for r in mine]
        axes[0].plot(xs, [r["workspace"] / GIB for r in mine], "o-", label=label)
        axes[1].plot(xs, [r["wall_s"] for r in mine], "o-", label=label)
    axes[0].set(
        xlabel="context tokens per trajectory",
        ylabel="workspace GiB (measured)",
        xscale="log",
        title="one update: memory beyond params/grads/AdamW",
    )
    axes[1].set(
        xlabel="context tokens per trajectory",
        ylabel="wall s (shared, loaded CPU)",
        xscale="log",
        yscale="log",
        title="one update: time",
    )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(f"\n{out}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results", "long_context.json"))
