"""Workers of tests/trainer/test_distributed.py (a module of its own so
``torch.multiprocessing.spawn`` can import them in the child processes).

- :func:`one_update`: a fixed rollout batch (the same episodes on every rank: one fixed-seed
  rollout of the whole batch with fixed rewards, then each rank keeps its task groups) and one
  ``ppo_update``
  (2 epochs x 2 mini-batches, several micro-batches, KL to a reference): returns the flat
  parameters after it. ``comm=LocalComm()`` is the single-process update.
- :func:`worker`: the entry point of each spawned rank (gloo over a file store).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from steppo_fast import StepBatch
from steppo_fast.envs import default_tokenizer, make_env
from steppo_fast.trainer.algorithms import compute_targets
from steppo_fast.trainer.comm import Comm, global_traj_ids, rank_groups
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.fsdp import ShardedModels
from steppo_fast.trainer.loop import Trainer, train_seed
from steppo_fast.trainer.policy import Critic, build_policy
from steppo_fast.trainer.rollout import rollout
from steppo_fast.trainer.update import Models, forward, ppo_update, reference_logprobs

# (algorithm, optimizer, mini-batches): SGD makes the parameters linear in the gradient, so a
# wrong gradient scale (e.g. averaged instead of summed over ranks) shows; AdamW is what the
# trainer uses. With 4 mini-batches of 2 trajectories some mini-batches lie on one rank only
# (shuffle seed 1: the other rank contributes no micro-batch and no gradient to that step).
CASES = (
    ("steppo", "adamw", 2),
    ("steppo", "sgd", 2),
    ("steppo", "sgd", 4),
    ("ppo", "sgd", 2),
    ("grpo", "sgd", 2),
)
# the same updates with the policy and critic sharded by FSDP2 (steppo_fast.trainer.fsdp); with
# 4 mini-batches one rank runs zero-loss dummy micro-batches while the other trains
FSDP_CASES = (
    ("steppo", "adamw", 2),
    ("steppo", "sgd", 4),
    ("ppo", "sgd", 2),
    ("grpo", "adamw", 2),
)


def update_cfg(algo: str, minibatches: int) -> TrainConfig:
    return TrainConfig(
        algo=algo,
        env="doors",
        hidden_size=32,
        num_heads=2,
        num_layers=1,
        groups=4,
        group_size=2,
        epochs=2,
        minibatches=minibatches,
        micro_batch_tokens=96,  # several micro-batches per mini-batch
        lr=1e-2,
        critic_lr=1e-2,
        kl_coef=0.05,
        impl="torch",
    ).resolved()


def flat_params(models: Models) -> torch.Tensor:
    params = list(models.policy.parameters())
    if models.critic is not None:
        params += list(models.critic.parameters())
    return torch.cat([p.detach().reshape(-1) for p in params])


def one_update(algo: str, optim: str, minibatches: int, comm: Comm, shard: bool = False) -> dict:
    cfg = update_cfg(algo, minibatches)
    tok = default_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(cfg, tok).eval()
    critic = Critic(policy, shared=False).eval() if cfg.uses_critic else None
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    models = Models(policy, critic, reference, impl=cfg.impl)
    init = flat_params(models).clone()
    sharded = ShardedModels(models) if shard else None  # shards policy and critic in place
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic_lr})
    if optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.5)
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    infer = models if sharded is None else sharded.inference

    task_groups = [g for g in range(cfg.groups) for _ in range(cfg.group_size)]
    seeds = [train_seed(cfg.seed, 0, g, cfg.groups) for g in task_groups]
    res = rollout(
        infer.policy,
        tok,
        lambda: make_env(cfg.env),
        seeds,
        task_groups,
        use_grammar=True,
        generator=torch.Generator().manual_seed(7),
    )
    for i, traj in enumerate(res.trajectories):  # fixed rewards that differ within groups
        traj["steps"][-1]["reward"] = float(i % 3) - 0.5 * len(traj["steps"])
    full = StepBatch.from_trajectories(res.trajectories)
    # this rank's groups (all of them on one process), as the trainer's step selects them
    traj_ids = global_traj_ids(rank_groups(cfg.groups, comm), cfg.group_size)
    sel = full.select_trajectories(traj_ids)
    batch, masks = sel.batch, res.masks[full.actions_of_steps(sel.step_index)]
    value_units = "token" if algo == "ppo" else ("step" if cfg.uses_critic else None)
    with torch.no_grad():
        out = forward(infer, batch, masks, cfg.temperature, value_units)
        ref_logp = reference_logprobs(reference, batch, masks, cfg.temperature, "padded", cfg.impl)
    targets = compute_targets(cfg, batch, out.values, comm)
    stats = ppo_update(
        cfg,
        models,
        optimizer,
        batch,
        masks,
        targets,
        out.logp,
        ref_logp,
        torch.Generator().manual_seed(1),
        comm=comm,
        traj_ids=traj_ids,
        sharded=sharded,
    )
    held = {}  # elements this rank holds: parameters, and AdamW/SGD state tensors
    if sharded is not None:
        sharded.refresh()
        assert all(isinstance(p, DTensor) for p in policy.parameters())  # really sharded
        params = [p for group in optimizer.param_groups for p in group["params"]]
        held["params"] = sum(p.to_local().numel() for p in params)
        held["full"] = sum(p.numel() for p in params)
        held["state"] = sum(
            v.to_local().numel()
            for st in optimizer.state.values()
            for v in st.values()
            if isinstance(v, DTensor)
        )
    return {
        "held": held,
        "init": init,
        "params": flat_params(infer),
        "stats": stats,
        "num_trajs": batch.num_trajs,
        "num_mbs_full": len(full.microbatches(cfg.micro_batch_tokens)),
    }


def train_cfg(out: str, iters: int) -> TrainConfig:
    return TrainConfig(
        out=out,
        env="doors",
        iters=iters,
        groups=2,
        group_size=2,
        hidden_size=32,
        num_heads=2,
        num_layers=1,
        eval_every=0,
        plot=False,
        progress=False,
        checkpoint_every=1,
        micro_batch_tokens=128,
        impl="torch",
    )


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm = Comm(rank, world)
    results = {case: one_update(*case, comm) for case in CASES}
    results.update({("fsdp", *case): one_update(*case, comm, shard=True) for case in FSDP_CASES})
    # a 1-iteration run (FSDP by default) that saves a checkpoint; the test resumes it on 1 rank
    trainer = Trainer(train_cfg(os.path.join(out_dir, "run"), iters=1), comm)
    trainer.train()
    results["sharded"] = trainer.sharded is not None
    results["trained"] = flat_params(trainer.inference_models())
    results["rows"] = trainer.rows
    # the single-process checkpoint the test made in <out>/single, resumed on 2 sharded ranks:
    # its state read back right after loading, then one more iteration
    cfg = dataclasses.replace(train_cfg(os.path.join(out_dir, "single"), iters=2), resume=True)
    resumed = Trainer(cfg, comm)
    resumed.prepare_run_dir()
    state = resumed.state()  # every rank: gathers the sharded optimizer state
    # copies: the state dicts share storage with the live parameters, which training changes
    keep = {k: state[k] for k in ("policy", "critic", "optimizer", "iteration")}
    results["resumed"] = copy.deepcopy(keep)
    resumed.train()
    results["resumed_rows"] = resumed.rows
    # a run folder rank 0 refuses (a run is there, no --resume): every rank raises, none hangs
    try:
        Trainer(train_cfg(os.path.join(out_dir, "run"), iters=1), comm).train()
    except (ValueError, RuntimeError) as e:
        results["refused"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    comm.close()
