"""``haystack``: long observations, a key read once and recalled later, grammar-constrained
actions, trajectories of >= 8k tokens, a scripted solver, and ``steppo train --env haystack``
end to end on the CPU with the tiny model."""

import random

import pytest

from steppo_fast.envs import HaystackEnv, default_tokenizer, env_names, make_env, scripted_action
from steppo_fast.envs.base import random_policy_success_rate


def play(env, seed, policy):
    obs = [env.reset(seed)]
    total, steps = 0.0, 0
    while True:
        text, reward, term, trunc, info = env.step(policy(obs))
        obs.append(text)
        total, steps = total + reward, steps + 1
        if term or trunc:
            return obs, total, steps, info


def test_registered_and_every_word_in_the_vocabulary():
    assert "haystack" in env_names()
    tok, env, rng = default_tokenizer(), make_env("haystack"), random.Random(0)
    assert all(w in tok.ids for w in env.grammar.words)
    for seed in range(20):
        obs, *_ = play(env, seed, lambda o: env.grammar.sample(rng) if rng.random() < 0.9 else "x")
        for text in obs:
            assert not tok.unknown_words(text), text


def test_pages_are_long_deterministic_and_hide_the_key_once():
    env = HaystackEnv()
    env.reset(7)
    pages = [env.page(n) for n in range(1, 9)]
    assert all(len(p.split()) == 600 + 2 for p in pages)  # "n :" + page_tokens words
    assert sum("key is" in p for p in pages) == 1
    holder = next(p for p in pages if "key is" in p)
    words = holder.split()
    i = words.index("key")
    assert all(w in "123456789" for w in words[i + 2 : i + 5])
    # digits appear nowhere else on any page (beyond the page number)
    assert sum(w.isdigit() for p in pages for w in p.split()[2:]) == 3
    env2 = HaystackEnv()
    env2.reset(7)
    assert [env2.page(n) for n in range(1, 9)] == pages
    env2.reset(8)
    assert [env2.page(n) for n in range(1, 9)] != pages


def test_scripted_reader_always_wins_and_random_policy_almost_never():
    env = HaystackEnv()
    lengths = []
    for seed in range(200):
        obs, total, steps, info = play(env, seed, scripted_action)
        assert info["success"] and total == 1.0, seed
        assert steps <= 9
        lengths.append(steps)
    assert 4 <= sum(lengths) / len(lengths) <= 6  # n_pages / 2 looks + the open, on average
    assert random_policy_success_rate("haystack", range(500)) < 0.03  # expected ~1%


def test_recall_is_needed_and_wrong_keys_do_not_end_the_episode():
    env = HaystackEnv(n_pages=3, page_tokens=20, max_steps=5)
    env.reset(3)
    key_page = next(n for n in range(1, 4) if "key is" in env.page(n))
    key = env.page(key_page).split()
    key = key[key.index("key") + 2 : key.index("key") + 5]
    env.reset(3)
    obs, reward, term, trunc, info = env.step(f"look {key_page}")
    assert " ".join(["key", "is", *key]) in obs and not (term or trunc)
    wrong = ["9" if k != "9" else "1" for k in key]
    obs, reward, term, trunc, info = env.step("open " + " ".join(wrong))
    assert (obs, reward, term, trunc) == ("wrong key .", 0.0, False, False)
    obs, reward, term, trunc, info = env.step("jump")
    assert not info["valid"] and "invalid action" in obs and reward == 0.0
    obs, reward, term, trunc, info = env.step("open " + " ".join(key))
    assert (reward, term, info["success"]) == (1.0, True, True)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look 1")


def test_trajectories_reach_8k_tokens():
    """Every step a look: max_steps * (page_tokens + 2) observation tokens, plus framing."""
    tok, env = default_tokenizer(), HaystackEnv()
    obs, _, steps, info = play(env, 0, lambda o: "look 1")
    assert steps == env.max_steps and not info["success"]
    tokens = sum(len(tok.encode(t)) + 2 for t in obs) + 2 * steps  # <obs> .. <act>, actions
    assert tokens >= 8192


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_pages": 10}, "n_pages"), ({"page_tokens": 3}, "page_tokens"), ({"max_steps": 1}, "max")],
)
def test_bad_config_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HaystackEnv(**kwargs)


@pytest.mark.trainer
def test_steppo_train_runs_end_to_end_on_haystack(tmp_path):
    """The CLI path with every long-context lever on, on a shorter haystack (100-word pages,
    6 steps) to keep the test affordable: the default one (8.4k-token episodes) ran end to end
    by hand (docs/trainer.md)."""
    pytest.importorskip("transformers")
    from steppo_fast.envs import register
    from steppo_fast.trainer.cli import main

    register("haystack-short", lambda: HaystackEnv(n_pages=4, page_tokens=100, max_steps=6))

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--env",
            "haystack-short",
            "--iters",
            "1",
            "--groups",
            "2",
            "--group-size",
            "2",
            "--eval-every",
            "0",
            "--no-progress",
            "--no-plot",
            "--forward",
            "packed",
            "--grad-checkpointing",
            "--dtype",
            "bf16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 1 and rows[-1]["tokens"] > 4 * 100
    assert rows[-1]["policy_loss"] == rows[-1]["policy_loss"]  # not NaN


def test_haystack_small_is_the_same_task_at_a_small_size():
    """``haystack-small`` (the comparison's size): 4 pages of 24 words, 8 steps; the scripted
    reader wins every task within the budget, and steppo sft has its solver."""
    from steppo_fast.trainer.sft import SOLVERS

    assert "haystack-small" in env_names() and "haystack-small" in SOLVERS
    env = make_env("haystack-small")
    assert (env.n_pages, env.page_tokens, env.max_steps) == (4, 24, 8)
    env.reset(3)
    assert all(len(env.page(n).split()) == 24 + 2 for n in range(1, 5))
    for seed in range(50):
        _, total, steps, _ = play(env, seed, lambda o: SOLVERS["haystack-small"](env, o))
        assert total == 1.0 and steps <= 4 + 1
