"""One vs two threads in the C++ kernels, idle or loaded: where a second thread pays off.

For each kernel (the raw ``torch.ops.steppo_fast`` op, no Python validation) and input size
n, times the op on 1 thread (``steppo_fast.cpp.set_num_threads(1)``) and on 2 threads with
the parallel thresholds disabled (``_C._set_parallel_min(0)``: every call opens an OpenMP
region), and on 2 threads with the kernels' own thresholds (what users get by default).
``--hogs N`` runs N background ``while 1: pass`` processes for the whole measurement (one per
core = a loaded machine). Reports min and median of the reps: under load the median shows the
stalls (a region waits for its second thread to be scheduled) that the min hides.

Kernels (fp32, int32 offsets; trajectories of 32 steps, steps of 4..60 action tokens):

- ``scan``: ``step_gae`` over n steps;
- ``whiten``: ``whiten`` of n entries;
- ``broadcast``: ``segment_broadcast`` of n/32 step values to n tokens;
- ``segsum``: ``segment_sum`` of n tokens into n/32 steps;
- ``loss``: ``step_policy_loss`` (step ratio, step-mean) over n tokens, with d/d logp.

Usage: ``python bench/bench_threads.py [--hogs 2] [--name NAME] [--kernels scan,whiten]``.
Writes ``NAME.json`` in bench/results/ (default NAME: ``threads_idle``, or ``threads_loaded``
with hogs).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import steppo_fast.cpp as sfc  # noqa: E402
from bench.harness import cpu_hogs, machine_info, print_table, time_stats, write_results  # noqa: E402
from steppo_fast import _C  # noqa: E402
from steppo_fast._defs import StepLossOptions  # noqa: E402

SIZES = [1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
KERNELS = ("scan", "whiten", "broadcast", "segsum", "loss")


def _cu_steps(num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Step offsets of about num_tokens tokens, steps of 4..60 tokens, ending exactly at n."""
    lengths = torch.randint(4, 61, (num_tokens // 32 + 1,), generator=gen)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    cu = cu[cu <= num_tokens]
    if int(cu[-1]) != num_tokens:
        cu = torch.cat([cu, torch.tensor([num_tokens])])
    return cu.to(torch.int32)


def make_call(kernel: str, n: int):
    """A zero-argument callable running ``kernel`` on inputs of size n."""
    gen = torch.Generator().manual_seed(0)
    ops = torch.ops.steppo_fast
    if kernel == "scan":
        r, v = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        cu = torch.arange(0, n + 1, 32, dtype=torch.int32)
        if int(cu[-1]) != n:
            cu = torch.cat([cu, torch.tensor([n], dtype=torch.int32)])
        return lambda: ops.step_gae(r, v, cu, 0.99, 0.95, None)
    if kernel == "whiten":
        x = torch.randn(n, generator=gen)
        return lambda: ops.whiten(x, None, 1e-8)
    cu = _cu_steps(n, gen)
    steps = cu.numel() - 1
    if kernel == "broadcast":
        y = torch.randn(steps, generator=gen)
        return lambda: ops.segment_broadcast(y, cu)
    if kernel == "segsum":
        x = torch.randn(n, generator=gen)
        return lambda: ops.segment_sum(x, cu)
    if kernel == "loss":
        logp = -torch.rand(n, generator=gen)
        old = logp + 0.05 * torch.randn(n, generator=gen)
        adv = torch.randn(steps, generator=gen)
        cu_trajs = torch.arange(0, steps + 1, 32, dtype=torch.int32)
        if int(cu_trajs[-1]) != steps:
            cu_trajs = torch.cat([cu_trajs, torch.tensor([steps], dtype=torch.int32)])
        opts = StepLossOptions().scalars()
        return lambda: ops.step_policy_loss(logp, old, adv, cu, cu_trajs, None, None, *opts, True)
    raise ValueError(f"--kernels: unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")


def measure(fn, budget_s: float) -> dict:
    probe = time_stats(fn, reps=1)["min"]
    reps = int(min(200, max(5, budget_s / max(probe, 1e-6))))
    return time_stats(fn, reps=reps)


def run(kernels, sizes, budget_s: float) -> list[dict]:
    rows = []
    for kernel in kernels:
        for n in sizes:
            fn = make_call(kernel, n)
            row = {"kernel": kernel, "n": n}
            with sfc.num_threads(1):
                one = measure(fn, budget_s)
            _C._set_parallel_min(0)
            try:
                with sfc.num_threads(2):
                    two = measure(fn, budget_s)
            finally:
                _C._set_parallel_min(-1)
            with sfc.num_threads(2):
                auto = measure(fn, budget_s)
            row.update(
                t1_med_us=1e6 * one["median"],
                t2_med_us=1e6 * two["median"],
                auto_med_us=1e6 * auto["median"],
                t1_min_us=1e6 * one["min"],
                t2_min_us=1e6 * two["min"],
                speedup_med=one["median"] / two["median"],
                speedup_min=one["min"] / two["min"],
                loadavg=os.getloadavg()[0],
            )
            rows.append(row)
            print_table([row])
    return rows


def crossovers(rows) -> dict:
    """Per kernel: the smallest n from which 2 threads beat 1 (median) at every larger n."""
    out = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ks = [r for r in rows if r["kernel"] == kernel]
        n_cross = None
        for r in reversed(ks):
            if r["speedup_med"] > 1.0:
                n_cross = r["n"]
            else:
                break
        out[kernel] = n_cross
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hogs", type=int, default=0, help="background busy processes")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--name", default=None, help="results file name (no .json)")
    args = parser.parse_args()
    kernels = [k for k in args.kernels.split(",") if k]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for k in kernels:
        make_call(k, 64)  # reject unknown names before starting
    load_start = os.getloadavg()
    print(f"machine: {machine_info()}")
    with cpu_hogs(args.hogs):
        load_hogs = os.getloadavg()
        rows = run(kernels, sizes, args.budget)
        load_end = os.getloadavg()
    print()
    print_table(rows)
    cross = crossovers(rows)
    print("2 threads beat 1 (median) from n =", cross)
    name = args.name or ("threads_loaded" if args.hogs else "threads_idle")
    path = write_results(
        name,
        rows,
        hogs=args.hogs,
        crossover_n=cross,
        budget_s=args.budget,
        loadavg_start=load_start,
        loadavg_with_hogs=load_hogs,
        loadavg_end=load_end,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
