"""Every config field is type- and range-checked at start, from its one row of the field table,
for YAML keys, CLI flags and ``TrainConfig(...)`` alike: one line naming the key and the file
(``FILE:LINE: key``) or the flag, exit status 2, no traceback, no run directory created."""

import dataclasses
import math

import pytest
import yaml

from steppo_fast.trainer.cli import main
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.fields import ConfigError, field_type, help_of, rule_of


def fails(capsys, argv) -> str:
    """``steppo ARGV`` exits with status 2 and one line on stderr; returns that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors (e.g. "--iters 2.5")
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("steppo: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


def test_every_field_has_a_row_in_the_table():
    """Type from the annotation, a help text and a rule (possibly empty) for every field: a new
    field without ``knob(...)`` fails here."""
    for f in dataclasses.fields(TrainConfig):
        kind, _ = field_type(TrainConfig, f.name)
        assert kind in (int, float, str, bool, dict), f.name
        assert help_of(f), f"{f.name}: no help text (declare it with knob(...))"
        rule = rule_of(f)
        if kind in (int, float) and f.name not in ("extra",):
            assert rule.describe(), f"{f.name}: a number field without a range"


YAML_CASES = [
    ("iters: 2.5\n", ":1: iters: expected an integer, got 2.5"),
    ("seed: 0\niters: true\n", ":2: iters: expected an integer, got true"),
    ("iters: '3'\n", ":1: iters: expected an integer, got the string '3'"),
    ("lr: '1e-3'\n", ":1: lr: expected a number, got the string '1e-3'"),
    ("lr: .nan\n", ":1: lr: must be finite, got nan"),
    ("temperature: .inf\n", ":1: temperature: must be finite, got inf"),
    ("lr: -1\n", ":1: lr: must be >= 0, got -1"),
    ("grammar: 'true'\n", ":1: grammar: expected true or false, got the string 'true'"),
    ("plot: 1\n", ":1: plot: expected true or false, got 1"),
    ("eval_every: -1\n", ":1: eval_every: must be >= 0, got -1"),
    ("checkpoint_every: 0\n", ":1: checkpoint_every: must be >= 1, got 0"),
    ("seed: 1180591620717411303424\n", ":1: seed: must be in [0, 65536), got 1180"),
    ("gamma: 1.5\n", ":1: gamma: must be in [0, 1], got 1.5"),
    ("dual_clip: 0.5\n", ":1: dual_clip: must be > 1, got 0.5"),
    ("algo: 3\n", ":1: algo: expected a string, got 3"),
    ("algo: dqn\n", ":1: algo: must be one of steppo, ppo, grpo, gigpo, gspo, got the string"),
    ("device: gpu\n", ":1: device: must be auto, cpu, cuda or cuda:N"),
    ("iters: null\n", ":1: iters: expected an integer, got null"),
    ("extra: 5\n", ":1: extra: expected a dict, got 5"),
    ("lr: 0.1\nwarp: 9\n", ":2: warp: unknown key"),
    ("lr: 0.1\niters: 3\nlr: 0.2\n", ":3: lr: given twice (first on line 1)"),
    ("lr: [0.1\niters: 3\n", ":2: not valid YAML"),
    ("- 1\n- 2\n", ":1: must hold a mapping of field: value"),
]


@pytest.mark.parametrize(("text", "message"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_yaml_values_are_checked_naming_file_line_and_key(capsys, tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--config", str(path), "--out", str(out)])
    assert f"{path}{message}" in err
    assert not out.exists()  # checked before anything is created


def test_yaml_that_is_not_utf8_is_named(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 0.1\nenv: \xff\n")
    assert f"{path}: not UTF-8 text (byte 13)" in fails(capsys, ["train", "--config", str(path)])


def test_yaml_accepts_what_users_mean(tmp_path):
    """``1e-3`` is a float (YAML 1.2; plain PyYAML reads it as a string); an integer in a float
    field becomes a float; ``null`` in an optional field is the algorithm default."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\ncritic_lr: 2E-4\nvf_coef: 1\nclip_low: null\ngrammar: false\n")
    cfg = TrainConfig.from_yaml(str(path))
    assert (cfg.lr, cfg.critic_lr, cfg.vf_coef) == (1e-3, 2e-4, 1.0)
    assert isinstance(cfg.vf_coef, float) and cfg.clip_low is None and cfg.grammar is False
    assert cfg.resolved().clip_low == 0.2
    # what the trainer saves reads back to the same config
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert TrainConfig.from_yaml(str(saved)) == cfg


FLAG_CASES = [
    (["--lr", "nan"], "--lr: must be finite, got nan"),
    (["--lr", "-1"], "--lr: must be >= 0, got -1.0"),
    (["--temperature", "inf"], "--temperature: must be finite, got inf"),
    (["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    (["--grad-clip", "nan"], "--grad-clip: must be finite, got nan"),
    (["--eval-every", "-1"], "--eval-every: must be >= 0, got -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every: must be >= 1, got 0"),
    (["--seed", "2**70"], "--seed: invalid int value: '2**70'"),
    (["--seed", str(2**70)], f"--seed: must be in [0, 65536), got {2**70}"),
    (["--seed", "-1"], "--seed: must be in [0, 65536), got -1"),
    (["--seed", "65536"], "--seed: must be in [0, 65536), got 65536"),
    (["--iters", "2.5"], "--iters: invalid int value: '2.5'"),
    (["--iters", "0"], "--iters: must be >= 1, got 0"),
    (["--clip-low", "1"], "--clip-low: must be in [0, 1), got 1.0"),
    (["--dual-clip", "1"], "--dual-clip: must be > 1, got 1.0"),
    (["--kl-coef", "-0.1"], "--kl-coef: must be >= 0, got -0.1"),
    (["--hidden-size", "30", "--num-heads", "4"], "--hidden-size: must be a multiple of"),
    (["--grammar", "false"], "unrecognized arguments: false"),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_flags_are_checked_naming_the_flag(capsys, tmp_path, flags, message):
    out = tmp_path / "out"
    err = fails(capsys, ["train", "--out", str(out), *flags])
    assert message in err
    assert not out.exists()


def test_flags_override_yaml_and_are_checked_too(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.5\n")
    assert "--lr: must be finite" in fails(capsys, ["train", "--config", str(path), "--lr", "nan"])
    err = fails(capsys, ["compare", "--config", str(path), "--iters", "0"])
    assert "--iters: must be >= 1, got 0" in err


def test_resume_checks_the_saved_config_yaml(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**TrainConfig().to_dict(), "iters": 2.5}))
    err = fails(capsys, ["train", "--resume", "--out", str(run)])
    assert f"{run / 'config.yaml'}:" in err and "iters: expected an integer, got 2.5" in err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", math.nan, "--lr: must be finite"),
        ("iters", True, "--iters: expected an integer, got true"),
        ("iters", 2.0, "--iters: expected an integer, got 2.0"),
        ("grammar", "yes", "--grammar: expected true or false, got the string 'yes'"),
        ("gamma", None, None),  # optional: the algorithm default
        ("env", "chess", "--env: must be one of"),
        ("lr", 10**400, "--lr: " + str(10**400)[:5]),
    ],
)
def test_constructor_values_are_checked_by_resolved(field, value, message):
    cfg = TrainConfig(**{field: value})
    if message is None:
        cfg.resolved()
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg.resolved()


def test_eval_episodes_zero_is_an_error(capsys, tmp_path):
    err = fails(capsys, ["eval", str(tmp_path), "--episodes", "0"])
    assert "--episodes: must be >= 1, got 0" in err
    assert "--show: must be >= 0, got -1" in fails(capsys, ["eval", str(tmp_path), "--show", "-1"])
    assert "--seeds: must be >= 1, got 0" in fails(capsys, ["compare", "--seeds", "0"])


def test_help_comes_from_the_table(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "evaluate on held-out seeds every N iterations (0 = never); >= 0; default: 5" in text
    assert "PPO clip below 1; in [0, 1); default: algo default" in text
