"""Fused linear log-prob benchmark: forward + backward time and workspace memory.

Implementations (each measured in a fresh subprocess, since peak RSS is per process):

- ``naive``: ``torch.log_softmax(hidden @ weight.T, -1).gather(...)`` (materialises [M, V]).
- ``steppo_fast``: ``steppo_fast.linear_logprobs(impl="auto")``, on CPU the ``cpp`` backend's
  tuned version (chunked, recomputing; ``steppo_fast.cpp.logprobs``).
  ``steppo_fast@R`` forces R rows per chunk (budget sweep); ``steppo_fast+entropy`` also
  returns the entropy and back-propagates a random upstream gradient through it.
- ``liger``: liger-kernel's per-token log-prob path, the custom autograd Function that
  ``LigerFusedLinearGRPOLoss`` calls per chunk (``_ChunkedSelectiveLogProbFunction``: sequence x
  vocab chunks; pure torch, no compile).
- ``cce``: cut-cross-entropy's ``linear_cross_entropy(..., reduction="none",
  impl="torch_compile")`` (its CPU path), logp = -loss.

Counting rules: fp32, forward + backward with a non-uniform upstream gradient (random per-token
weights). "workspace" = peak RSS during the measured call minus the RSS before it (inputs, runtime)
minus the fresh gradients backward must return (grad_W + grad_h); a self-check (``check``)
verifies that those gradient bytes are resident after the call. Every worker runs with glibc's
mmap threshold pinned to 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed blocks go back to the OS and a
warm-up cannot hide workspace in the heap; the warm-up call (MKL init, torch.compile) runs at 64
rows. "floor" = the four matrix products any exact O(chunk x V) method does (forward logits,
recompute, d hidden, d weight), over row blocks of min(M, 4096) rows, timed in the same process
right after each repetition of the implementation (best of 2 each): ``floor_s`` with torch.mm
(MKL), ``floor_onednn_s`` with the oneDNN products steppo_fast uses (see ``floor_time``).
``cores_used`` = CPU seconds / wall seconds of the best repetition (2.0 = both cores were ours;
load averages include this process' own threads, so they read ~2 even on an idle machine).
Outputs are checked against an fp32 truth (blockwise log_softmax): logp on all rows, grad_h on
256 rows, grad_W on 2048 vocabulary rows.

Usage: ``python bench/bench_logprobs.py [--grid default|headline|memory|sweep]`` writes
``bench/results/logprobs*.json``; ``python bench/plot_logprobs.py`` draws the PNGs.
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
IMPLS = ("naive", "steppo_fast", "liger", "cce")
# Large-[M, V] implementations: estimated workspace in units of M * V * 4 bytes (measured at
# M = 1024..4096 here), used to skip runs that would not fit (the table says so).
MV_FACTOR = {"naive": 3.0, "cce": 2.0}
GRIDS = {
    "headline": [(4096, 512)],
    "default": [(1024, 512), (2048, 512), (4096, 512), (8192, 512), (2048, 1024), (1024, 2048)],
    "memory": [(16384, 512), (32768, 512)],
    "sweep": [(2048, 512)],
}
SWEEP_ROWS = (32, 64, 128, 192, 256, 384, 512, 1024)


def make_inputs(m: int, h: int, v: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=gen) * (1.0 / h**0.25)
    weight = torch.randn(v, h, generator=gen) * (1.0 / h**0.25)
    targets = torch.randint(0, v, (m,), generator=gen)
    upstream = torch.rand(m, generator=gen) * 2.0 - 0.5  # random per-token weights, mixed sign
    return hidden, weight, targets, upstream


def build(impl: str):
    """Return fn(hidden, weight, targets, upstream) -> logp, running forward + backward."""
    if impl == "naive":

        def fwd(h, w, t):
            return torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None])[:, 0]

    elif impl.startswith("steppo_fast"):
        from steppo_fast import linear_logprobs

        rows = int(impl.split("@")[1]) if "@" in impl else None
        if impl == "steppo_fast+entropy":

            def run(h, w, t, g):
                logp, ent = linear_logprobs(h, w, t, return_entropy=True, impl="auto")
                torch.autograd.backward((logp, ent), (g, g.flip(0)))
                return logp

            return run

        def fwd(h, w, t):
            return linear_logprobs(h, w, t, chunk_size=rows, impl="auto")

    elif impl == "liger":
        from liger_kernel.chunked_loss.fused_linear_ppo import (
            _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE,
            _ChunkedSelectiveLogProbFunction,
        )

        def fwd(h, w, t):
            chunk = _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE
            return _ChunkedSelectiveLogProbFunction.apply(h, w, t, None, 1.0, chunk)

    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def fwd(h, w, t):
            return -linear_cross_entropy(h, w, t, reduction="none", impl="torch_compile")

    else:
        raise ValueError(f"unknown impl {impl!r}")

    def run(h, w, t, g):
        logp = fwd(h, w, t)
        logp.backward(g)
        return logp

    return run


def floor_time(hidden, weight, gemm: str = "mm", block: int = 4096) -> float:
    """Seconds for the 4 GEMMs (logits, recompute, d hidden, d weight) over row blocks.

    ``gemm="mm"``: torch.mm / addmm_ (MKL sgemm on this CPU build) for all four;
    ``gemm="onednn"``: the fastest products torch offers here, oneDNN for the three with a
    [block, V] output or input (``torch.ops.mkldnn._linear_pointwise``, which allocates its
    output) and MKL ``addmm_`` for the d weight accumulation -- what steppo_fast uses on CPU.
    """
    m, h = hidden.shape
    block = max(1, min(block, m))
    linear = torch.ops.mkldnn._linear_pointwise
    z = torch.empty(block, weight.shape[0]) if gemm == "mm" else None
    grad_h, grad_w = torch.empty(m, h), torch.empty(weight.shape[0], h)
    t0 = time.perf_counter()
    for r0 in range(0, m, block):
        hb = hidden[r0 : r0 + block]
        if gemm == "mm":
            zb = z[: hb.shape[0]]
            torch.mm(hb, weight.t(), out=zb)  # forward logits
            torch.mm(hb, weight.t(), out=zb)  # backward recompute
            torch.mm(zb, weight, out=grad_h[r0 : r0 + block])  # d hidden
        else:
            zb = linear(hb, weight, None, "none", [], "")  # forward logits
            del zb
            zb = linear(hb, weight, None, "none", [], "")  # backward recompute
            grad_h[r0 : r0 + block] = linear(zb, weight.t(), None, "none", [], "")  # d hidden
        grad_w.addmm_(zb.t(), hb, beta=0.0 if r0 == 0 else 1.0)  # d weight
        del zb
    return time.perf_counter() - t0


def truth_errors(hidden, weight, targets, upstream, logp, grad_h, grad_w) -> dict:
    """Max errors vs an fp32 blockwise-log_softmax truth (logp: absolute; grads: relative to the
    largest truth entry) on all rows / 256 rows / 2048 vocabulary rows."""
    m = hidden.shape[0]
    gen = torch.Generator().manual_seed(1)
    lse = torch.empty(m)
    logp_true = torch.empty(m)
    for r0 in range(0, m, 1024):
        z = hidden[r0 : r0 + 1024] @ weight.T
        lsm = torch.log_softmax(z, -1)
        logp_true[r0 : r0 + 1024] = lsm.gather(-1, targets[r0 : r0 + 1024, None])[:, 0]
        lse[r0 : r0 + 1024] = torch.logsumexp(z, -1)
        del z, lsm
    rows = torch.randperm(m, generator=gen)[:256]
    dz = -torch.softmax(hidden[rows] @ weight.T, -1)
    dz[torch.arange(rows.numel()), targets[rows]] += 1.0
    gh_true = (dz * upstream[rows, None]) @ weight
    vocab_rows = torch.cat([targets[:64], torch.randperm(weight.shape[0], generator=gen)[:1984]])
    zc = hidden @ weight[vocab_rows].T
    dzc = -torch.exp(zc - lse[:, None])
    dzc += (targets[:, None] == vocab_rows[None, :]).float()
    gw_true = (dzc * upstream[:, None]).T @ hidden

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {
        "logp_err": (logp - logp_true).abs().max().item() if m else 0.0,
        "grad_h_err": rel(grad_h[rows], gh_true),
        "grad_w_err": rel(grad_w[vocab_rows], gw_true),
    }


def worker(impl: str, m: int, h: int, v: int, reps: int, check: bool, floors: bool) -> dict:
    """One implementation at one shape, in this (fresh) process: ``reps`` rounds of its
    forward + backward (workspace from the first) each followed, when ``floors``, by the two
    4-GEMM floors, so that load drift hits the implementation and its floors alike."""
    hidden, weight, targets, upstream = make_inputs(m, h, v)
    run = build(impl)
    # Warm-up at 64 rows: library init and torch.compile, without leaving big blocks behind.
    weight.requires_grad_(True)
    small_hidden = hidden[:64].clone().requires_grad_(True)
    run(small_hidden, weight, targets[:64].clone(), upstream[:64].clone())
    del small_hidden
    hidden.requires_grad_(True)
    times, cores, floor_mm, floor_onednn, workspace = [], [], [], [], None
    for rep in range(reps):
        hidden.grad = weight.grad = None
        gc.collect()
        harness.reset_peak_rss()
        base = harness.rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        logp = run(hidden, weight, targets, upstream)
        times.append(time.perf_counter() - t0)
        cores.append((time.process_time() - c0) / times[-1])
        peak = harness.peak_rss_bytes() - base
        held_after = harness.rss_bytes() - base  # what the call left resident: grads + logp
        fresh = hidden.grad.nbytes + weight.grad.nbytes
        if rep == 0:
            workspace = max(0, peak - fresh)
            # Self-check of the subtraction: the gradient bytes must be resident (a lazily
            # zero-filled, partly written gradient would be subtracted without being counted).
            resident_check = "ok" if held_after >= 0.95 * fresh else "FAILED: grads not resident"
        if floors:
            floor_mm.append(floor_time(hidden.detach(), weight.detach(), "mm"))
            floor_onednn.append(floor_time(hidden.detach(), weight.detach(), "onednn"))
    best = times.index(min(times))
    out = {"time_s": times[best], "times_s": times, "workspace_MB": workspace / 2**20}
    # CPU seconds / wall seconds of the best repetition: ~torch threads when the cores were
    # ours, lower when other processes took them (loadavg also counts this process' threads).
    out["cores_used"] = cores[best]
    out["check"] = resident_check
    if floors:
        out.update(floor_s=min(floor_mm), floor_onednn_s=min(floor_onednn))
        out.update(x_floor=out["time_s"] / out["floor_s"])
        out.update(x_floor_onednn=out["time_s"] / out["floor_onednn_s"])
    if check:
        with torch.no_grad():
            errors = truth_errors(
                hidden.detach(),
                weight.detach(),
                targets,
                upstream,
                logp.detach(),
                hidden.grad,
                weight.grad,
            )
        if impl.endswith("+entropy"):  # its gradients include the entropy term: logp only
            errors = {"logp_err": errors["logp_err"]}
        out.update(errors)
    return out


def interleaved_sweep(m: int, h: int, rows_list, rounds: int) -> list[dict]:
    """Time-only chunk sweep in one process: each round times the floor and every chunk size
    once (order rotated per round), so load drift hits all configurations alike; reports the
    best and median of ``rounds`` per configuration. Workspace comes from the subprocess sweep."""
    from steppo_fast import linear_logprobs

    hidden, weight, targets, upstream = make_inputs(m, h, VOCAB)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    configs = ["floor", "floor_onednn", *rows_list]
    times: dict = {c: [] for c in configs}
    for rnd in range(rounds):
        shift = rnd % len(configs)
        for c in configs[shift:] + configs[:shift]:
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            if c in ("floor", "floor_onednn"):
                floor_time(hidden.detach(), weight.detach(), "mm" if c == "floor" else "onednn")
            else:
                linear_logprobs(hidden, weight, targets, chunk_size=c, impl="auto").backward(
                    upstream
                )
            times[c].append(time.perf_counter() - t0)
            print(
                f"round {rnd} {c}: {times[c][-1]:.3f} s load {os.getloadavg()[0]:.2f}", flush=True
            )
    floor, floor_onednn = min(times["floor"]), min(times["floor_onednn"])
    return [
        {
            "rows": c,
            "M": m,
            "H": h,
            "best_s": min(t),
            "median_s": sorted(t)[len(t) // 2],
            "best_x_floor": min(t) / floor,
            "best_x_floor_onednn": min(t) / floor_onednn,
            "times_s": t,
        }
        for c, t in times.items()
    ]


def spawn(
    impl: str, m: int, h: int, v: int, reps: int, check: bool, floors: bool, threads: int = 0
) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--M",
        str(m),
        "--H",
        str(h),
        "--V",
        str(v),
        "--reps",
        str(reps),
    ]
    cmd += ([] if check else ["--no-check"]) + ([] if floors else ["--no-floor"])
    cmd += [f"--threads={threads}"]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1][:120]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["loadavg"] = round((load0 + os.getloadavg()[0]) / 2, 2)
    return out


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="default")
    p.add_argument(
        "--shapes",
        help="comma-separated MxH list replacing the grid's shapes, e.g. 8192x512,2048x512 "
        "(results go to logprobs_<--name>.json)",
    )
    p.add_argument("--name", default="recheck", help="results suffix when --shapes is given")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in each worker (0: torch's default, 2 here); 1 keeps a run clean "
        "when another process holds one of the 2 cores",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--M", type=int, help=argparse.SUPPRESS)
    p.add_argument("--H", type=int, help=argparse.SUPPRESS)
    p.add_argument("--V", type=int, default=VOCAB, help=argparse.SUPPRESS)
    p.add_argument("--interleaved", type=int, metavar="ROUNDS", help="time-only chunk sweep")
    args = p.parse_args()
    if args.interleaved:
        m, h = GRIDS["sweep"][0]
        rows = interleaved_sweep(m, h, SWEEP_ROWS[1:7], args.interleaved)
        cols = ["rows", "M", "H", "best_s", "median_s", "best_x_floor", "best_x_floor_onednn"]
        harness.print_table(rows, cols)
        print("wrote", harness.write_results("logprobs_sweep_time", rows))
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        out = worker(
            args.worker, args.M, args.H, args.V, args.reps, not args.no_check, not args.no_floor
        )
        print(json.dumps(out))
        return

    impls = args.impls.split(",")
    if args.grid == "sweep":
        impls = [f"steppo_fast@{r}" for r in SWEEP_ROWS]
    shapes = GRIDS[args.grid]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    load_start = os.getloadavg()
    rows = []
    for m, h in shapes:
        for impl in impls:
            row = {"impl": impl, "M": m, "H": h, "V": VOCAB, "dtype": "fp32"}
            limit = min(args.mem_limit_gb * 2**30, 0.7 * mem_available_bytes())
            need = MV_FACTOR.get(impl, 0.0) * m * VOCAB * 4
            if need > limit:
                row["status"] = (
                    f"skipped: est. workspace {need / 2**30:.1f} GiB > {limit / 2**30:.1f}"
                )
            else:
                checks = not args.no_check
                floors = not args.no_floor
                row.update(spawn(impl, m, h, VOCAB, args.reps, checks, floors, args.threads))
                row.setdefault("status", "ok")
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "times_s"}
            print({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in shown.items()})
    cols = [
        "impl",
        "M",
        "H",
        "time_s",
        "floor_s",
        "floor_onednn_s",
        "x_floor",
        "x_floor_onednn",
        "workspace_MB",
        "logp_err",
        "grad_h_err",
        "grad_w_err",
        "cores_used",
        "loadavg",
        "status",
        "check",
    ]
    harness.print_table(rows, cols)
    name = "logprobs" if args.grid == "default" else f"logprobs_{args.grid}"
    if args.shapes:
        name = f"logprobs_{args.name}"
    path = harness.write_results(
        name,
        rows,
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        threads=args.threads or torch.get_num_threads(),
        copy_bandwidth_GBps=harness.copy_bandwidth(1 << 26) / 1e9,
        counting=__doc__.split("Counting rules: ")[1].split("\n\nUsage")[0],
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
