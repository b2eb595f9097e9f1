"""Training forward + backward of the trainer's tiny model: padded rows vs one packed row.

Modes (``steppo_fast.trainer.policy.hidden_states``): ``padded`` (the CPU default: length-sorted
right-padded buckets with a 2-D padding mask), ``packed`` (one row, ``"steppo_varlen"``
attention fed ``cu_seqlens``: causal SDPA per sequence, no mask), and ``packed_mask`` (one row,
sdpa with transformers' packed-sequence [N, N] mask built from ``position_ids``: the path
``packed`` replaced; skipped above ``--mask-max-tokens``). Shapes: R sequences of L tokens
(``RxL``), or ``RxL~`` for lengths drawn uniformly in [L/4, L] (uneven, as real rollouts).
Best of ``--reps`` after one warm-up, in this process, 1 torch thread; writes
``bench/results/packed_forward.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch


def _harness():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_of(shape: str):
    from steppo_fast import StepBatch

    uneven = shape.endswith("~")
    r, n = (int(x) for x in shape.rstrip("~").split("x"))
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for _ in range(r):
        length = int(torch.randint(n // 4, n + 1, (1,), generator=gen)) if uneven else n
        prompt = torch.randint(6, 60, (length - 4,), generator=gen).tolist()
        step = {"prompt_ids": prompt, "action_ids": [7, 8, 9, 10], "reward": 1.0}
        trajs.append({"steps": [step], "terminated": True, "group": 0})
    return StepBatch.from_trajectories(trajs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="64x70,64x70~,64x400,64x400~,16x2000~")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mask-max-tokens", type=int, default=5000)
    args = p.parse_args()
    harness = _harness()
    torch.set_num_threads(1)
    from steppo_fast.trainer.config import TrainConfig
    from steppo_fast.trainer.modeling import packed_forward
    from steppo_fast.trainer.policy import build_policy, build_tokenizer, hidden_states

    cfg = TrainConfig().resolved()
    torch.manual_seed(0)
    model = build_policy(cfg, build_tokenizer(cfg))
    modes = {
        "padded": lambda b: hidden_states(model, b, "padded"),
        "packed": lambda b: hidden_states(model, b, "packed"),
        "packed_mask": lambda b: packed_forward(model, b, attention="position_ids"),
    }
    rows = []
    for shape in args.shapes.split(","):
        batch = batch_of(shape)
        row = {"shape": shape, "tokens": batch.num_tokens, "loadavg_1m": os.getloadavg()[0]}
        for mode, fn in modes.items():
            if mode == "packed_mask" and batch.num_tokens > args.mask_max_tokens:
                continue

            def run(fn=fn, batch=batch):
                model.zero_grad(set_to_none=True)
                fn(batch).square().mean().backward()

            row[f"{mode}_s"] = harness.best_time(run, reps=args.reps)
        row["packed_over_padded"] = row["packed_s"] / row["padded_s"]
        rows.append(row)
        print(row, flush=True)
    print(harness.write_results("packed_forward", rows, model="steppo train tiny (64 x 2)"))


if __name__ == "__main__":
    main()
