"""Built-in environments, grammar and word tokenizer: rules, determinism, random-policy bounds,
invalid actions, and that every task is solvable by reading the observations."""

import random
import re

import pytest
import torch
from _tolerance import pair_tol

from steppo_fast.envs import (
    DoorsEnv,
    Grammar,
    QuestEnv,
    WordTokenizer,
    default_tokenizer,
    env_names,
    make_env,
    random_policy_success_rate,
)
from steppo_fast.envs.doors import COLOURS
from steppo_fast.envs.doors import scripted_action as doors_scripted_action
from steppo_fast.envs.quest import KEY_COLOURS, ROOMS
from steppo_fast.envs.quest import scripted_action as quest_scripted_action
from steppo_fast.envs.tokenizer import SPECIALS
from steppo_fast.trainer.loop import EVAL_SEED_BASE, train_seed

# ----------------------------------------------------------------------------- grammar


def test_grammar_trie_and_completion():
    g = Grammar([[("go",), ("hall", "attic")], [("look",)], [("take", "drop"), ("a", "b"), ("x",)]])
    assert g.allowed_next([]) == ("go", "look", "take", "drop")
    assert g.allowed_next(["go"]) == ("hall", "attic")
    assert g.allowed_next(["go", "attic"]) == ()
    assert g.allowed_next(["look"]) == ()
    assert g.allowed_next(["drop", "b"]) == ("x",)
    assert g.is_complete(["take", "a", "x"]) and not g.is_complete(["take", "a"])
    assert len(g.actions()) == 2 + 1 + 4
    assert g.max_len == 3
    with pytest.raises(ValueError, match="starts no action"):
        g.allowed_next(["jump"])


def test_grammar_must_be_prefix_free():
    with pytest.raises(ValueError, match="prefix-free"):
        Grammar([[("take",)], [("take",), ("key",)]])
    with pytest.raises(ValueError, match="empty or has spaces"):
        Grammar([[("go home",)]])


def test_grammar_random_sample_is_uniform_per_position():
    g = Grammar([[("a",), ("1", "2", "3")], [("b",)]])
    rng = random.Random(0)
    counts = {}
    n = 6000
    for _ in range(n):
        a = g.sample(rng)
        counts[a] = counts.get(a, 0) + 1
    assert set(counts) == {"a 1", "a 2", "a 3", "b"}
    assert abs(counts["b"] / n - 0.5) < 0.03  # first word uniform over {a, b}
    assert abs(counts["a 2"] / n - 1 / 6) < 0.03


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_specials():
    tok = default_tokenizer()
    assert tok.words[: len(SPECIALS)] == SPECIALS
    text = "open 3 doors . door 1 is red ."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("door zzz") == [tok.ids["door"], tok.unk_id]
    assert len(set(tok.words)) == len(tok)
    with pytest.raises(ValueError, match="appears twice"):
        WordTokenizer(SPECIALS + ("a", "a"))
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(("a",) + SPECIALS)


@pytest.mark.parametrize("name", ["doors", "quest"])
def test_vocabulary_covers_every_env_word(name):
    tok, env, rng = default_tokenizer(), make_env(name), random.Random(1)
    for w in env.grammar.words:
        assert w in tok.ids
    for seed in range(300):
        texts = [env.reset(seed)]
        while True:
            action = env.grammar.sample(rng) if rng.random() < 0.9 else "zz open"
            obs, _, term, trunc, _ = env.step(action)
            texts.append(obs)
            if term or trunc:
                break
        for t in texts:
            assert not tok.unknown_words(t), t


# ----------------------------------------------------------------------------- rules


def test_registry():
    assert {"doors", "quest"} <= set(env_names())
    with pytest.raises(ValueError, match="not one of"):
        make_env("nope")


def test_horizons_and_distinct_tasks():
    assert DoorsEnv().max_steps >= 8
    assert QuestEnv().max_steps >= 20
    q = QuestEnv()

    def tasks(seeds):
        out = set()
        for s in seeds:
            q.reset(s)
            out.add(q.task_key())
        return out

    # the trainer's seeds: 100 iterations x 16 tasks of run seed 0, and the 64 held-out seeds
    train = tasks(train_seed(0, i, g, 16) for i in range(100) for g in range(16))
    held_out = tasks(EVAL_SEED_BASE + k for k in range(64))
    assert len(train) > 1500 and len(held_out) == 64
    assert len(held_out & train) <= 3  # held-out seeds are new tasks


@pytest.mark.parametrize("name", ["doors", "quest"])
def test_deterministic_by_seed(name):
    def play(seed):
        env, rng = make_env(name), random.Random(7)
        out = [env.reset(seed)]
        while True:
            step = env.step(env.grammar.sample(rng))
            out.append(step[:4])
            if step[2] or step[3]:
                return out

    assert play(5) == play(5)
    assert any(play(5)[0] != play(s)[0] for s in range(6, 12))


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("doors", ""),
        ("doors", "open"),
        ("doors", "open purple"),
        ("doors", "knock knock"),
        ("doors", "<unk> 7"),
        ("quest", "go"),
        ("quest", "take key"),
        ("quest", "fly attic"),
        ("quest", "open chest now"),
        ("quest", "  "),
    ],
)
def test_invalid_actions_answered_never_crash(name, bad):
    env = make_env(name)
    first = env.reset(3)
    obs, reward, term, trunc, info = env.step(bad)
    assert "invalid action" in obs
    assert info["valid"] is False and not term and not info["success"]
    assert reward <= 0.0
    assert obs != first


@pytest.mark.parametrize("name", ["doors", "quest"])
def test_truncation_at_horizon(name):
    env = make_env(name)
    env.reset(0)
    for t in range(env.max_steps):
        _, _, term, trunc, info = env.step("invalid words")
        assert not term
        assert trunc == (t == env.max_steps - 1)
    assert "time up" in _last_obs(env, "invalid words", fresh_seed=0)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look")


def _last_obs(env, action, fresh_seed):
    env.reset(fresh_seed)
    obs = ""
    for _ in range(env.max_steps):
        obs = env.step(action)[0]
    return obs


# ----------------------------------------------------------------------------- solvable


SOLVERS = {"doors": doors_scripted_action, "quest": quest_scripted_action}


class QuestTask:
    """The task a quest episode's first observation states (colour and rooms)."""

    def __init__(self, first: str):
        m = re.search(r"task : (\w+) key in (\w+) , chest in (\w+) , gem to (\w+) \.", first)
        self.colour, self.key_room, self.chest_room, self.target = m.groups()


@pytest.mark.parametrize("name", ["doors", "quest"])
def test_every_task_is_solvable_from_observations(name):
    env = make_env(name)
    lengths = []
    for seed in range(300):
        obs = env.reset(seed)
        history = [obs]
        total, steps = 0.0, 0
        while True:
            action = SOLVERS[name](history)
            obs, reward, term, trunc, info = env.step(action)
            history.append(obs)
            total += reward
            steps += 1
            assert info["valid"]
            if term or trunc:
                break
        assert term and info["success"], (seed, obs)
        lengths.append(steps)
        if name == "quest":  # step cost: shorter solutions return more
            # a Python-float sum of `steps` rewards vs one product: fp64, steps + 2 roundings
            rel = pair_tol(torch.float64, steps + 2)[1]
            assert total == pytest.approx(1.0 - env.step_cost * steps, rel=rel, abs=rel)
        else:
            assert total == 1.0 and steps == env.n_doors
    if name == "quest":
        assert min(lengths) >= 3 and max(lengths) <= 5 < env.max_steps


def test_quest_subgoal_order_and_distractors():
    env = QuestEnv()
    seed = next(s for s in range(100) if _quest_key_room_differs(env, s))
    first = env.reset(seed)
    solver = QuestTask(first)
    wrong = next(c for c in KEY_COLOURS if c != solver.colour)
    # the chest stays locked without the right key, even when holding another one
    env.step(f"go {solver.chest_room}")
    obs = env.step("open chest")[0]
    assert obs.startswith("chest locked")
    if solver.target != solver.chest_room:  # reaching the target without the gem wins nothing
        assert env.step(f"go {solver.target}")[2] is False
    # a room not in this house, and a wrong key: wasted steps, not errors
    absent = next(r for r in ROOMS if f" {r} " not in first and r not in env._rooms)
    assert env.step(f"go {absent}")[0] == f"no {absent} here ."
    assert env.step(f"take {wrong}")[2] is False


def _quest_key_room_differs(env, seed):
    env.reset(seed)
    return env._key_room != env._chest_room


# ----------------------------------------------------------------------------- random policy


@pytest.mark.parametrize(("name", "seeds"), [("doors", 2000), ("quest", 3000)])
def test_random_grammar_policy_success_between_0_and_10_percent(name, seeds):
    rate = random_policy_success_rate(name, range(seeds), policy_seed=0)
    assert 0.0 < rate < 0.10, rate
    # about 2.1% (doors) and 6.5% (quest) measured over 20000 seeds
    assert rate < (0.05 if name == "doors" else 0.09)


def test_doors_colours_come_from_the_seed():
    env = DoorsEnv()
    firsts = {env.reset(s).split()[-2] for s in range(200)}
    assert firsts == set(COLOURS)
