"""Environments that misbehave: an episode never ended by the env is cut at its ``max_steps``
(a rollout never hangs); ``None`` / non-finite rewards, ``None`` observations, failing or
unhashable state keys, bad end flags or info, a bad ``max_steps`` raise an ``EnvError`` naming
the environment, the seed and the step."""

import math
import random

import pytest
import torch
from _fault_envs import Faulty
from _trainer_setup import tiny_policy

from steppo_fast.envs import EnvError, default_tokenizer, run_random_episode
from steppo_fast.envs.grammar import Grammar
from steppo_fast.trainer.rollout import rollout

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return tiny_policy(tok)


def play(policy, tok, make, n=3):
    return rollout(
        policy,
        tok,
        make,
        list(range(7, 7 + n)),
        list(range(n)),
        use_grammar=False,
        max_action_tokens=2,
        generator=torch.Generator().manual_seed(0),
    )


def test_an_episode_the_env_never_ends_is_cut_at_max_steps(policy, tok):
    with pytest.warns(UserWarning, match=r"'faulty' did not end every episode.*max_steps \(4\)"):
        res = play(policy, tok, lambda: Faulty(max_steps=4))
    for traj in res.trajectories:
        assert len(traj["steps"]) == 4 and traj["terminated"] is False  # truncated: bootstrap
    # an env that ends its episodes itself is not cut (and gives no warning)
    res = play(policy, tok, lambda: Faulty(max_steps=4, end_after=2))
    assert [len(t["steps"]) for t in res.trajectories] == [2, 2, 2]
    assert all(t["terminated"] for t in res.trajectories)


def test_random_policy_episode_is_cut_at_max_steps():
    env = Faulty(max_steps=5)
    env.grammar = Grammar([[("look",)]])
    out = run_random_episode(env, 0, random.Random(0))
    assert out["steps"] == 5 and out["success"] is False


BAD = [
    (dict(reward=None), "step 0.*reward None"),
    (dict(reward=math.nan), "step 0.*reward nan"),
    (dict(reward="1"), "step 0.*reward '1'"),
    (dict(reward=1e39), "step 0.*reward 1e\\+39, not a finite number \\(within float32"),
    (dict(grammar="open door"), "grammar must be a Grammar or None, got 'open door'"),
    (dict(obs=None), "step 0.*observation None"),
    (dict(terminated=None), "step 0.*terminated=None"),
    (dict(info=None), "step 0.*info=None"),
    (dict(key=KeyError("no state")), r"crashed in state_key\(\) \(seed 7, step 0\): 'no state'"),
    (dict(key=None), r"state_key\(\) \(seed 7, step 0\) returned None"),
    (dict(key=["a"]), r"state_key\(\) \(seed 7, step 0\) returned an unhashable list"),
    (dict(first=None), r"reset\(seed=7\) returned None"),
    (dict(first=RuntimeError("down")), r"crashed in reset\(seed=7\): down"),
    (dict(max_steps=0), "max_steps must be an integer >= 1, got 0"),
    (dict(max_steps=None), "max_steps must be an integer >= 1, got None"),
]


@pytest.mark.parametrize(("returns", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_misbehaving_env_is_named_with_seed_and_step(policy, tok, returns, message):
    with pytest.raises(EnvError, match=f"env 'faulty'.*{message}"):
        play(policy, tok, lambda: Faulty(**returns))


def test_a_later_step_is_named(policy, tok):
    class LateNone(Faulty):
        def step(self, action):
            obs, reward, *rest = super().step(action)
            return (obs, None if self.t == 3 else reward, *rest)

    with pytest.raises(EnvError, match=r"env 'late'.*\(seed 7, step 2\).*reward None"):
        play(policy, tok, lambda: LateNone(name="late"))
