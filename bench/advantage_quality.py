"""Per-step advantage quality against the environment's optimal solver.

Question: does a step-level critic (StepPO) give each step an advantage whose sign says whether
that step's action was a good one, more often than a trajectory-level (GRPO / GSPO), anchor-state
(GiGPO) or token-level (PPO) advantage does?

Ground truth: the env's scripted solver (``steppo_fast.trainer.sft.SOLVERS``) is optimal and
reads only the observations so far, so every step of a sampled episode can be labelled
``optimal`` (the action taken equals the solver's action in that state) or not, by replaying the
episode from its seed. On the batches of real training runs (``--algos``: each runs ``--iters``
iterations from ``--init``; the run's own critic, trained as usual), every algorithm's advantage
is computed on the *same* batch with that algorithm's defaults:

- ``steppo``: whitened step GAE with the running critic's step values (``steppo`` runs only;
  also ``steppo_lam0.9`` and ``steppo_lam0`` = the TD error ``r + V(s') - V(s)``: the same
  values with a shorter GAE horizon, a what-if the run did not train on);
- ``ppo``: whitened token GAE with the running critic's token values, averaged over each step's
  action tokens (``ppo`` runs only);
- ``grpo`` (= ``gspo``'s advantage): the group-normalised episode return, the same for every
  step of an episode;
- ``gigpo``: episode + anchor-state step advantage;
- ``rtg``: the undiscounted return-to-go minus the batch mean (a critic-free step baseline).

Scores per iteration and advantage, over the steps with a non-zero advantage:

    agree = fraction of steps with sign(A_s) = +1 if optimal(s) else -1
    mass  = sum_s A_s * y_s / sum_s |A_s|,     y_s = +1 if optimal(s) else -1   (in [-1, 1])
    zero  = fraction of steps with A_s == 0 (no signal at all)

``agree`` = 0.5 and ``mass`` = 0 mean the advantage carries no information about which actions
were right. The same scores of the *within-episode* part ``A_s - mean_{s' in episode} A_s'``
(under ``"within"`` in the JSON) ask the credit-assignment question proper: inside one
episode, are the right steps ranked above the wrong ones? A trajectory-level advantage (grpo)
has no within-episode part (``zero`` = 1). Output: one JSON file (per run, per iteration, per
advantage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time

import torch

from steppo_fast.envs import make_env
from steppo_fast.trainer import loop as loop_mod
from steppo_fast.trainer.algorithms import compute_targets
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.rollout import action_text
from steppo_fast.trainer.sft import SOLVERS


def optimal_labels(env_name: str, tokenizer, trajectories: list[dict]) -> list[bool]:
    """One bool per step (batch order): the step's action equals the solver's action."""
    solve = SOLVERS[env_name]
    labels = []
    for traj in trajectories:
        env = make_env(env_name)
        observations = [env.reset(traj["seed"])]
        for step in traj["steps"]:
            text = action_text(tokenizer, step["action_ids"])
            labels.append(text == solve(env, observations))
            obs, *_ = env.step(text)
            observations.append(obs)
    return labels


def scores(adv: torch.Tensor, optimal: torch.Tensor) -> dict:
    """``agree`` / ``mass`` / ``zero`` of step advantages ``adv`` [S] against ``optimal`` [S]."""
    adv = adv.double()
    y = optimal.double() * 2 - 1
    nz = adv != 0
    n = int(nz.sum())
    return {
        "agree": float(((adv.sign() == y) & nz).double().sum()) / n if n else None,
        "mass": float((adv * y).sum() / adv.abs().sum()) if n else None,
        "zero": float((~nz).double().mean()),
        "mean_opt": float(adv[optimal].mean()) if optimal.any() else None,
        "mean_sub": float(adv[~optimal].mean()) if (~optimal).any() else None,
    }


def within(adv: torch.Tensor, traj: torch.Tensor) -> torch.Tensor:
    """``adv`` [S] minus its episode's mean (``traj`` [S]: each step's episode), rounded to
    1e-9 so that an advantage constant over an episode gives exactly 0."""
    adv = adv.double().cpu()
    n = int(traj.max()) + 1 if traj.numel() else 0
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, traj, adv)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, traj, torch.ones_like(adv))
    out = adv - (sums / counts)[traj]
    return torch.where(out.abs() < 1e-9, torch.zeros_like(out), out)


def step_advantages(cfg: TrainConfig, batch, targets) -> dict[str, torch.Tensor]:
    """Every algorithm's step advantage [S] on ``batch`` (the run's own one from ``targets``)."""
    out = {}
    if targets.token_units:  # ppo: mean over each step's action tokens
        counts = batch.step_num_actions.cpu()
        step_of = torch.repeat_interleave(torch.arange(batch.num_steps), counts)
        sums = torch.zeros(batch.num_steps, dtype=torch.float64)
        sums.index_add_(0, step_of, targets.advantages.double().cpu())
        out["ppo"] = sums / counts.double()
    else:
        out[cfg.algo] = targets.advantages.double()
    if cfg.algo == "steppo":  # the same critic values, shorter GAE horizons (lam < 1)
        for lam in (0.9, 0.0):
            other = dataclasses.replace(cfg, lam=lam).resolved()
            adv = compute_targets(other, batch, targets.old_values).advantages
            out[f"steppo_lam{lam:g}"] = adv.double()
    for algo in ("grpo", "gigpo"):
        other = dataclasses.replace(cfg, algo=algo, gamma=None, lam=None).resolved()
        out[algo] = compute_targets(other, batch, None).advantages.double()
    rtg = compute_targets(
        dataclasses.replace(cfg, algo="steppo", gamma=1.0, lam=1.0).resolved(),
        batch,
        torch.zeros(batch.num_steps),
    ).raw_advantages.double()
    out["rtg"] = rtg - rtg.mean()
    return out


def run(cfg: TrainConfig, log=print) -> list[dict]:
    """Train ``cfg`` for ``cfg.iters`` iterations; score every iteration's advantages."""
    captured: dict = {}
    rows: list[dict] = []
    original = loop_mod.compute_targets

    def hooked(c, batch, values, *rest):  # rest: the trainer's comm, where it passes one
        targets = original(c, batch, values, *rest)
        captured["batch"], captured["targets"] = batch, targets
        return targets

    trainer = loop_mod.Trainer(cfg)
    collect = trainer.collect

    def collect_hook(seeds, groups, *, greedy, generator, desc):
        res = collect(seeds, groups, greedy=greedy, generator=generator, desc=desc)
        if desc.startswith("rollout"):
            captured["trajectories"] = res.trajectories
        return res

    trainer.collect = collect_hook
    loop_mod.compute_targets = hooked
    try:
        while trainer.iteration < cfg.iters:
            row = trainer.step()
            batch, targets = captured["batch"], captured["targets"]
            labels = optimal_labels(cfg.env, trainer.tokenizer, captured["trajectories"])
            optimal = torch.tensor(labels, dtype=torch.bool)
            assert optimal.numel() == batch.num_steps
            advs = step_advantages(cfg, batch, targets)
            traj = batch.step_traj.cpu().long()
            entry = {
                "iter": trainer.iteration,
                "success_rate": row["success_rate"],
                "steps": batch.num_steps,
                "optimal_frac": float(optimal.double().mean()),
                "explained_var": row.get("critic/explained_var"),
                "scores": {k: scores(v, optimal) for k, v in advs.items()},
                "within": {k: scores(within(v, traj), optimal) for k, v in advs.items()},
            }
            rows.append(entry)
            log(
                f"{cfg.algo} s{cfg.seed} it {entry['iter']} succ {row['success_rate']:.2f} "
                f"opt {entry['optimal_frac']:.2f} "
                + " ".join(
                    f"{k}:{_r(s['agree'])}/{_r(entry['within'][k]['agree'])}"
                    for k, s in entry["scores"].items()
                )
            )
    finally:
        loop_mod.compute_targets = original
    return rows


def _r(x):
    return x if x is None else round(x, 3)


def positions(env: str, init: str, episodes: int = 128, seed: int = 7) -> dict:
    """Where the optimal steps sit: ``episodes`` sampled episodes of the ``init`` policy (groups
    of 4 per task, task seeds from 5000), each step labelled; per outcome, the fraction of
    optimal steps and the mean relative position ``j / (n - 1)`` in the episode of optimal and
    of other steps; and the optimal fraction among the first 5 steps vs the later ones."""
    cfg = TrainConfig(env=env, init=init, algo="grpo", progress=False, plot=False, threads=1)
    trainer = loop_mod.Trainer(dataclasses.replace(cfg, out="/tmp/advq-positions"))
    gen = torch.Generator().manual_seed(seed)
    seeds = [5000 + i // 4 for i in range(episodes)]
    res = trainer.collect(
        seeds, [i // 4 for i in range(episodes)], greedy=False, generator=gen, desc="rollout"
    )
    labels = iter(optimal_labels(env, trainer.tokenizer, res.trajectories))
    rows = []
    for traj in res.trajectories:
        n = len(traj["steps"])
        rows += [(traj["success"], j / max(n - 1, 1), j, next(labels)) for j in range(n)]
    out = {}
    for name, success in (("succeeded", True), ("failed", False)):
        sel = [r for r in rows if r[0] == success]
        opt = [r[1] for r in sel if r[3]]
        sub = [r[1] for r in sel if not r[3]]
        out[name] = {
            "steps": len(sel),
            "optimal_frac": len(opt) / len(sel) if sel else None,
            "rel_pos_optimal": sum(opt) / len(opt) if opt else None,
            "rel_pos_other": sum(sub) / len(sub) if sub else None,
        }
    first = [r[3] for r in rows if r[2] < 5]
    later = [r[3] for r in rows if r[2] >= 5]
    out["optimal_frac_first5"] = sum(first) / len(first) if first else None
    out["optimal_frac_later"] = sum(later) / len(later) if later else None
    return out


def summarize(paths: list[str]) -> str:
    """Markdown: per file (run algorithm) and advantage, the mean over runs and iterations of
    ``agree`` / ``mass`` (whole advantage) and of the within-episode ones (iterations where a
    score is undefined, e.g. every return equal, are left out; ``n`` counts the rest)."""
    lines = [
        "| env | runs of | advantage | agree | mass | within-episode agree | within-episode mass "
        "| steps with A = 0 | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        env = data["meta"]["args"]["env"]
        algos = sorted({r["algo"] for r in data["runs"]})
        keys = list(data["runs"][0]["iters"][0]["scores"])
        for key in keys:
            vals: dict[str, list[float]] = {}
            for run_ in data["runs"]:
                for it in run_["iters"]:
                    for part, name in (("scores", ""), ("within", "w_")):
                        for m in ("agree", "mass", "zero"):
                            v = it[part][key][m]
                            if v is not None:
                                vals.setdefault(name + m, []).append(v)
            m = {k: f"{sum(xs) / len(xs):.3f}" for k, xs in vals.items() if xs}
            lines.append(
                f"| {env} | {','.join(algos)} | {key} | {m.get('agree', '-')} "
                f"| {m.get('mass', '-')} | {m.get('w_agree', '-')} | {m.get('w_mass', '-')} "
                f"| {m.get('zero', '-')} "
                f"| {len(vals.get('agree', []))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table and exit")
    ap.add_argument(
        "--positions", action="store_true", help="print where optimal steps sit (--init policy)"
    )
    ap.add_argument("--env", default="quest")
    ap.add_argument("--init", default="", help="steppo sft model folder (warm start)")
    ap.add_argument("--algos", default="steppo,ppo")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="", help="results JSON (required to train)")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.positions:
        print(json.dumps(positions(args.env, args.init), indent=1))
        return 0
    if not args.out:
        ap.error("--out: a results JSON path is required")
    torch.set_num_threads(1)
    t0 = time.time()
    runs = []
    for algo in args.algos.split(","):
        for seed in range(args.seeds):
            cfg = TrainConfig(
                env=args.env,
                algo=algo,
                seed=seed,
                iters=args.iters,
                groups=args.groups,
                lr=args.lr,
                init=args.init,
                eval_every=0,
                plot=False,
                progress=False,
                threads=1,
                out=os.path.join("/tmp", f"advq-{args.env}-{algo}-s{seed}-{os.getpid()}"),
            )
            runs.append({"algo": algo, "seed": seed, "iters": run(cfg)})
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "args": vars(args),
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg_end": os.getloadavg()[0],
        "wall_s": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
