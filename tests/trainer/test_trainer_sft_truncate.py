"""``steppo sft --truncate-frac``: that fraction of the demonstrations keeps only a prefix of
1..n-1 of the solver's n steps (disjoint from the noisy ones), with matching grammar masks."""

from __future__ import annotations

import json

import pytest

from steppo_fast.trainer.cli import main
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.policy import build_tokenizer
from steppo_fast.trainer.sft import SFTConfig, demonstrations


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(env="doors", out=str(tmp_path / "sft"), hidden_size=32, num_heads=2)
    return TrainConfig(**{**base, "progress": False, **kw})


def test_cut_demonstrations_are_prefixes_of_the_solver_episodes(tmp_path):
    cfg = _cfg(tmp_path)
    tok = build_tokenizer(cfg)
    clean, _ = demonstrations(cfg, SFTConfig(demos=40), tok)
    cut, masks = demonstrations(cfg, SFTConfig(demos=40, truncate_frac=0.5), tok)
    short = [k for k, t in enumerate(cut) if len(t["steps"]) < len(clean[k]["steps"])]
    assert len(short) == 20  # round(0.5 * 40), each one really shorter
    kept = set()
    for k, (c, t) in enumerate(zip(clean, cut)):
        assert t["steps"] == c["steps"][: len(t["steps"])], k  # a prefix, nothing altered
        if k in short:
            assert 1 <= len(t["steps"]) <= len(c["steps"]) - 1 and not t["terminated"]
            kept.add(len(t["steps"]))
        else:
            assert t == c
        assert masks[k].shape[0] == sum(len(s["action_ids"]) for s in t["steps"])
    assert kept == {1, 2}  # doors: 3-step solver episodes cut after 1 or 2 steps


def test_noisy_and_cut_are_disjoint_and_capped(tmp_path):
    cfg = _cfg(tmp_path)
    tok = build_tokenizer(cfg)
    clean, _ = demonstrations(cfg, SFTConfig(demos=8), tok)
    noisy, _ = demonstrations(cfg, SFTConfig(demos=8, noise_frac=0.5), tok)
    both, _ = demonstrations(cfg, SFTConfig(demos=8, noise_frac=0.5, truncate_frac=0.5), tok)
    changed = [k for k in range(8) if noisy[k] != clean[k]]
    for k in range(8):
        if k in changed:
            assert both[k] == noisy[k]  # a noisy demonstration is never also cut
        else:
            assert len(both[k]["steps"]) < len(clean[k]["steps"])  # every other one is cut
    with pytest.raises(ValueError, match=r"--truncate-frac: 0.6 x 8 demonstrations = 5 cut"):
        demonstrations(cfg, SFTConfig(demos=8, noise_frac=0.5, truncate_frac=0.6), tok)


def test_cli_flag_reaches_sft_json(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sft", "--env", "doors", "--out", str(out), "--demos", "4", "--steps", "1"]
    args += ["--truncate-frac", "0.5", "--hidden-size", "32", "--num-heads", "2"]
    assert main(args) == 0
    assert json.loads((out / "sft.json").read_text())["sft"]["truncate_frac"] == 0.5
    capsys.readouterr()
    assert main([*args[:-6], "--truncate-frac", "1.5"]) == 2
    assert "--truncate-frac" in capsys.readouterr().err
