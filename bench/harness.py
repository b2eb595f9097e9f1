"""Shared bench harness: machine/commit/date metadata, best-of-N timing, peak-RSS workspace,
copy bandwidth, and JSON results in ``bench/results/``.

Every bench script prints a table and calls :func:`write_results` so results carry the
machine, commit and date they were measured on.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(RESULTS_DIR),
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(RESULTS_DIR),
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
    }


def metadata() -> dict:
    return {
        "machine": machine_info(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def best_time(fn: Callable[[], object], *, reps: int = 3, warmup: int = 1) -> float:
    """Best wall time in seconds of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def measure_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn`` once; return its result and the peak RSS growth (bytes) above the RSS at the
    start. Results that ``fn`` returns are counted (they are alive at the peak)."""
    import gc

    gc.collect()
    reset_peak_rss()
    base = rss_bytes()
    out = fn()
    return out, max(0, peak_rss_bytes() - base)


def copy_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Machine copy bandwidth in bytes/s (read + write counted) with torch's parallel copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), reps=reps)
    return 2 * nbytes / t


def write_results(name: str, rows: list[dict], **extra) -> str:
    """Write ``bench/results/<name>.json`` with metadata; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**metadata(), **extra, "rows": rows}, f, indent=1)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


class cpu_hogs:  # noqa: N801  (used as a context manager, like contextlib helpers)
    """Context manager: ``n`` background processes spinning ``while 1: pass`` (one per core
    loads the machine as other users' jobs do). Killed by their own pids on exit; ``n = 0``
    does nothing. The 1-minute loadavg lags: give it a few seconds before reading it."""

    def __init__(self, n: int, settle_s: float = 2.0):
        self.n, self.settle_s, self.procs = n, settle_s, []

    def __enter__(self) -> cpu_hogs:
        import sys

        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while 1: pass"]))
        if self.n:
            time.sleep(self.settle_s)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def time_stats(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1) -> dict:
    """Min and median wall time (s) of ``reps`` calls after ``warmup`` calls. On a loaded
    machine the median shows stalls that the best-of hides."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"min": times[0], "median": times[len(times) // 2]}
