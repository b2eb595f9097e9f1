"""The environment protocol and the registry of built-in environments.

An environment speaks text: ``reset(seed)`` returns the first observation, ``step(action)``
takes the action's text and returns ``(observation, reward, terminated, truncated, info)``
(gymnasium's order). The trainer does token-in-token-out around it with the word tokenizer.

Rules every built-in environment follows (and tests check):

- deterministic by seed: the same seed and actions give the same observations and rewards;
- any action text is accepted: a malformed or senseless action is answered with an observation
  saying so (``info["valid"] = False``), never an exception;
- the episode ends by ``terminated`` (task over; the value bootstrap is 0) or ``truncated``
  (``max_steps`` reached; the trainer bootstraps from the critic);
- ``info["success"]`` tells whether the task was solved; ``info["state"]`` is a hashable key of
  the environment state the *next* action is taken in (the GiGPO anchor state);
- ``grammar`` (a :class:`~steppo_fast.envs.grammar.Grammar` or ``None``) lists well-formed
  actions for constrained decoding.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .grammar import Grammar


@runtime_checkable
class Env(Protocol):
    """A multi-turn text environment (see the module docstring for the rules)."""

    name: str
    max_steps: int
    grammar: Grammar | None

    def reset(self, seed: int) -> str:
        """Start a new episode whose task is drawn from ``seed``; return the first observation."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply ``action``; return ``(observation, reward, terminated, truncated, info)``."""
        ...

    def state_key(self) -> str:
        """A key of the current state (equal keys = identical states, for GiGPO anchors)."""
        ...


_REGISTRY: dict[str, Callable[[], Env]] = {}


def register(name: str, factory: Callable[[], Env]) -> None:
    """Make ``make_env(name)`` build an environment with ``factory()``."""
    _REGISTRY[name] = factory


def env_names() -> list[str]:
    return sorted(_REGISTRY)


def make_env(name: str) -> Env:
    """A new environment instance of the registered ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"env: {name!r} is not one of {', '.join(map(repr, env_names()))}")
    return _REGISTRY[name]()


def run_random_episode(env: Env, seed: int, rng: random.Random) -> dict[str, Any]:
    """Play one episode with the uniform random policy under the env's grammar.

    Returns ``{"success", "return", "steps"}``. The random policy draws each action word by
    word, uniformly over the words the grammar allows next."""
    if env.grammar is None:
        raise ValueError("env: a random grammar policy needs an env with a grammar")
    env.reset(seed)
    total, steps, info = 0.0, 0, {"success": False}
    while True:
        _, reward, terminated, truncated, info = env.step(env.grammar.sample(rng))
        total += reward
        steps += 1
        if terminated or truncated:
            return {"success": bool(info["success"]), "return": total, "steps": steps}


def random_policy_success_rate(name: str, seeds: range, policy_seed: int = 0) -> float:
    """Fraction of ``seeds`` the random grammar policy solves on ``make_env(name)``."""
    env, rng = make_env(name), random.Random(policy_seed)
    wins = sum(run_random_episode(env, s, rng)["success"] for s in seeds)
    return wins / max(1, len(seeds))
