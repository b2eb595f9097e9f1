"""``steppo sft`` (behaviour cloning of the scripted solvers) and ``steppo train --init``."""

from __future__ import annotations

import random

import pytest
import torch

from steppo_fast.envs import make_env
from steppo_fast.trainer.cli import main
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.loop import EVAL_SEED_BASE, Trainer
from steppo_fast.trainer.policy import build_tokenizer
from steppo_fast.trainer.sft import SOLVERS, SFTConfig, demo_nll, demonstrations, run_sft


def _cfg(tmp_path, env="quest", **kw) -> TrainConfig:
    base = dict(env=env, out=str(tmp_path / "sft"), hidden_size=32, num_heads=2, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_solves_clean_and_after_a_random_prefix(name):
    """Every env's solver wins from the start and from wherever 2 random actions led."""
    for seed in range(40):
        for prefix in (0, 2):
            env = make_env(name)
            history = [env.reset(EVAL_SEED_BASE + seed)]
            rng = random.Random(seed)
            for t in range(env.max_steps):
                act = env.grammar.sample(rng) if t < prefix else SOLVERS[name](env, history)
                obs, _, term, trunc, info = env.step(act)
                history.append(obs)
                if term or trunc:
                    break
            assert info["success"], (name, seed, prefix)


def test_noise_frac_replaces_that_many_demonstrations(tmp_path):
    cfg = _cfg(tmp_path, env="doors")
    tok = build_tokenizer(cfg)
    for p, noisy in ((0.0, 0), (0.5, 4), (1.0, 8)):
        trajs, masks = demonstrations(cfg, SFTConfig(demos=8, noise_frac=p), tok)
        # a clean doors demonstration is exactly n_doors winning steps
        clean = sum(len(t["steps"]) == 3 and t["terminated"] for t in trajs)
        assert clean >= 8 - noisy and (noisy == 0 or clean < 8), (p, clean)
        assert all(
            m.shape[0] == sum(len(s["action_ids"]) for s in t["steps"])
            for t, m in zip(trajs, masks)
        )


def test_sft_lowers_demo_nll_and_init_reproduces_its_logprobs(tmp_path):
    cfg = _cfg(tmp_path)
    summary, policy = run_sft(cfg, SFTConfig(demos=8, steps=20, batch=4), log=None)
    before, after = summary["demo_nll_before"], summary["demo_nll_after"]
    # a real decrease: far beyond the fp32 rounding of a mean over A tokens (<= A * eps * NLL)
    noise = summary["demo_actions"] * torch.finfo(torch.float32).eps * before
    assert before - after > 100 * noise, summary
    init = str(tmp_path / "sft" / "model")
    run = _cfg(tmp_path, out=str(tmp_path / "rl"), init=init, algo="steppo", critic="separate")
    trainer = Trainer(run)
    tok = build_tokenizer(cfg.resolved())
    trajs, masks = demonstrations(cfg.resolved(), SFTConfig(demos=4), tok)
    with torch.no_grad():
        want = demo_nll(policy, trajs, masks, cfg.resolved())
        got = demo_nll(trainer.models.policy, trajs, masks, run.resolved())
    # identical fp32 weights (safetensors round trip is exact), identical ops: bitwise equal
    assert torch.equal(got, want)
    # the separate critic's backbone starts as the SFT policy's backbone, value head zero
    body = dict(trainer.models.policy.model.named_parameters())
    for name, p in trainer.models.critic.backbone.named_parameters():
        assert torch.equal(p, body[name]), name
    assert not trainer.models.critic.head.weight.any() and not trainer.models.critic.head.bias.any()
    # without --init the run's policy is the random init: different log-probs
    plain = Trainer(_cfg(tmp_path, out=str(tmp_path / "rl2"), algo="steppo"))
    with torch.no_grad():
        assert not torch.equal(demo_nll(plain.models.policy, trajs, masks, run.resolved()), want)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["sft", "--demos", "0"], "--demos"),
        (["sft", "--steps", "-1"], "--steps"),
        (["sft", "--noise-frac", "1.5"], "--noise-frac"),
        (["sft", "--sft-lr", "0"], "--sft-lr"),
        (["sft", "--batch", "x"], "--batch"),
    ],
)
def test_bad_sft_knobs_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) if argv[-1] == "x" else _nothing():
        status = main(argv)
        assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("steppo: error:") and flag in err, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_missing_or_mismatched_init_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init" in err and "not a directory" in err, err
    run_sft(_cfg(tmp_path), SFTConfig(demos=2, steps=0), log=None)  # a 32-wide model
    init = str(tmp_path / "sft" / "model")
    argv = ["train", "--init", init, "--out", str(tmp_path / "b"), "--env", "quest"]
    assert main(argv + ["--hidden-size", "64", "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init" in err and "does not match" in err, err
    assert main(argv + ["--arch", "llama", "--hidden-size", "32", "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init" in err, err


def _oracle_nll(policy, trajs, masks) -> torch.Tensor:
    """Token-mean NLL of the action tokens, one plain HF forward per step: full logits, the
    grammar mask applied by hand, ``log_softmax`` (no steppo_fast op, no StepBatch)."""
    terms, rows = [], iter(torch.cat(masks))
    for t in trajs:
        for s in t["steps"]:
            ids = torch.tensor([s["prompt_ids"] + s["action_ids"]])
            logits = policy(input_ids=ids).logits[0].float()
            for j, a in enumerate(s["action_ids"]):
                row = logits[len(s["prompt_ids"]) - 1 + j].masked_fill(~next(rows), -torch.inf)
                terms.append(-torch.log_softmax(row, -1)[a])
    return torch.stack(terms).mean()


def test_sft_objective_is_the_action_token_nll(tmp_path):
    """The objective sft minimises and reports equals an independent per-step computation."""
    from _tolerance import pair_tol

    cfg = _cfg(tmp_path).resolved()
    summary, policy = run_sft(cfg, SFTConfig(demos=4, steps=3, batch=2), log=None)
    trajs, masks = demonstrations(cfg, SFTConfig(demos=4), build_tokenizer(cfg))
    with torch.no_grad():
        want = _oracle_nll(policy, trajs, masks)
    # two fp32 evaluations of the same forward, reductions of <= 4 H L + V terms
    atol, rtol = pair_tol(torch.float32, 4 * cfg.hidden_size * cfg.num_layers + 64, float(want))
    torch.testing.assert_close(torch.tensor(summary["demo_nll_after"]), want, atol=atol, rtol=rtol)
