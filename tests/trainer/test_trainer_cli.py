"""The ``steppo`` command: errors are one line (never a traceback), config precedence
(defaults < algorithm defaults < YAML < flags), train -> eval -> resume, compare's table."""

import subprocess
import sys

import pytest
import torch
import yaml

from steppo_fast.envs import default_tokenizer, register
from steppo_fast.trainer.cli import build_parser, main
from steppo_fast.trainer.config import ALGO_DEFAULTS, TrainConfig, config_from_args
from steppo_fast.trainer.policy import build_policy

pytest.importorskip("transformers")

SMALL = [
    "--groups",
    "2",
    "--group-size",
    "2",
    "--hidden-size",
    "32",
    "--num-heads",
    "2",
    "--eval-episodes",
    "4",
    "--no-progress",
    "--no-plot",
]


class CrashingEnv:
    name, max_steps, grammar = "crashy", 4, None

    def reset(self, seed):
        return "door 1 is red ."

    def state_key(self):
        return ""

    def step(self, action):
        raise KeyError("boom")


register("crashy", CrashingEnv)


def one_line_error(capsys, argv, status=1):
    """Run ``steppo ARGV``; check it failed with ``status`` (2: a usage or config error, from
    argparse or from the field checks; 1: a failure while running) and one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == status
    err = capsys.readouterr().err
    assert err.startswith("steppo: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_errors_are_one_line(capsys, tmp_path):
    assert "--iters" in one_line_error(capsys, ["train", "--iters", "many"], status=2)
    assert "unrecognized" in one_line_error(capsys, ["train", "--bogus"], status=2)
    assert "--model" in one_line_error(capsys, ["train", "--model", str(tmp_path / "missing")])
    assert "--algo" in one_line_error(capsys, ["train", "--algo", "dqn"], status=2)
    assert "--env" in one_line_error(capsys, ["train", "--env", "chess"], status=2)
    assert "RUN_DIR" in one_line_error(capsys, ["eval", str(tmp_path / "nothing")])
    assert "--algos" in one_line_error(capsys, ["compare", "--algos", "steppo,dqn"], status=2)
    err = one_line_error(capsys, ["train", "--resume", "--out", str(tmp_path / "x")], status=2)
    assert "--resume" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: 0.1\nwarp: 9\n")
    err = one_line_error(capsys, ["train", "--config", str(bad_yaml)], status=2)
    assert f"{bad_yaml}:2: warp" in err
    err = one_line_error(capsys, ["train", "--env", "crashy", "--out", str(tmp_path / "c"), *SMALL])
    assert "crashy" in err and "crashed" in err and "boom" in err


def test_config_precedence(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "iters": 7, "clip_low": 0.3}))
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--iters", "9", "--algo", "ppo"]
    )
    cfg = config_from_args(args).resolved()
    assert (cfg.lr, cfg.iters, cfg.clip_low) == (0.5, 9, 0.3)  # YAML, then flag over YAML
    assert cfg.clip_high == ALGO_DEFAULTS["ppo"]["clip_high"]  # algorithm default fills None
    assert cfg.ratio_level == "token" and cfg.out.endswith("doors-ppo-s0")
    assert TrainConfig().resolved().ratio_level == "step"
    args = build_parser().parse_args(["train", "--no-grammar", "--dual-clip", "none"])
    cfg = config_from_args(args)
    assert cfg.grammar is False and cfg.dual_clip is None


def test_train_eval_resume_compare(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--env",
                "doors",
                "--iters",
                "1",
                "--out",
                str(out),
                "--eval-every",
                "1",
                *SMALL,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "it 1/1" in text and "held-out succ" in text
    done = text.strip().splitlines()[-1]  # names what was written and the last evaluation
    assert done.startswith("done: ") and "curves.png" not in done  # --no-plot
    assert "held-out success" in done and "at iteration 1" in done
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iters"] == 1 and saved["ratio_level"] == "step"
    assert main(["eval", str(out), "--episodes", "3"]) == 0
    assert "3 held-out episodes" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(out), "--iters", "2"]) == 0
    assert "it 2/2" in capsys.readouterr().out
    # the exported HF model directory is a valid --model PATH (weights reloaded exactly)
    again = tmp_path / "again"
    args = ["train", "--model", str(out / "model"), "--iters", "1", "--out", str(again), *SMALL]
    assert main([*args, "--eval-every", "0"]) == 0
    assert "(not evaluated: --eval-every 0)" in capsys.readouterr().out
    first = build_policy(TrainConfig(model=str(out / "model")), default_tokenizer())
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["policy"]
    for name, value in first.state_dict().items():
        assert torch.equal(value, trained[name]), name
    cmp_dir = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--algos",
                "grpo,gspo",
                "--seeds",
                "2",
                "--lr-grid",
                "1e-3",
                "--env",
                "doors",
                "--iters",
                "1",
                "--out",
                str(cmp_dir),
                *SMALL,
            ]
        )
        == 0
    )
    table = (cmp_dir / "results.md").read_text()
    assert "| grpo | 0.001 | 2 |" in table and "| gspo | 0.001 | 2 |" in table
    assert (cmp_dir / "curves.png").stat().st_size > 1000
    for run in ("grpo-lr0.001-s0", "grpo-lr0.001-s1", "gspo-lr0.001-s0", "gspo-lr0.001-s1"):
        assert (cmp_dir / run / "checkpoint.pt").exists()


def test_python_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "steppo_fast.trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "train" in out.stdout and "compare" in out.stdout
