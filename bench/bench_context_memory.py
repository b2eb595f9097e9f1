"""Long agent contexts: log-prob memory and time over all tokens vs action tokens only.

Agent trajectories where observations outweigh actions: ``--steps`` steps per trajectory, each
adding ``--obs`` observation tokens then ``--act`` action tokens, packed with
``StepBatch.from_trajectories(layout="merged")`` (one sequence per trajectory). The LM head is
realistic (H = 1024, V = 151936, fp32); the hidden states are random stand-ins for the model's
output (the log-prob layer's cost does not depend on their values).

- ``all``: what a causal-LM loss does, log-probs of every next token (every position but each
  sequence's last) -- the [N, V] logits HF would materialise.
- ``action``: ``hidden[batch.logit_index]`` and ``batch.action_ids`` only (what StepPO needs).

Each (selection, implementation, pass) runs in a fresh subprocess, glibc mmap threshold pinned
to 64 KiB, with the counting rules of bench_logprobs.py:

Counting rules: fp32; "workspace" = peak RSS during the measured call (forward, or forward +
backward with a random upstream gradient) minus the RSS just before it, minus the bytes of the
gradient buffers backward must return (grad_W [V, H] + grad_h [M, H]) when they exist: the peak
is taken per phase, max(forward-phase peak, backward-phase peak - gradient bytes), because
subtracting the gradients from a whole-call peak hides a forward peak that occurred before any
gradient existed (naive PyTorch at small H: fwd+bwd came out below fwd). So the
inputs (hidden [M, H], weight [V, H], targets, the batch) are never counted (they are resident
before the call), the gradient buffers are never counted, and everything else alive at the peak
is: logits chunks, autograd-saved activations, the output logp [M]. fwd and fwd+bwd count the
same things; fwd+bwd >= fwd up to allocator noise (its forward is the same computation).
The op's input ``hidden[rows]`` is gathered before the measurement, as a leaf (72 MB for all
17.6k tokens of 2 trajectories at H = 1024), so its gradient is a fresh, fully written [M, H].

Self-checks (a failing check marks the row and makes the script exit 1): in each fwd+bwd
worker, the RSS left after the call must hold the subtracted gradient bytes (>= 95%; a
lazily zero-filled gradient whose untouched pages never become resident would make the
subtraction remove memory that was never counted); per (selection, impl), fwd+bwd workspace
>= fwd workspace - max(2 MB, 2%).

``naive`` runs are skipped when their [M, V] tensors cannot fit (the table says so).
Writes ``bench/results/context_memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import harness  # noqa: E402

VOCAB = 151936
NAIVE_MV_FACTOR = {"fwd": 2.0, "fwd+bwd": 3.0}  # [M, V] fp32 tensors alive at the peak
GRAD_RESIDENT_FRACTION = 0.95  # self-check: subtracted gradient bytes must be resident


def make_batch(trajectories: int, steps: int, obs: int, act: int, seed: int = 0):
    from steppo_fast import StepBatch

    gen = torch.Generator().manual_seed(seed)
    records = []
    for b in range(trajectories):
        context, traj_steps = [], []
        for _ in range(steps):
            context = context + torch.randint(0, VOCAB, (obs,), generator=gen).tolist()
            action = torch.randint(0, VOCAB, (act,), generator=gen).tolist()
            traj_steps.append({"prompt_ids": list(context), "action_ids": action, "reward": 0.0})
            context = context + action
        records.append({"steps": traj_steps, "terminated": True, "group": b})
    return StepBatch.from_trajectories(records, layout="merged")


def selection(batch, which: str):
    """(row index into hidden, target ids) for ``all`` next tokens or ``action`` tokens only."""
    if which == "action":
        return batch.logit_index, batch.action_ids
    cu = batch.cu_seqlens.long()
    not_last = torch.ones(batch.num_tokens, dtype=torch.bool)
    not_last[cu[1:] - 1] = False
    rows = not_last.nonzero()[:, 0]
    return rows, batch.input_ids[rows + 1]


def worker(args) -> dict:
    batch = make_batch(args.trajectories, args.steps, args.obs, args.act)
    rows, targets = selection(batch, args.select)
    gen = torch.Generator().manual_seed(1)
    hidden_all = torch.randn(batch.num_tokens, args.H, generator=gen) / args.H**0.25
    weight = torch.randn(VOCAB, args.H, generator=gen) / args.H**0.25
    upstream = torch.rand(rows.numel(), generator=gen)
    backward = args.pass_ == "fwd+bwd"
    if args.impl == "naive":

        def fwd(h, w, t):
            return torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None])[:, 0]

    else:
        from steppo_fast import linear_logprobs

        def fwd(h, w, t):
            return linear_logprobs(h, w, t, impl="auto")

    # The op's input is hidden[rows] (a [M, H] copy the trainer makes with its gather; made
    # here before the measurement, as a leaf, so that its gradient is the fresh [M, H] one).
    hidden = hidden_all[rows].requires_grad_(backward)
    del hidden_all
    weight.requires_grad_(backward)
    # Warm-up on 64 rows (library init, autograd engine threads), then drop its gradients.
    warm = hidden.detach()[:64].clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = fwd(warm, weight, targets[:64])
        if backward:
            out.sum().backward()
    weight.grad = None
    del warm, out
    gc.collect()
    harness.reset_peak_rss()
    base = harness.rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.set_grad_enabled(backward):
        logp = fwd(hidden, weight, targets)
        fwd_seconds = time.perf_counter() - t0
        peak_fwd = harness.peak_rss_bytes() - base  # forward phase: no gradient exists yet
        peak_bwd = 0
        if backward:
            harness.reset_peak_rss()  # the peak of the backward phase alone
            logp.backward(upstream)
            peak_bwd = harness.peak_rss_bytes() - base
    seconds = time.perf_counter() - t0
    cores_used = (time.process_time() - c0) / seconds  # 2.0 on 2 idle cores
    held_after = harness.rss_bytes() - base  # what the call left resident: grads + logp
    fresh = 0
    if backward:
        fresh = hidden.grad.nbytes + weight.grad.nbytes
    peak = max(peak_fwd, peak_bwd)
    check = "ok"
    if held_after < GRAD_RESIDENT_FRACTION * fresh:
        check = (
            f"FAILED: {fresh / 2**20:.1f} MB of gradients subtracted but only "
            f"{held_after / 2**20:.1f} MB resident after the call"
        )
    return {
        "rows": rows.numel(),
        "tokens": batch.num_tokens,
        "time_s": seconds,
        "cores_used": cores_used,
        "fwd_time_s": fwd_seconds,
        "peak_MB": peak / 2**20,
        "peak_fwd_MB": peak_fwd / 2**20,
        "peak_bwd_MB": peak_bwd / 2**20,
        "grads_MB": fresh / 2**20,
        "held_after_MB": held_after / 2**20,
        "workspace_MB": max(0, peak_fwd, peak_bwd - fresh) / 2**20,
        "logp_mean": logp.detach().mean().item(),
        "check": check,
    }


def check_fwd_le_bwd(rows: list[dict]) -> None:
    """Mark the fwd+bwd row of every (select, impl) whose workspace is below its fwd row's
    (both count the same things and fwd+bwd runs the same forward first)."""
    fwd = {(r["select"], r["impl"]): r for r in rows if r["pass"] == "fwd" and r.get("check")}
    for r in rows:
        f = fwd.get((r["select"], r["impl"]))
        if r["pass"] != "fwd+bwd" or f is None or "workspace_MB" not in r:
            continue
        slack = max(2.0, 0.02 * f["workspace_MB"])
        if r["workspace_MB"] < f["workspace_MB"] - slack and r["check"] == "ok":
            r["check"] = (
                f"FAILED: fwd+bwd workspace {r['workspace_MB']:.1f} MB < fwd "
                f"{f['workspace_MB']:.1f} MB"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectories", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--obs", type=int, default=800)
    p.add_argument("--act", type=int, default=80)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--select", choices=["all", "action"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["naive", "steppo_fast"], help=argparse.SUPPRESS)
    p.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    load_start = os.getloadavg()
    batch = make_batch(args.trajectories, args.steps, args.obs, args.act)
    counts = {which: selection(batch, which)[0].numel() for which in ("all", "action")}
    shape = dict(trajectories=args.trajectories, steps=args.steps, obs=args.obs, act=args.act)
    common = [f"--{k}={v}" for k, v in shape.items()] + [f"--H={args.H}"]
    rows = []
    for which in ("action", "all"):
        for impl in ("steppo_fast", "naive"):
            for pass_ in ("fwd", "fwd+bwd"):
                row = {"select": which, "impl": impl, "pass": pass_, "M": counts[which]}
                need = NAIVE_MV_FACTOR[pass_] * counts[which] * VOCAB * 4 if impl == "naive" else 0
                limit = args.mem_limit_gb * 2**30
                if need > limit:
                    row["status"] = (
                        f"skipped: est. {need / 2**30:.1f} GiB of [M, V] > {limit / 2**30:.0f}"
                    )
                    rows.append(row)
                    print(row, flush=True)
                    continue
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    "--select",
                    which,
                    "--impl",
                    impl,
                    "--pass",
                    pass_,
                    *common,
                ]
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                load0 = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    row["status"] = "failed: " + proc.stderr.strip().splitlines()[-1][:120]
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
                load1 = os.getloadavg()[0]
                row.update(loadavg_start=round(load0, 2), loadavg_end=round(load1, 2))
                rows.append(row)
                print(row, flush=True)
    check_fwd_le_bwd(rows)
    columns = ["select", "impl", "pass", "M", "time_s", "cores_used", "peak_fwd_MB"]
    columns += ["peak_bwd_MB", "grads_MB", "workspace_MB"]
    columns += ["loadavg_start", "loadavg_end", "status", "check"]
    harness.print_table(rows, columns)
    counting = __doc__.split("Counting rules: ")[1].split("\n\nSelf-checks")[0]
    print("workspace:", " ".join(counting.split()))
    path = harness.write_results(
        "context_memory",
        rows,
        counting=" ".join(counting.split()),
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        shape=shape,
        H=args.H,
        V=VOCAB,
        tokens=batch.num_tokens,
        action_tokens=counts["action"],
    )
    print("wrote", path)
    failed = [r for r in rows if r.get("check", "ok") != "ok"]
    for r in failed:
        print(f"SELF-CHECK {r['select']} {r['impl']} {r['pass']}: {r['check']}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
