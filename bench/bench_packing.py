"""Host-side packing throughput: StepBatch.from_trajectories and microbatches.

Workload (default): 1024 trajectories x 32 steps; step 0's prompt has 100 tokens, each next
prompt = previous prompt + previous action (20 tokens) + 80 observation tokens, so prompts grow
by 100 tokens per step (the merged layout applies to every step).

Two record flavours:
- ``shared``: prompts built by list concatenation (how a Python agent loop usually builds the
  context: the int objects are shared between steps, so list comparison is pointer-fast);
- ``fresh``: every prompt is a new list of new int objects (as returned by a tokenizer or an
  inference engine), which makes the O(sum of prompt lengths) prefix comparison ~7x dearer.

Rows measured (best of --reps, wall and process CPU time; the machine is shared, so CPU time
is the steadier number): a naive numpy baseline (per-step ``np.asarray`` + ``np.array_equal``
prefix test + ``np.concatenate``); the two floors of any implementation that takes Python lists
(the prefix slices + comparisons alone, converting the kept ids alone); the package path split
into stages (record reading, CSR with numpy and with numba, the whole ``from_trajectories``);
and micro-batching of trajectories of 1..steps steps (FFD plan with numpy / numba, contiguous,
whole ``microbatches`` calls).

Usage: python bench/bench_packing.py [--trajs 1024] [--steps 32] [--fresh-trajs 256]
       [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from array import array

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import measure_peak, print_table, write_results  # noqa: E402
from steppo_fast.batch import (  # noqa: E402
    StepBatch,  # noqa: E402
    microbatch,
    packing,
    packing_numba,
    records,
)


def make_trajectories(
    num_trajs,
    num_steps,
    *,
    prompt0=100,
    action=20,
    obs=80,
    vocab=32000,
    fresh=False,
    seed=0,
    vary_steps=False,
):
    rng = np.random.default_rng(seed)
    trajs = []
    for b in range(num_trajs):
        context = rng.integers(0, vocab, prompt0)
        prompt = context.tolist()
        steps = []
        for _t in range(int(rng.integers(1, num_steps + 1)) if vary_steps else num_steps):
            act = rng.integers(0, vocab, action)
            steps.append(
                {
                    "prompt_ids": context.tolist() if fresh else prompt,
                    "action_ids": act.tolist(),
                    "reward": float(rng.standard_normal()),
                    "logprobs": (-rng.random(action)).tolist(),
                }
            )
            new_obs = rng.integers(0, vocab, obs)
            if fresh:
                context = np.concatenate([context, act, new_obs])
            else:
                prompt = prompt + steps[-1]["action_ids"] + new_obs.tolist()
        trajs.append({"steps": steps, "terminated": bool(b % 2), "group": b // 8})
    return trajs


def naive_pack(trajs, merge: bool):
    """Baseline: per-step numpy arrays, numpy prefix test, one concatenate at the end."""
    pieces, lps, new_len, act_len, starts = [], [], [], [], []
    for traj in trajs:
        prev = None
        for step in traj["steps"]:
            p = np.asarray(step["prompt_ids"], dtype=np.int64)
            a = np.asarray(step["action_ids"], dtype=np.int64)
            lps.append(np.asarray(step["logprobs"], dtype=np.float32))
            if (
                merge
                and prev is not None
                and p.size >= prev.size
                and np.array_equal(p[: prev.size], prev)
            ):
                pieces.append(p[prev.size :])
                new_len.append(p.size - prev.size)
                starts.append(False)
            else:
                pieces.append(p)
                new_len.append(p.size)
                starts.append(True)
            pieces.append(a)
            act_len.append(a.size)
            prev = np.concatenate([p, a])
    tokens = np.concatenate(pieces)
    step_end = np.cumsum(np.asarray(new_len) + np.asarray(act_len))
    return tokens, step_end, np.concatenate(lps), np.asarray(starts)


def timed(fn, reps):
    """(best wall seconds, best CPU seconds of this process) over ``reps`` calls after a warmup.
    CPU time is reported because the bench machine is shared (see loadavg in the results)."""
    fn()
    wall = cpu = float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def prefix_compare_only(trajs):
    """The floor of the merged layout: the list slices + comparisons of the prefix test."""
    for traj in trajs:
        prev = None
        for step in traj["steps"]:
            p, a = step["prompt_ids"], step["action_ids"]
            if prev is not None:
                n, m = len(prev[0]), len(prev[0]) + len(prev[1])
                _ = p[:n] == prev[0] and p[n:m] == prev[1]
            prev = (p, a)


def convert_only(trajs, merged):
    """The other floor: converting the ids that end up in the batch (array.fromlist)."""
    tokens, lps = array("q"), array("f")
    for traj in trajs:
        context = 0  # tokens already in the sequence (merged layout)
        for step in traj["steps"]:
            p, a = step["prompt_ids"], step["action_ids"]
            tokens.fromlist(p[context:] if context else p)
            tokens.fromlist(a)
            lps.fromlist(step["logprobs"])
            context = len(p) + len(a) if merged else 0


def bench_layout(name, trajs, layout, reps):
    num_steps = sum(len(t["steps"]) for t in trajs)
    rows = []

    def row(stage, fn, **extra):
        wall, cpu = timed(fn, reps)
        rows.append(
            {
                "records": name,
                "layout": layout,
                "stage": stage,
                "wall_ms": wall * 1e3,
                "cpu_ms": cpu * 1e3,
                "steps_per_s_wall": num_steps / wall,
                "steps_per_s_cpu": num_steps / cpu,
                **extra,
            }
        )

    if layout != "auto":
        row("naive numpy baseline", lambda: naive_pack(trajs, layout == "merged"))
    if layout == "merged":
        row("floor: prefix compare only", lambda: prefix_compare_only(trajs))
    if layout != "auto":
        row("floor: id conversion only", lambda: convert_only(trajs, layout == "merged"))
    row("read_records", lambda: records.read_records(trajs, layout))
    recs = records.read_records(trajs, layout)
    row("csr numpy", lambda: packing.csr_numpy(recs))
    if packing_numba.numba_available():
        row("csr numba", lambda: packing_numba.csr_numba(recs))
    for use_numba in (False, True):
        if use_numba and not packing_numba.numba_available():
            continue

        def build(u=use_numba):
            return StepBatch._from_records(trajs, layout, use_numba=u)

        batch, peak = measure_peak(build)
        row(
            f"from_trajectories ({'numba' if use_numba else 'numpy'} csr)",
            build,
            tokens=batch.num_tokens,
            seqs=batch.num_seqs,
            peak_mb=peak / 2**20,
        )
    return rows, batch


def bench_microbatches(name, batch, max_tokens, reps):
    sizes = batch.traj_token_offsets.diff().numpy()
    rows = []

    def row(stage, fn, bins):
        wall, cpu = timed(fn, reps)
        rows.append(
            {
                "records": name,
                "stage": stage,
                "wall_ms": wall * 1e3,
                "cpu_ms": cpu * 1e3,
                "bins": bins,
                "max_tokens": max_tokens,
                "fill": float(sizes.sum()) / (bins * max_tokens),
            }
        )

    num_ffd = len(microbatch.plan_ffd_numpy(sizes, max_tokens))
    row("plan ffd numpy", lambda: microbatch.plan_ffd_numpy(sizes, max_tokens), num_ffd)
    if packing_numba.numba_available():
        row("plan ffd numba", lambda: microbatch.plan_ffd(sizes, max_tokens, True), num_ffd)
    num_contiguous = len(microbatch.plan_contiguous(sizes, max_tokens))
    row("plan contiguous", lambda: microbatch.plan_contiguous(sizes, max_tokens), num_contiguous)
    row("microbatches(ffd) total", lambda: batch.microbatches(max_tokens), num_ffd)
    row(
        "microbatches(contiguous) total",
        lambda: batch.microbatches(max_tokens, method="contiguous"),
        num_contiguous,
    )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trajs", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--fresh-trajs", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.trajs, args.steps, args.fresh_trajs, args.reps = 64, 8, 16, 1
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    rows = []
    t0 = time.perf_counter()
    shared = make_trajectories(args.trajs, args.steps)
    print(f"generated {args.trajs}x{args.steps} shared records in {time.perf_counter() - t0:.1f}s")
    for layout in ("merged", "auto", "rows"):
        rows += bench_layout(f"shared {args.trajs}x{args.steps}", shared, layout, args.reps)[0]
    del shared
    fresh = make_trajectories(args.fresh_trajs, args.steps, fresh=True, seed=1)
    for layout in ("merged", "rows"):
        rows += bench_layout(f"fresh {args.fresh_trajs}x{args.steps}", fresh, layout, args.reps)[0]
    del fresh
    # micro-batching: trajectories of 1..steps steps (sizes vary), merged layout
    varied = make_trajectories(args.trajs, args.steps, vary_steps=True, seed=2)
    batch = StepBatch.from_trajectories(varied, layout="merged")
    del varied
    budget = 2 * int(batch.traj_token_offsets.diff().max())
    mb_rows = bench_microbatches(f"varied {args.trajs}x1..{args.steps}", batch, budget, args.reps)

    columns = [
        "records",
        "layout",
        "stage",
        "wall_ms",
        "cpu_ms",
        "steps_per_s_wall",
        "steps_per_s_cpu",
        "tokens",
        "seqs",
        "peak_mb",
    ]
    print_table(rows, columns)
    print()
    print_table(mb_rows, ["records", "stage", "wall_ms", "cpu_ms", "bins", "max_tokens", "fill"])
    if not args.quick:
        load_end = os.getloadavg()
        path = write_results(
            "packing",
            rows + mb_rows,
            config=vars(args),
            numba=packing_numba.numba_available(),
            loadavg_start=load_start,
            loadavg_end=load_end,
        )
        print(f"\nwrote {path} (loadavg 1m: start {load_start[0]:.2f}, end {load_end[0]:.2f})")


if __name__ == "__main__":
    main()
