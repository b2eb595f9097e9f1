"""Advantage pipeline on CPU: step GAE -> whiten over steps -> broadcast to action tokens.

Compares, on the same rollout data and checking the same outputs:

- ``loop (StepPO layout)``: the StepPO reference data layout, written here from its
  description: one padded row per step ([R, L] token rewards / critic values / response mask,
  string trajectory ids, step indices), a dense (trajectory, step) table built with
  ``np.unique``, a Python loop over the step index, whitening over step rows, and the
  broadcast ``adv[:, None] * response_mask`` to padded tokens;
- ``torch``: steppo_fast's public ops with ``impl="torch"`` (the vectorised reference);
- ``cpp``: the public ops with ``impl="cpp"`` (C++/OpenMP; includes argument validation);
- ``cpp raw``: the same three ``torch.ops.steppo_fast`` calls without the Python validation.

The bandwidth floor of a size is the bytes that any implementation must move (read rewards,
values [S] fp32, cu_trajs [B+1], cu_steps [S+1] int32; write token advantages [A] and step
returns [S] fp32) divided by the machine's copy bandwidth measured in the same run.

Usage: ``python bench/bench_advantages.py [--quick] [--threads N] [--max-loop-rows N]
[--hogs N] [--name NAME]``. ``--hogs N`` keeps N background ``while 1: pass`` processes
running during the measurement (one per core: a loaded machine). Prints a table, writes
``NAME.json`` and ``NAME.png`` in bench/results/ (default NAME: ``advantages``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import steppo_fast as sf  # noqa: E402
from bench.harness import (  # noqa: E402
    RESULTS_DIR,
    best_time,
    copy_bandwidth,
    cpu_hogs,
    machine_info,
    print_table,
    time_stats,
    write_results,
)

GAMMA, LAM, EPS = 0.99, 0.95, 1e-8
SIZES = [(128, 8), (512, 16), (1024, 32), (2048, 32), (8192, 32), (32768, 32), (65536, 32)]


# ------------------------------------------------------------------------------ rollout data
def make_rollout(num_trajs: int, steps: int, min_tokens: int, max_tokens: int, seed: int = 0):
    """CSR rollout: every trajectory has ``steps`` steps, each step min..max action tokens."""
    gen = torch.Generator().manual_seed(seed)
    num_steps = num_trajs * steps
    tokens = torch.randint(min_tokens, max_tokens + 1, (num_steps,), generator=gen)
    cu_steps = torch.zeros(num_steps + 1, dtype=torch.int32)
    cu_steps[1:] = tokens.cumsum(0)
    cu_trajs = torch.arange(0, num_steps + 1, steps, dtype=torch.int32)
    rewards = (torch.rand(num_steps, generator=gen) < 0.1).float()  # sparse step rewards
    values = torch.randn(num_steps, generator=gen) * 0.5
    return dict(rewards=rewards, values=values, cu_trajs=cu_trajs, cu_steps=cu_steps, tokens=tokens)


def to_row_layout(data: dict, pad_len: int, seed: int = 0):
    """The same rollout as StepPO-style padded rows: one row per step, in (trajectory, step)
    order, response padded to ``pad_len``; the step reward sits on the step's last action
    token and the step value on column 0 (the critic reads the whole row)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, rewards, values = data["tokens"], data["rewards"], data["values"]
    rows = tokens.numel()
    steps = int(data["cu_trajs"][1]) if data["cu_trajs"].numel() > 1 else 0
    mask = (torch.arange(pad_len)[None, :] < tokens[:, None]).float()
    token_rewards = torch.zeros(rows, pad_len)
    token_rewards[torch.arange(rows), tokens - 1] = rewards
    row_values = torch.randn(rows, pad_len, generator=gen)
    row_values[:, 0] = values
    traj_names = np.array(
        [f"traj-{i:08d}-{(i * 2654435761) % 10**9:09d}" for i in range(rows // max(steps, 1))],
        dtype=object,
    )
    trajectory_uids = np.repeat(traj_names, steps)
    step_indices = np.tile(np.arange(steps), rows // max(steps, 1))
    return dict(
        token_rewards=token_rewards,
        values=row_values,
        response_mask=mask,
        trajectory_uids=trajectory_uids,
        step_indices=step_indices,
    )


# ----------------------------------------------------------------------- the three pipelines
def loop_steppo_layout(token_rewards, values, response_mask, trajectory_uids, step_indices):
    """Step GAE in the StepPO row layout (own implementation of the described algorithm)."""
    with torch.no_grad():
        step_reward = (token_rewards * response_mask).sum(dim=1)
        step_value = values[:, 0]
        _, traj_of_row = np.unique(trajectory_uids, return_inverse=True)
        traj = torch.as_tensor(traj_of_row.reshape(-1), dtype=torch.long)
        step = torch.as_tensor(step_indices, dtype=torch.long)
        num_trajs, horizon = int(traj.max()) + 1, int(step.max()) + 1
        reward_table = torch.zeros(num_trajs, horizon)
        value_table = torch.zeros(num_trajs, horizon)
        reward_table[traj, step] = step_reward
        value_table[traj, step] = step_value
        running = torch.zeros(num_trajs)
        columns = []
        for t in reversed(range(horizon)):  # Python loop over the step index
            next_value = value_table[:, t + 1] if t + 1 < horizon else 0.0
            delta = reward_table[:, t] + GAMMA * next_value - value_table[:, t]
            running = delta + GAMMA * LAM * running
            columns.append(running)
        adv_table = torch.stack(columns[::-1], dim=1)
        adv = adv_table[traj, step]
        ret = adv + step_value
        adv = (adv - adv.mean()) / (adv.std() + EPS)  # whiten over step rows
        return adv[:, None] * response_mask, ret[:, None] * response_mask


def pipeline_public(data, impl):
    adv, ret = sf.step_gae(
        data["rewards"], data["values"], data["cu_trajs"], gamma=GAMMA, lam=LAM, impl=impl
    )
    adv = sf.whiten(adv, eps=EPS, impl=impl)
    return sf.segment_broadcast(adv, data["cu_steps"], impl=impl), ret


def pipeline_raw(data):
    ops = torch.ops.steppo_fast
    adv, ret = ops.step_gae(data["rewards"], data["values"], data["cu_trajs"], GAMMA, LAM, None)
    adv = ops.whiten(adv, None, EPS)
    return ops.segment_broadcast(adv, data["cu_steps"]), ret


def check_same(name, token_adv, step_ret, want_token_adv, want_step_ret):
    """Outputs agree within fp32 rounding (fp32 tolerance, as the tests use)."""
    torch.testing.assert_close(token_adv, want_token_adv, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(step_ret, want_step_ret, atol=1e-5, rtol=1e-5, msg=name)


# -------------------------------------------------------------------------------- benchmark
def floor_bytes(num_trajs, num_steps, num_tokens) -> int:
    reads = 4 * (2 * num_steps + (num_trajs + 1) + (num_steps + 1))
    writes = 4 * (num_tokens + num_steps)
    return reads + writes


def run(sizes, min_tokens, max_tokens, pad_len, max_loop_rows, reps, bandwidth):
    print(f"machine: {machine_info()}")
    rows = []
    for num_trajs, steps in sizes:
        data = make_rollout(num_trajs, steps, min_tokens, max_tokens)
        num_steps, num_tokens = data["rewards"].numel(), int(data["cu_steps"][-1])
        want_adv, want_ret = pipeline_public(data, "torch")
        got_adv, got_ret = pipeline_public(data, "cpp")
        check_same("cpp vs torch", got_adv, got_ret, want_adv, want_ret)
        check_same("cpp raw vs torch", *pipeline_raw(data), want_adv, want_ret)
        row = dict(trajs=num_trajs, steps=steps, S=num_steps, A=num_tokens)
        cpp = time_stats(lambda d=data: pipeline_public(d, "cpp"), reps=reps)
        row["cpp_ms"], row["cpp_med_ms"] = 1e3 * cpp["min"], 1e3 * cpp["median"]
        row["cpp_raw_ms"] = 1e3 * best_time(lambda d=data: pipeline_raw(d), reps=reps)
        threads = torch.get_num_threads()
        if threads > 1:  # the same on one thread: stable when other processes load the cores
            torch.set_num_threads(1)
            one = time_stats(lambda d=data: pipeline_public(d, "cpp"), reps=reps)
            row["cpp_1t_ms"], row["cpp_1t_med_ms"] = 1e3 * one["min"], 1e3 * one["median"]
            torch.set_num_threads(threads)
        row["torch_ms"] = 1e3 * best_time(lambda d=data: pipeline_public(d, "torch"), reps=reps)
        if num_steps <= max_loop_rows:
            layout = to_row_layout(data, pad_len)
            mask = layout["response_mask"].bool()
            t0 = time.perf_counter()
            loop_adv, loop_ret = loop_steppo_layout(**layout)
            first = time.perf_counter() - t0
            check_same("loop vs cpp", loop_adv[mask], loop_ret[:, 0], got_adv, got_ret)
            loop_reps = reps if first < 2.0 else 1
            row["loop_ms"] = 1e3 * min(
                first,
                best_time(lambda rl=layout: loop_steppo_layout(**rl), reps=loop_reps, warmup=0),
            )
            row["loop/cpp"] = row["loop_ms"] / row["cpp_ms"]
            del layout, loop_adv, loop_ret, mask
        else:
            row["loop_ms"] = float("nan")
            row["loop/cpp"] = float("nan")
        row["floor_ms"] = 1e3 * floor_bytes(num_trajs, num_steps, num_tokens) / bandwidth
        row["cpp/floor"] = row["cpp_ms"] / row["floor_ms"]
        row["raw/floor"] = row["cpp_raw_ms"] / row["floor_ms"]
        row["torch/cpp"] = row["torch_ms"] / row["cpp_ms"]
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)
        print_table([row])
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["S"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in [
        ("loop_ms", "loop, StepPO row layout"),
        ("torch_ms", "steppo_fast torch"),
        ("cpp_ms", "steppo_fast cpp"),
        ("cpp_raw_ms", "cpp ops, no validation"),
        ("cpp_1t_ms", "steppo_fast cpp, 1 thread"),
        ("floor_ms", "bandwidth floor"),
    ]:
        if not any(key in r for r in rows):
            continue
        xs = [s for s, r in zip(steps, rows) if r.get(key, float("nan")) == r.get(key)]
        ys = [r[key] for r in rows if r.get(key, float("nan")) == r.get(key)]
        ax.plot(xs, ys, "--" if key == "floor_ms" else "-o", label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps S (trajectories x steps per trajectory)")
    ax.set_ylabel("time (ms), best of reps")
    threads = torch.get_num_threads()
    ax.set_title(
        f"step GAE + whiten + broadcast to action tokens (CPU, {threads} "
        f"thread{'s' if threads > 1 else ''})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 2048 x 32 only")
    parser.add_argument("--min-tokens", type=int, default=4, help="action tokens per step, min")
    parser.add_argument("--max-tokens", type=int, default=60, help="action tokens per step, max")
    parser.add_argument(
        "--pad-len",
        type=int,
        default=512,
        help="padded response length of the loop's rows (verl pads to max_response_length; 512 "
        "reproduces the issue's ~107 ms for StepPO at 1024 x 32 here)",
    )
    parser.add_argument(
        "--max-loop-rows",
        type=int,
        default=300_000,
        help="skip the loop baseline above this many step rows",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--hogs", type=int, default=0, help="background busy processes")
    parser.add_argument("--name", default="advantages", help="results file name (no suffix)")
    args = parser.parse_args()
    load_start = os.getloadavg()
    bandwidth = copy_bandwidth()  # the whole machine's (default threads), before --threads
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    assert args.max_tokens <= args.pad_len
    sizes = [s for s in SIZES if not args.quick or s[0] * s[1] <= 2048 * 32]
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.2f} GB/s")
    with cpu_hogs(args.hogs):
        load_hogs = os.getloadavg()
        rows = run(
            sizes,
            args.min_tokens,
            args.max_tokens,
            args.pad_len,
            args.max_loop_rows,
            args.reps,
            bandwidth,
        )
    print()
    print_table(
        rows,
        [
            "trajs",
            "steps",
            "S",
            "A",
            "loop_ms",
            "torch_ms",
            "cpp_ms",
            "cpp_raw_ms",
            "cpp_1t_ms",
            "cpp_med_ms",
            "cpp_1t_med_ms",
            "floor_ms",
            "loop/cpp",
            "torch/cpp",
            "cpp/floor",
            "raw/floor",
            "loadavg",
        ],
    )
    path = write_results(
        args.name,
        rows,
        hogs=args.hogs,
        loadavg_with_hogs=load_hogs,
        bandwidth_bytes_per_s=bandwidth,
        gamma=GAMMA,
        lam=LAM,
        tokens_per_step=[args.min_tokens, args.max_tokens],
        pad_len=args.pad_len,
        max_loop_rows=args.max_loop_rows,
        threads=torch.get_num_threads(),
        reps=args.reps,
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
    )
    png = os.path.join(RESULTS_DIR, f"{args.name}.png")
    plot(rows, png)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
