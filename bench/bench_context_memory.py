"""Long agent contexts: log-prob memory and time over all tokens vs action tokens only.

Agent trajectories where observations outweigh actions: ``--steps`` steps per trajectory, each
adding ``--obs`` observation tokens then ``--act`` action tokens, packed with
``StepBatch.from_trajectories(layout="merged")`` (one sequence per trajectory). The LM head is
realistic (H = 1024, V = 151936, fp32); the hidden states are random stand-ins for the model's
output (the log-prob layer's cost does not depend on their values).

- ``all``: what a causal-LM loss does, log-probs of every next token (every position but each
  sequence's last) -- the [N, V] logits HF would materialise.
- ``action``: ``hidden[batch.logit_index]`` and ``batch.action_ids`` only (what StepPO needs).

Each (selection, implementation, pass) runs in a fresh subprocess with the RSS rules of
bench_logprobs.py: "workspace" = peak RSS minus inputs minus fresh gradients, glibc mmap
threshold pinned. The [M, H] gather ``hidden[rows]`` is made before the measurement (it is the
op's input: 72 MB for all 17.6k tokens of 2 trajectories at H = 1024). ``naive`` runs are
skipped when their [M, V] tensors cannot fit (the table says so).
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
            return linear_logprobs(h, w, t, impl="torch")

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
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        logp = fwd(hidden, weight, targets)
        if backward:
            logp.backward(upstream)
    seconds = time.perf_counter() - t0
    peak = harness.peak_rss_bytes() - base
    fresh = 0
    if backward:
        fresh = hidden.grad.nbytes + weight.grad.nbytes
    return {
        "rows": rows.numel(),
        "tokens": batch.num_tokens,
        "time_s": seconds,
        "workspace_MB": max(0, peak - fresh) / 2**20,
        "logp_mean": logp.detach().mean().item(),
    }


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
                row["loadavg"] = round((load0 + os.getloadavg()[0]) / 2, 2)
                rows.append(row)
                print(row, flush=True)
    harness.print_table(
        rows, ["select", "impl", "pass", "M", "time_s", "workspace_MB", "loadavg", "status"]
    )
    path = harness.write_results(
        "context_memory",
        rows,
        shape=shape,
        H=args.H,
        V=VOCAB,
        tokens=batch.num_tokens,
        action_tokens=counts["action"],
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
