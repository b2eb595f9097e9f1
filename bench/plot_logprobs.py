"""Plots for bench_logprobs.py: workspace vs M and time / 4-GEMM floor vs M, per implementation.

Reads ``bench/results/logprobs.json`` (and ``logprobs_memory.json`` when present, the large-M
steppo_fast rows) and writes ``bench/results/logprobs_memory.png`` and
``bench/results/logprobs_time.png``. One line per (implementation, H); skipped runs are absent.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STYLE = {"naive": "tab:red", "liger": "tab:orange", "cce": "tab:blue", "steppo_fast": "tab:green"}


def load_rows() -> tuple[list[dict], dict]:
    rows, meta = [], {}
    for name in ("logprobs.json", "logprobs_headline.json", "logprobs_memory.json"):
        path = os.path.join(RESULTS, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            meta = meta or data
            rows += [r for r in data["rows"] if r.get("status") == "ok"]
    return rows, meta


def series(rows: list[dict], key: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    out: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        if r.get(key) is None or r["impl"] not in STYLE:
            continue
        out.setdefault((r["impl"], r["H"]), {})[r["M"]] = r[key]  # later files win
    return {k: sorted(v.items()) for k, v in out.items()}


def plot(rows, meta, key: str, ylabel: str, path: str, logy: bool) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (impl, h), pts in sorted(series(rows, key).items()):
        xs, ys = zip(*pts)
        style = "-" if h == 512 else ("--" if h == 1024 else ":")
        ax.plot(xs, ys, style, marker="o", color=STYLE[impl], label=f"{impl} H={h}")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("M (rows = action tokens)")
    ax.set_ylabel(ylabel)
    machine = meta.get("machine", {})
    ax.set_title(
        f"fused linear log-prob, V=151936, fp32, fwd+bwd\n{machine.get('cpu', '?')}, "
        f"{machine.get('cores', '?')} cores, commit {meta.get('commit', '?')}, "
        f"{meta.get('date', '?')[:10]}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)


def main() -> None:
    rows, meta = load_rows()
    if not rows:
        raise SystemExit("no results: run bench/bench_logprobs.py first")
    plot(
        rows,
        meta,
        "workspace_MB",
        "workspace (MB, peak RSS - inputs - grads)",
        os.path.join(RESULTS, "logprobs_memory.png"),
        logy=True,
    )
    plot(
        rows,
        meta,
        "x_floor",
        "time / 4-GEMM floor (same run)",
        os.path.join(RESULTS, "logprobs_time.png"),
        logy=False,
    )


if __name__ == "__main__":
    main()
