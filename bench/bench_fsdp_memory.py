"""Per-rank memory of the reference trainer: FSDP2 sharding (``--shard fsdp``) vs replicas
(``--shard none``) on 2 gloo ranks, and one process, with and without the KL reference copy.

Each configuration runs in fresh processes (``python -m torch.distributed.run --nproc-per-node 2
bench/bench_fsdp_memory.py --worker ...``, or the worker alone for 1 process). A worker builds
the trainer exactly as ``steppo train`` does (``Trainer`` on ``init_from_env``'s communicator), runs
``--iters`` iterations through ``Trainer.step`` (rollout, old log-probs/values, reference
log-probs, PPO update, inference-copy refresh), then writes one checkpoint, and records:

- bytes each rank *holds* (``DTensor.to_local()`` element counts x element size): trainable
  parameters (policy + critic), their gradients (after the last optimizer step; ``zero_grad``
  runs at the start of each mini-batch, so they are still alive), AdamW state, the FSDP
  inference copy, the frozen KL reference;
- RSS (``VmRSS``) after ``import``, after model setup, just before and after each optimizer step
  (optimizer step hooks), at the end; peaks (``VmHWM``) of setup, of the iterations (counter
  reset after setup) and of the checkpoint write (reset before it).

Every configuration runs twice: with glibc's default malloc and with
``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold: every block >= 64 KiB is its own ``mmap``
and goes back to the OS when freed), which separates what the trainer holds from what the
allocator keeps resident after freeing.

Then the parent compares the held bytes with the formula of docs/scaling.md (training state
``4P/W`` + inference copy + reference) and prints a table; results go to
``bench/results/fsdp_memory.json`` with machine, commit, date and load.

CPU only (gloo): no GPU number is measured or implied. ``--threads 1`` per rank.

    .venv/bin/python bench/bench_fsdp_memory.py              # 12 configurations, ~4.5 min
    .venv/bin/python bench/bench_fsdp_memory.py --no-mmap-variant  # glibc only, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import _status_kb  # noqa: E402  (VmRSS / VmHWM from /proc/self/status)

MIB = 1 << 20


def _rss() -> int:
    return _status_kb("VmRSS") * 1024


def _hwm() -> int:
    return _status_kb("VmHWM") * 1024


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` = 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------------- worker (one rank)
def _local_bytes(t) -> int:
    """Bytes of the part of ``t`` this rank holds (the local shard of a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _unique_params(*modules) -> list:
    seen, out = set(), []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _held(trainer) -> dict:
    """Bytes of parameters, gradients, optimizer state, inference copy and reference held here."""
    import torch

    models = trainer.models
    trainable = _unique_params(models.policy, models.critic)
    full_bytes = sum(p.numel() * p.element_size() for p in trainable)  # global shape
    policy_full = sum(p.numel() * p.element_size() for p in _unique_params(models.policy))
    state = 0
    for st in trainer.optimizer.state.values():
        state += sum(_local_bytes(v) for v in st.values() if torch.is_tensor(v))
    sharded = trainer.sharded
    inference = 0
    if sharded is not None:
        inf = sharded.inference
        inference = sum(_local_bytes(p) for p in _unique_params(inf.policy, inf.critic))
    reference = sum(_local_bytes(p) for p in _unique_params(models.reference))
    return {
        "P_trainable_full": full_bytes,
        "P_policy_full": policy_full,
        "params": sum(_local_bytes(p) for p in trainable),
        "grads": sum(_local_bytes(p.grad) for p in trainable if p.grad is not None),
        "optimizer_state": state,
        "inference_copy": inference,
        "reference": reference,
        "n_params_trainable": sum(p.numel() for p in trainable),
    }


def worker(args) -> None:
    rss_import_start = _rss()
    import torch

    from steppo_fast.trainer.comm import init_from_env
    from steppo_fast.trainer.config import TrainConfig
    from steppo_fast.trainer.loop import Trainer

    rss_imported = _rss()
    t0 = time.perf_counter()
    cfg = TrainConfig(
        env=args.env,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        groups=args.groups,
        group_size=args.group_size,
        epochs=args.epochs,
        minibatches=args.minibatches,
        kl_coef=args.kl_coef,
        shard=args.shard,
        device="cpu",
        threads=1,
        progress=False,
        plot=False,
        eval_every=0,
        out=os.path.join(args.tmp, "run"),
    )
    comm = init_from_env("cpu")
    trainer = Trainer(cfg, comm)  # one process: a LocalComm
    rss_setup, hwm_setup = _rss(), _hwm()
    held_setup = _held(trainer)

    step_rss: list[dict] = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: step_rss.append({"before": _rss()}) and None
    )
    trainer.optimizer.register_step_post_hook(lambda *_: step_rss[-1].update(after=_rss()))
    _reset_hwm()
    for _ in range(args.iters):
        row = trainer.step()
    rss_end, hwm_iters = _rss(), _hwm()
    held_end = _held(trainer)
    if trainer.is_main:
        os.makedirs(trainer.out, exist_ok=True)
    comm.barrier()
    _reset_hwm()
    trainer.save_checkpoint()
    hwm_checkpoint = _hwm()
    result = {
        "rank": comm.rank,
        "world": comm.world,
        "rss_python_start": rss_import_start,
        "rss_after_imports": rss_imported,
        "rss_after_setup": rss_setup,
        "peak_setup": hwm_setup,
        "peak_iterations": hwm_iters,
        "rss_end": rss_end,
        "peak_checkpoint": hwm_checkpoint,
        "peak_process": _hwm(),  # after the resets: max of the checkpoint phase and now
        "step_rss": step_rss,
        "held_setup": held_setup,
        "held_end": held_end,
        "tokens": row["tokens"],
        "optimizer_steps": len(step_rss),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.tmp, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    comm.close()


# ---------------------------------------------------------------------- parent
MODEL_FLAGS = ("env", "hidden_size", "num_layers", "num_heads", "groups", "group_size")


def run_config(args, nproc: int, shard: str, kl_coef: float, env_extra: dict) -> list[dict]:
    """Run one configuration in fresh processes; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--worker", "--tmp", tmp, "--shard", shard, "--kl-coef", str(kl_coef)]
        for name in (*MODEL_FLAGS, "epochs", "minibatches", "iters"):
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
        script = os.path.abspath(__file__)
        if nproc == 1:
            cmd = [sys.executable, script, *flags]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                script,
                *flags,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env_extra}
        env.pop("WORLD_SIZE", None)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return [
            json.load(open(os.path.join(tmp, f"rank{r}.json"), encoding="utf-8"))
            for r in range(nproc)
        ]


def summarise(rank: dict, nproc: int, shard: str) -> dict:
    """One table row: measured bytes vs the docs' formula (MiB)."""
    h = rank["held_end"]
    P, P_pol = h["P_trainable_full"], h["P_policy_full"]
    w = nproc if shard == "fsdp" else 1
    training = h["params"] + h["grads"] + h["optimizer_state"]
    held = training + h["inference_copy"] + h["reference"]
    # docs/scaling.md: 4P/W + inference copy P (+ reference), with the reference = the policy
    formula = 4 * P / w + (P if w > 1 else 0) + (P_pol if h["reference"] else 0)
    before = max(s["before"] for s in rank["step_rss"])
    return {
        "rank": rank["rank"],
        "held_params": h["params"] / MIB,
        "held_grads": h["grads"] / MIB,
        "held_adamw": h["optimizer_state"] / MIB,
        "held_inference": h["inference_copy"] / MIB,
        "held_reference": h["reference"] / MIB,
        "held_total": held / MIB,
        "formula": formula / MIB,
        "rss_imports": rank["rss_after_imports"] / MIB,
        "rss_setup": rank["rss_after_setup"] / MIB,
        "peak_setup": rank["peak_setup"] / MIB,
        "rss_step_max": before / MIB,
        "peak_iters": rank["peak_iterations"] / MIB,
        "peak_iters_minus_imports": (rank["peak_iterations"] - rank["rss_after_imports"]) / MIB,
        "peak_ckpt": rank["peak_checkpoint"] / MIB,
        "seconds": rank["seconds"],
    }


COLUMNS = [
    "config",
    "rank",
    "held_total",
    "formula",
    "rss_imports",
    "rss_setup",
    "peak_setup",
    "rss_step_max",
    "peak_iters",
    "peak_iters_minus_imports",
    "peak_ckpt",
    "seconds",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--kl-coef", type=float, default=1e-3, help=argparse.SUPPRESS)
    parser.add_argument("--env", default="doors")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument(
        "--no-mmap-variant",
        dest="mmap_variant",
        action="store_false",
        help="skip the rerun of every configuration with MALLOC_MMAP_THRESHOLD_=65536",
    )
    parser.add_argument("--name", default="fsdp_memory")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.harness import print_table, write_results

    load_start = os.getloadavg()
    allocators = {"glibc": {}, "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    if not args.mmap_variant:
        allocators.pop("mmap64k")
    configs = [(1, "none", 1e-3), (1, "none", 0.0)]
    configs += [(2, shard, kl) for kl in (1e-3, 0.0) for shard in ("none", "fsdp")]
    rows, raw = [], []
    for alloc, extra in allocators.items():
        for nproc, shard, kl in configs:
            label = f"{nproc}p-{shard if nproc > 1 else 'single'}-kl{kl:g}-{alloc}"
            print(f"running {label} ...", flush=True)
            ranks = run_config(args, nproc, shard, kl, extra)
            raw.append(
                {
                    "config": label,
                    "nproc": nproc,
                    "shard": shard,
                    "kl_coef": kl,
                    "allocator_env": extra,
                    "ranks": ranks,
                }
            )
            for r in ranks:
                rows.append({"config": label, **summarise(r, nproc, shard)})
    print_table(rows, COLUMNS)
    h = raw[0]["ranks"][0]["held_end"]
    print(
        f"P (trainable fp32) = {h['P_trainable_full'] / MIB:.1f} MiB "
        f"({h['n_params_trainable'] / 1e6:.1f} M params), policy {h['P_policy_full'] / MIB:.1f} MiB"
    )
    meta_load = {"loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    path = write_results(
        args.name,
        rows,
        **meta_load,
        settings={k: getattr(args, k) for k in (*MODEL_FLAGS, "epochs", "minibatches", "iters")},
        units="MiB (rows); bytes (raw)",
        raw=raw,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
