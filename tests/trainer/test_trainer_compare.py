"""``steppo compare`` end to end with tiny runs (2 algorithms x 1-2 seeds x 2 iterations): the
same training tasks and initial weights for every algorithm, reuse / resume per (algo, lr,
seed) after a simulated kill, refusal of a folder of another config, ``--init`` reaching every
run, the CLI's flags and errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from _trainer_setup import register_one_door, small_cfg

from steppo_fast.trainer import loop
from steppo_fast.trainer.checkpoint import checkpoint_iteration
from steppo_fast.trainer.cli import main
from steppo_fast.trainer.compare import LOCK, parse_lr_grid, run_compare, run_dir_name
from steppo_fast.trainer.fields import ConfigError
from steppo_fast.trainer.loop import Trainer
from steppo_fast.trainer.runfiles import read_metrics
from steppo_fast.trainer.sft import SOLVERS, SFTConfig, run_sft

ENV = register_one_door("compare-door")


def _base(**kw):
    kw = {"eval_every": 1, "eval_episodes": 4, "groups": 2, "group_size": 2, **kw}
    return small_cfg(None, kw.pop("env", ENV), out="unused", **kw)


def _compare(out, algos=("grpo", "steppo"), seeds=2, grid=None, **kw):
    grid = grid or {a: [1e-3] for a in algos}
    return run_compare(_base(**kw), list(algos), seeds, str(out), lr_grid=grid, log=None)


def _metrics(out, algo, seed, lr=1e-3):
    rows = read_metrics(os.path.join(out, run_dir_name(algo, lr, seed), "metrics.jsonl"))
    return [{k: v for k, v in r.items() if "wall" not in k and not k.endswith("_s")} for r in rows]


def test_same_tasks_and_initial_weights_for_every_algorithm(tmp_path, monkeypatch):
    seen: dict[tuple, list] = {}
    first_weights: dict[tuple, dict] = {}
    real_rollout, real_init = loop.rollout, Trainer.__init__

    def spy_rollout(policy, tok, factory, seeds, groups, **kw):
        if not kw.get("greedy"):  # training rollouts (evaluation is greedy here)
            seen.setdefault(key[0], []).append(list(seeds))
        return real_rollout(policy, tok, factory, seeds, groups, **kw)

    def spy_init(self, cfg, *a, **kw):
        real_init(self, cfg, *a, **kw)
        # keyed by the folder the protocol planned (<algo>-lr<lr>-s<seed>), not by what the
        # config says, so a run with another seed than planned shows up
        algo, lr, seed = os.path.basename(self.cfg.out).split("-")
        key[0] = (algo, float(lr[2:]), int(seed[1:]))
        first_weights[key[0]] = {k: v.clone() for k, v in self.models.policy.state_dict().items()}

    key = [None]
    monkeypatch.setattr(loop, "rollout", spy_rollout)
    monkeypatch.setattr(Trainer, "__init__", spy_init)
    grid = {"grpo": [1e-3, 3e-4], "steppo": [1e-3]}
    _compare(tmp_path, grid=grid)
    runs = sorted(seen)
    assert len(runs) == 6 and all(len(seen[r]) == 2 for r in runs)  # 2 iterations each
    for seed in (0, 1):
        same = [r for r in runs if r[2] == seed]
        for r in same[1:]:
            assert seen[r] == seen[same[0]], r  # identical task seeds, iteration by iteration
            for name, w in first_weights[r].items():
                assert torch.equal(w, first_weights[same[0]][name]), (r, name)
    assert seen[("grpo", 1e-3, 0)] != seen[("grpo", 1e-3, 1)]  # each seed has its own tasks


def test_kill_then_rerun_resumes_and_reuses(tmp_path, monkeypatch):
    ref = tmp_path / "uninterrupted"
    _compare(ref, threads=1)
    out = tmp_path / "killed"
    real_step = Trainer.step

    def killed_at_2(self):
        if self.cfg.algo == "steppo" and self.cfg.seed == 1 and self.iteration == 1:
            raise KeyboardInterrupt  # after iteration 1's checkpoint (checkpoint_every 1)
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        _compare(out, threads=1)
    monkeypatch.setattr(Trainer, "step", real_step)
    killed = out / run_dir_name("steppo", 1e-3, 1)
    assert checkpoint_iteration(str(killed)) == 1 and not (out / "results.md").exists()
    done_before = {n: os.path.getmtime(out / n / "checkpoint.pt") for n in os.listdir(out)}
    calls = []
    real_train = Trainer.train

    def counted(self, log=print):
        calls.append(self.cfg.out)
        return real_train(self, log)

    monkeypatch.setattr(Trainer, "train", counted)
    _compare(out, threads=1)
    assert calls == [str(killed)]  # the three finished runs are reused, not rerun
    for name, mtime in done_before.items():
        if out / name != killed:
            assert os.path.getmtime(out / name / "checkpoint.pt") == mtime, name
    segments = json.loads((killed / "compare_run.json").read_text())["segments"]
    assert [s["iterations"] for s in segments] == [[1, 2]]  # resumed from iteration 1
    for algo in ("grpo", "steppo"):
        for seed in (0, 1):  # the resumed run equals the uninterrupted one
            assert _metrics(out, algo, seed) == _metrics(ref, algo, seed), (algo, seed)
    assert (out / "results.md").read_text().count("| steppo | 0.001 | 2 |") == 1


def test_a_folder_of_another_config_is_refused(tmp_path):
    _compare(tmp_path, algos=("grpo",), seeds=1)
    before = (tmp_path / run_dir_name("grpo", 1e-3, 0) / "metrics.jsonl").read_text()
    for change, flag in ((dict(iters=3), "--iters"), (dict(env="doors"), "--env")):
        with pytest.raises(ConfigError, match=f"was run with {flag} .* rather than mix configs"):
            _compare(tmp_path, algos=("grpo",), seeds=1, **change)
    assert (tmp_path / run_dir_name("grpo", 1e-3, 0) / "metrics.jsonl").read_text() == before


def test_init_reaches_every_run(tmp_path, monkeypatch):
    monkeypatch.setitem(SOLVERS, ENV, SOLVERS["doors"])  # the corridor's solver, one door
    sft = small_cfg(None, ENV, out=str(tmp_path / "sft"))
    run_sft(sft, SFTConfig(demos=4, steps=3, batch=2), log=None)
    init = str(tmp_path / "sft" / "model")
    out = tmp_path / "cmp"
    _compare(out, seeds=2, init=init)
    from safetensors.torch import load_file

    want = load_file(os.path.join(init, "model.safetensors"))
    for algo in ("grpo", "steppo"):
        for seed in (0, 1):
            run = out / run_dir_name(algo, 1e-3, seed)
            assert f"init: {init}" in (run / "config.yaml").read_text()
            # the KL reference is the initial policy: the SFT weights, on every run
            ref = torch.load(run / "checkpoint.pt", weights_only=True)["reference"]
            for name, w in want.items():
                assert torch.equal(ref[name], w), (algo, seed, name)
    assert f"init {init}" in (out / "results.md").read_text()


def test_cli_flags_and_errors(tmp_path, capsys):
    never = tmp_path / "never"  # a compare that wrongly starts stays tiny and is seen
    tiny = ["--out", str(never), "--seeds", "1", "--iters", "1", "--env", ENV, "--groups", "1"]
    tiny += ["--group-size", "1", "--hidden-size", "32", "--num-heads", "2"]

    def err(args):
        try:
            status = main(["compare", *tiny, *args])  # the case's own flags win
        except SystemExit as e:  # argparse's own errors (one line too, status 2)
            status = e.code
        assert status == 2
        return capsys.readouterr().err.strip()

    assert "--lr-grid: 'ppo=1e-3': ppo is not in --algos" in err(
        ["--algos", "grpo", "--lr-grid", "ppo=1e-3"]
    )
    assert "entry 1 ('x') is not a number" in err(["--lr-grid", "1e-3,x"])
    assert "entry 0 must be > 0" in err(["--lr-grid", "0"])
    assert "--eval-every: compare needs held-out evaluations" in err(["--eval-every", "0"])
    assert "--critic-lr-ratio: must be > 0" in err(["--critic-lr-ratio", "-1"])
    assert "unrecognized arguments: --lr" in err(["--lr", "1e-3"])  # the grid sets it
    assert "'grpo=1e-2': grpo's grid is given twice" in err(
        ["--algos", "grpo", "--lr-grid", "grpo=1e-3", "--lr-grid", "grpo=1e-2"]
    )
    assert "the grid of every algorithm is given twice" in err(["--lr-grid", "1", "--lr-grid", "2"])
    assert "--seed-base: the last seed 65535 + 2 - 1 must be < 65536" in err(
        ["--seed-base", "65535", "--seeds", "2"]
    )
    assert "--select-seeds: 2 of --seeds 3 leave 1 seeds to report" in err(
        ["--seeds", "3", "--select-seeds", "2"]
    )
    assert not never.exists()
    grid = parse_lr_grid(["3e-4,1e-3", "grpo=1e-2"], ["steppo", "grpo"])
    assert grid == {"steppo": [3e-4, 1e-3], "grpo": [1e-2]}
    assert parse_lr_grid(None, ["gspo"]) == {"gspo": [3e-4, 1e-3]}
    args = ["--algos", "grpo,steppo", "--seeds", "1", "--seed-base", "7", "--lr-grid", "2e-3"]
    args += ["--critic-lr-ratio", "0.5", "--env", ENV, "--iters", "1", "--groups", "2"]
    args += ["--group-size", "2", "--hidden-size", "32", "--num-heads", "2", "--eval-episodes"]
    args += ["2", "--eval-every", "1", "--no-plot", "--no-progress", "--out", str(tmp_path)]
    assert main(["compare", *args]) == 0
    capsys.readouterr()
    assert sorted(n for n in os.listdir(tmp_path) if "-s" in n) == [
        "grpo-lr0.002-s7",
        "steppo-lr0.002-s7",
    ]
    steppo = (tmp_path / "steppo-lr0.002-s7" / "config.yaml").read_text()
    assert "critic_lr: 0.001\n" in steppo and "seed: 7\n" in steppo  # 0.5 x 2e-3
    assert "| steppo | 0.002 | 0.001 | 1/1 |" in (tmp_path / "results.md").read_text()


def test_a_run_another_live_compare_holds_is_refused_a_dead_ones_taken_over(tmp_path):
    run = tmp_path / run_dir_name("grpo", 1e-3, 0)
    run.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # a live process that is not this one
    try:
        (run / LOCK).write_text(f"{other.pid}\n")
        with pytest.raises(ValueError, match=f"being trained by process {other.pid}"):
            _compare(tmp_path, algos=("grpo",), seeds=1)
        assert not (run / "config.yaml").exists()  # nothing ran
    finally:
        other.kill()
        other.wait()
    _compare(tmp_path, algos=("grpo",), seeds=1)  # its process ended: the lock is taken over
    assert (run / "model").is_dir() and sorted(p.name for p in run.glob(".compare*")) == []
