"""One full training update on one long multi-turn trajectory: memory and time, four ways.

Question answered: "does one update of my model fit, and what does it cost?" for an agent whose
trajectory has T turns and C context tokens. The model is a random-init Qwen2 with Qwen2.5's
vocabulary (V = 151,936), hidden 512, 4 layers, 8 query / 2 key-value heads, MLP 2048, untied
LM head (171 M parameters) and, for StepPO, a critic: a value head on the policy's last hidden
states (``critic="shared"``; ``--critic separate`` adds its own 93 M-parameter copy of the body
and doubles the body's forward/backward: the shared one keeps a run affordable on this shared
2-core machine; every method gets the same critic). One synthetic trajectory: each turn
appends ``C/T - a`` observation tokens then ``a = max(4, C/T/8)`` action tokens. One update =
policy (+ critic) forward + backward + AdamW step, with a PPO-style step loss
(``step_policy_loss``) and a value loss.

Configurations (``--method``):

- ``a`` StepPO reference's way: rows layout (one sequence per step holding its whole context, so
  ``sum_t |prefix_t|`` ~ T * C / 2 tokens), ``model(...).logits`` over every token, then
  ``log_softmax`` and gather; micro-batches of ``--rows-per-micro`` step rows (gradient
  accumulation), critic values read per row;
- ``b`` verl's multi-turn way: merged layout (one sequence per trajectory), full logits,
  ``log_softmax`` + gather;
- ``c`` steppo_fast: merged layout, packed varlen forward, ``linear_logprobs`` on action tokens
  only (never [N, V]), no checkpointing;
- ``d`` (c) + activation checkpointing; ``d16`` (d) + bf16 autocast (fp32 master weights).

Each configuration runs in a fresh process (``--worker``), glibc's mmap threshold pinned to
64 KiB (freed blocks go back to the OS, so RSS tracks live memory). The worker first allocates
parameters, gradients (zero-filled) and AdamW state (one step on zero gradients), then resets
the peak-RSS counter: **workspace = peak RSS during the update - RSS before it**, i.e. memory
beyond parameters, gradients and optimizer state (activations, logits, attention, temporaries).
It is recorded per phase (the counter is reset between them): ``fwd_bwd_workspace`` (forward +
backward, which grows with the context) and ``step_workspace`` (AdamW's temporaries, a constant
~0.6 GB here: ``foreach=False``, so one parameter's temporaries at a time, the largest being the
[V, H] embedding and LM head); ``workspace`` is the whole update's.
The parent polls the child's VmRSS every 20 ms and kills it above ``--rss-limit-gib`` (default
10: the machine is shared), recording "exceeded"; a run over ``--timeout`` seconds is killed and
recorded as such. Budgets beyond the limit are answered from a fitted line (workspace = a + b *
tokens over the measured points of one method), labelled as fitted, never as measured.

Writes ``bench/results/long_context.json`` and ``bench/results/long_context.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


def _load_harness():
    """bench/harness.py by file path: putting the repo root on sys.path would let its
    top-level ``kernels/`` folder shadow the ``kernels`` package transformers probes."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()

VOCAB = 151936
MODEL = dict(hidden=512, layers=4, heads=8, kv_heads=2, mlp=2048)
GIB = 1 << 30


def trajectory(turns: int, context: int, seed: int = 0) -> dict:
    """One synthetic trajectory record: ``turns`` steps, ``context`` tokens in total."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    per = context // turns
    act = max(4, per // 8)
    ctx, steps = [], []
    for _ in range(turns):
        ctx = ctx + torch.randint(0, VOCAB, (per - act,), generator=gen).tolist()
        action = torch.randint(0, VOCAB, (act,), generator=gen).tolist()
        steps.append({"prompt_ids": list(ctx), "action_ids": action, "reward": 0.5})
        ctx = ctx + action
    return {"steps": steps, "terminated": True, "group": 0}


def build(method: str, shared: bool):
    import torch
    import transformers

    from steppo_fast.trainer.memory import enable_grad_checkpointing
    from steppo_fast.trainer.policy import Critic

    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=MODEL["hidden"],
        intermediate_size=MODEL["mlp"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL["kv_heads"],
        max_position_embeddings=65536,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    critic = Critic(policy, shared=shared)
    with torch.no_grad():
        critic.head.weight.normal_(std=0.02)
    if method in ("d", "d16"):
        enable_grad_checkpointing(policy)
        enable_grad_checkpointing(critic.backbone)  # None (shared): nothing to wrap
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=False)
    for p in params:  # gradients and AdamW state resident before the measurement
        p.grad = torch.zeros_like(p)
    opt.step()
    return policy, critic, params, opt


def full_logits_logp(policy, ids, positions, logit_index, targets):
    """(a)/(b): ``model(...).logits`` over every token, log_softmax, gather; also returns the
    last hidden states (for a shared critic)."""
    import torch

    out = policy(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    return logp[logit_index].gather(-1, targets[:, None])[:, 0], out.hidden_states[-1][0]


def update(method: str, batch, policy, critic, opt, rows_per_micro: int) -> dict:
    """Forward + backward of one update (gradients accumulated into the resident ``.grad``
    buffers; the caller runs the optimizer step); returns counts of what was computed."""
    import torch

    from steppo_fast import step_policy_loss, value_loss
    from steppo_fast.trainer.memory import compute_dtype
    from steppo_fast.trainer.modeling import packed_forward
    from steppo_fast.trainer.update import action_logprobs

    adv = torch.linspace(-1, 1, batch.num_steps)
    returns = torch.full((batch.num_steps,), 0.5)
    if method in ("c", "d", "d16"):
        with compute_dtype("bf16" if method == "d16" else "fp32", "cpu"):
            hidden = packed_forward(policy, batch)
            logp, _ = action_logprobs(policy, hidden, batch, None, 1.0)
            if not critic.shared:
                hidden = packed_forward(critic.backbone, batch)
            values = critic.values(hidden, batch.value_index)
        loss, _ = step_policy_loss(logp, logp.detach(), adv, batch.cu_steps)
        loss = loss + value_loss(values, values.detach(), returns)
        loss.backward()
        return {"tokens": batch.num_tokens, "forwards": 1 if critic.shared else 2}
    # (a) rows: micro-batches of a few step rows; (b) merged: one sequence
    seqs = list(range(batch.num_seqs))
    chunks = [seqs[i : i + rows_per_micro] for i in range(0, len(seqs), rows_per_micro)]
    chunks = chunks if method == "a" else [seqs]
    for chunk in chunks:  # one backward per micro-batch: its rows' logits coexist
        total = 0.0
        for r in chunk:  # one sequence per forward (no padding waste counted)
            a, b = int(batch.cu_seqlens[r]), int(batch.cu_seqlens[r + 1])
            steps = (batch.step_seq == r).nonzero()[:, 0]
            first, last = int(steps[0]), int(steps[-1])
            acts = torch.arange(int(batch.cu_steps[first]), int(batch.cu_steps[last + 1]))
            ids = batch.input_ids[a:b][None]
            pos = torch.arange(b - a)[None]
            logp, hidden = full_logits_logp(
                policy, ids, pos, batch.logit_index[acts] - a, batch.action_ids[acts]
            )
            if not critic.shared:
                hidden = critic.backbone(
                    input_ids=ids, position_ids=pos, use_cache=False
                ).last_hidden_state[0]
            values = critic.values(hidden, batch.value_index[steps] - a)
            cu = (batch.cu_steps[first : last + 2] - batch.cu_steps[first]).int()
            loss, _ = step_policy_loss(
                logp, logp.detach(), adv[steps], cu, normalizer=float(batch.num_steps)
            )
            vl = value_loss(
                values, values.detach(), returns[steps], normalizer=float(batch.num_steps)
            )
            total = total + loss + vl
        total.backward()
    return {"tokens": batch.num_tokens, "forwards": (1 if critic.shared else 2) * batch.num_seqs}


def worker(args) -> None:
    import torch

    from steppo_fast import StepBatch

    torch.set_num_threads(args.threads)
    layout = "rows" if args.method == "a" else "merged"
    batch = StepBatch.from_trajectories([trajectory(args.turns, args.context)], layout=layout)
    policy, critic, params, opt = build(args.method, args.critic == "shared")
    n_params = sum(p.numel() for p in params)
    import gc

    gc.collect()
    harness.reset_peak_rss()
    base = harness.rss_bytes()
    cpu0, t0 = time.process_time(), time.perf_counter()
    info = update(args.method, batch, policy, critic, opt, args.rows_per_micro)
    t1 = time.perf_counter()
    fwd_bwd = max(0, harness.peak_rss_bytes() - base)
    gc.collect()
    harness.reset_peak_rss()
    base_step = harness.rss_bytes()
    opt.step()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    step = max(0, harness.peak_rss_bytes() - base_step)
    peak = base + max(fwd_bwd, base_step - base + step)
    finite = all(torch.isfinite(p).all() for p in params)
    print(
        json.dumps(
            dict(
                info,
                method=args.method,
                critic=args.critic,
                turns=args.turns,
                context=args.context,
                actions=batch.num_actions,
                params=n_params,
                base_rss=base,
                workspace=max(0, peak - base),
                fwd_bwd_workspace=fwd_bwd,
                step_workspace=step,
                wall_s=wall,
                fwd_bwd_s=t1 - t0,
                cores_used=cpu / wall,
                finite=bool(finite),
            )
        )
    )


def run_child(cmd: list[str], limit: int, timeout: float) -> tuple[str, str, int]:
    """Run ``cmd``; kill it above ``limit`` bytes RSS or after ``timeout`` s. Returns
    (stdout, status, max RSS seen)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = {"max": 0, "status": "ok"}

    def watch():
        t0 = time.monotonic()
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                break
            seen["max"] = max(seen["max"], rss)
            if rss > limit:
                seen["status"] = f"exceeded {limit / GIB:.0f} GiB RSS"
                proc.send_signal(signal.SIGKILL)
                break
            if time.monotonic() - t0 > timeout:
                seen["status"] = f"timeout {timeout:.0f} s"
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if seen["status"] == "ok" and proc.returncode != 0:
        seen["status"] = (
            f"error: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
        )
    return out, seen["status"], seen["max"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", default="d")
    p.add_argument("--turns", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--critic", default="shared", choices=("shared", "separate"))
    p.add_argument("--rows-per-micro", type=int, default=2)
    p.add_argument("--grid", default="", help="method:turns:context,... (parent mode)")
    p.add_argument("--rss-limit-gib", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--name", default="long_context")
    p.add_argument("--append", action="store_true", help="keep the rows already in the results")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    path = os.path.join(harness.RESULTS_DIR, f"{args.name}.json")
    if args.append and os.path.isfile(path):  # add to an earlier grid's rows (same setup)
        with open(path) as f:
            rows = json.load(f)["rows"]
    load0 = os.getloadavg()
    for item in args.grid.split(","):
        method, turns, context = item.split(":")
        cmd = [
            sys.executable,
            "-I",
            os.path.abspath(__file__),
            "--worker",
            "--method",
            method,
            "--turns",
            turns,
            "--context",
            context,
            "--threads",
            str(args.threads),
            "--rows-per-micro",
            str(args.rows_per_micro),
        ]
        load = os.getloadavg()[0]
        out, status, max_rss = run_child(cmd, int(args.rss_limit_gib * GIB), args.timeout)
        row = dict(
            method=method,
            turns=int(turns),
            context=int(context),
            status=status,
            max_rss=max_rss,
            loadavg_1m=load,
        )
        if status == "ok":
            row.update(json.loads(out.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        # written after every run: a crash or a kill never loses measured rows
        harness.write_results(
            args.name,
            rows,
            model=MODEL,
            vocab=VOCAB,
            threads=args.threads,
            rss_limit_gib=args.rss_limit_gib,
            loadavg_start=load0,
        )
    print(path)


if __name__ == "__main__":
    main()
