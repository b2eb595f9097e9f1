"""results.md of ``steppo compare`` from hand-written run folders: per-run numbers (AUC, final,
iteration to 90%), best-grid-point selection, the paired tests, the grid table, refusal of
folders of different budgets, and ``--report-only`` (no training: fast)."""

from __future__ import annotations

import os
import shutil

import pytest

from steppo_fast.trainer.cli import main
from steppo_fast.trainer.compare import run_config
from steppo_fast.trainer.compare_report import load_run, write_report
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.runfiles import write_metrics
from steppo_fast.trainer.stats import paired_t, sign_flip_p, t_interval

ITERS, EVERY = 4, 2  # held-out evaluations at iterations 0, 2, 4


def fake_run(out, algo, lr, seed, evals, train, base=None, rows_upto=ITERS):
    """A run folder as the trainer writes it: config.yaml + metrics.jsonl with held-out
    success ``evals`` at iterations 0, 2, 4, training success ``train`` at 1..4, 1 s/iter."""
    base = base or TrainConfig(env="doors", iters=ITERS, eval_every=EVERY)
    cfg = run_config(base, algo, lr, seed, str(out))
    cfg.save_yaml(os.path.join(cfg.out, "config.yaml"))
    rows = [{"iter": 0, "wall_s": 0.0, "eval_success_rate": evals[0]}]
    for i in range(1, rows_upto + 1):
        row = {"iter": i, "success_rate": train[i - 1], "wall_s": float(i)}
        if i % EVERY == 0:
            row["eval_success_rate"] = evals[i // EVERY]
        rows.append(row)
    write_metrics(os.path.join(cfg.out, "metrics.jsonl"), rows)
    return cfg.out


def test_run_numbers_by_hand(tmp_path):
    path = fake_run(tmp_path, "grpo", 1e-3, 0, [0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4])
    run = load_run(path)
    assert run.finished and run.final == 1.0
    assert run.eval_auc == (2 * 0.25 + 2 * 0.75) / 4  # trapezoid over [0, 4], / 4
    assert abs(run.train_auc - 0.25) < 1e-15
    assert (run.hit_iter, run.hit_wall, run.wall) == (4, 4.0, 4.0)
    late = load_run(fake_run(tmp_path, "grpo", 1e-3, 1, [0.0, 0.95, 0.9], [0, 0, 0, 0]))
    assert (late.hit_iter, late.hit_wall) == (2, 2.0)
    never = load_run(fake_run(tmp_path, "grpo", 1e-3, 2, [0.0, 0.5, 0.89], [0, 0, 0, 0]))
    assert never.hit_iter is None
    cut = load_run(fake_run(tmp_path, "grpo", 1e-3, 3, [0.0, 0.5, 1.0], [0] * 4, rows_upto=3))
    assert not cut.finished and cut.eval_auc is None


# per seed held-out success at iterations 0, 2, 4: steppo's AUC beats grpo's on every seed
STEPPO = [[0.0, 0.6, 1.0], [0.0, 0.5, 0.9], [0.1, 0.7, 1.0], [0.0, 0.4, 0.8], [0.0, 0.6, 0.9]]
GRPO = [[0.0, 0.3, 0.8], [0.0, 0.4, 0.7], [0.1, 0.2, 0.9], [0.0, 0.3, 0.6], [0.0, 0.5, 0.9]]
WEAK = [[0.0, 0.1, 0.2]] * 5  # a worse grid point, but with the higher training success


def _auc(e):
    return (e[0] + 2 * e[1] + e[2]) / 4  # (2 * (e0 + e1) / 2 + 2 * (e1 + e2) / 2) / 4


def _comparison(tmp_path):
    for seed in range(5):
        fake_run(tmp_path, "steppo", 1e-3, seed, STEPPO[seed], [0.2] * 4)
        fake_run(tmp_path, "steppo", 3e-4, seed, WEAK[seed], [0.9] * 4)
        fake_run(tmp_path, "grpo", 1e-3, seed, GRPO[seed], [0.3] * 4)
        fake_run(tmp_path, "grpo", 3e-4, seed, GRPO[seed], [0.3] * 4)  # a tie: smaller lr wins
    return tmp_path


def _row(text, start):
    return next(ln for ln in text.splitlines() if ln.startswith(start)).split(" | ")


def test_results_select_best_and_pair_by_seed(tmp_path):
    text = write_report(str(_comparison(tmp_path)), log=None)
    assert text == (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    steppo = _row(text, "| steppo | 0.001 | 5 |")
    a = [_auc(e) for e in STEPPO]
    b = [_auc(e) for e in GRPO]
    m, lo, hi = t_interval(a)
    assert steppo[4] == f"{m:.3f} [{lo:.3f}, {hi:.3f}]"  # held-out AUC, 95% t interval
    m, lo, hi = t_interval([e[2] for e in STEPPO])
    assert steppo[3] == f"{m:.3f} [{lo:.3f}, {hi:.3f}]"  # final held-out success
    assert steppo[6] == "4/5" and steppo[7] == "4.0"  # seeds 0, 1, 2, 4 reach 0.9 at iteration 4
    assert _row(text, "| grpo | 0.0003 | 5 |")  # tie between the lrs: the smaller one
    vs = _row(text, "| grpo | 5 |")
    t, p = paired_t(a, b)
    assert vs[3] == f"{t:.2f}" and vs[4] == f"{p:.3f}"
    assert vs[5] == "0.0625" == f"{sign_flip_p(a, b):.4f}"  # all 5 differences > 0: 2/32
    assert vs[6] == "0.0625 |"
    assert "1/16 = 0.0625 with 5 seeds" in text
    # the grid table lists every point and marks the selected ones
    assert "| steppo | 0.0003 | 0.001 | 5/5 |" in text
    assert sum(ln.endswith("| yes |") for ln in text.splitlines()) == 2
    for needle in ("Machine:", "commit", "load average", "optimistic", "Training tasks"):
        assert needle in text


def test_select_on_training_auc_picks_the_other_point(tmp_path):
    text = write_report(str(_comparison(tmp_path)), select="train-auc", log=None)
    assert _row(text, "| steppo | 0.0003 | 5 |")  # training success 0.9 > 0.2


def test_unfinished_runs_are_named_and_left_out(tmp_path):
    _comparison(tmp_path)
    fake_run(tmp_path, "grpo", 1e-3, 5, GRPO[0], [0.3] * 4, rows_upto=3)
    text = write_report(str(tmp_path), log=None)
    assert "Not finished (left out): grpo-lr0.001-s5 (4 rows)" in text
    assert "| grpo | 0.001 | - | 5/6 |" in text


def test_runs_of_another_budget_are_refused(tmp_path):
    fake_run(tmp_path, "grpo", 1e-3, 0, GRPO[0], [0.3] * 4)
    other = TrainConfig(env="doors", iters=ITERS, eval_every=EVERY, groups=8)
    fake_run(tmp_path, "steppo", 1e-3, 0, STEPPO[0], [0.3] * 4, base=other)
    with pytest.raises(ValueError, match=r"differ in --groups \(16 vs 8\)"):
        write_report(str(tmp_path), log=None)


def test_the_same_run_twice_is_refused(tmp_path):
    path = fake_run(tmp_path, "grpo", 1e-3, 0, GRPO[0], [0.3] * 4)
    shutil.copytree(path, tmp_path / "grpo-s0")  # the layout of earlier releases
    with pytest.raises(ValueError, match="both hold grpo lr 0.001 seed 0"):
        write_report(str(tmp_path), log=None)


def test_report_only_cli(tmp_path, capsys):
    _comparison(tmp_path)
    assert main(["compare", "--report-only", "--out", str(tmp_path), "--algos", "grpo"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| grpo |" in text and "| steppo |" not in text and "paired" not in text
    assert main(["compare", "--report-only", "--out", str(tmp_path / "none")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["compare", "--report-only"]) == 2
    assert "--report-only: give the comparison's --out DIR" in capsys.readouterr().err


def test_lr_in_a_compare_yaml_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("iters: 2\nlr: 0.001\n")  # equal to the default: still refused
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "never")]) == 2
    assert f"{path}:2: lr: compare takes the policy learning rates" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_run_config_varies_only_algo_lr_critic_lr_seed(tmp_path):
    base = TrainConfig(env="doors", iters=7, critic_warmup=3, critic_lr=2e-3, groups=5)
    steppo = run_config(base, "steppo", 3e-4, 4, str(tmp_path), critic_lr_ratio=10.0)
    grpo = run_config(base, "grpo", 1e-3, 4, str(tmp_path))
    assert (steppo.lr, steppo.critic_warmup, steppo.seed) == (3e-4, 3, 4)
    assert steppo.critic_lr == 10.0 * 3e-4  # R x lr, as computed
    # the critic knobs mean nothing without a critic (and --critic-warmup would be refused)
    assert (grpo.critic_lr, grpo.critic_warmup) == (TrainConfig().critic_lr, 0)
    assert run_config(base, "ppo", 1e-3, 0, str(tmp_path)).critic_lr == 2e-3  # fixed
    assert steppo.out == str(tmp_path / "steppo-lr0.0003-s4")
    same = ("env", "iters", "groups", "init", "eval_episodes", "eval_every", "model")
    assert all(getattr(steppo, k) == getattr(grpo, k) == getattr(base, k) for k in same)


def test_select_seeds_select_on_some_seeds_and_report_the_others(tmp_path):
    for seed in range(5):
        fake_run(tmp_path, "steppo", 1e-3, seed, STEPPO[seed], [0.2] * 4)
        lucky = [0.0, 1.0, 1.0] if seed < 2 else WEAK[seed]  # best on seeds 0, 1 only
        fake_run(tmp_path, "steppo", 3e-4, seed, lucky, [0.2] * 4)
        fake_run(tmp_path, "grpo", 1e-3, seed, GRPO[seed], [0.3] * 4)
    assert _row(write_report(str(tmp_path), log=None), "| steppo | 0.001 | 5 |")
    text = write_report(str(tmp_path), log=None, select_seeds=2)
    row = _row(text, "| steppo | 0.0003 | 3 |")  # chosen on seeds 0, 1; reported on 2, 3, 4
    assert row[4] == "0.100 [0.100, 0.100]"  # the AUC of the reported seeds only
    assert "| steppo | 0.0003 | 0.001 | 2/2 |" in text  # the grid table: selection seeds
    assert _row(text, "| grpo | 3 |")  # paired on the 3 reported seeds
    assert "Selected on seeds 0, 1 only" in text
    with pytest.raises(ValueError, match="--select-seeds: 4 of the 5 seeds found leave 1"):
        write_report(str(tmp_path), log=None, select_seeds=4)
