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

Where episodes are played, environments are called through :func:`checked_reset`,
:func:`checked_step` and :func:`checked_state_key`: an environment that raises, or returns
``None`` / a non-string observation, a reward that is not a finite number within float32's
range, a non-boolean end flag, a non-dict info, an unhashable / ``None`` state key, a
``max_steps`` that is not an integer >= 1 or a ``grammar`` that is not a ``Grammar`` / ``None``,
is an :class:`EnvError` naming the
environment, the episode's seed and the step. An episode the environment does not end within
its ``max_steps`` is cut there (truncated) by the caller, so a rollout never hangs.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Mapping
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


FLOAT32_MAX = 3.4028234663852886e38


class EnvError(RuntimeError):
    """An environment crashed or broke the :class:`Env` protocol (the message names the
    environment, the seed and the step)."""


def env_name(env) -> str:
    return str(getattr(env, "name", type(env).__name__))


def checked_max_steps(env) -> int:
    """``env.max_steps``, which must be an integer >= 1, checked with the ``grammar``
    attribute (a :class:`Grammar` or ``None``); :class:`EnvError` otherwise."""
    m = getattr(env, "max_steps", None)
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise EnvError(f"env {env_name(env)!r}: max_steps must be an integer >= 1, got {m!r}")
    grammar = getattr(env, "grammar", "missing")
    if grammar is not None and not isinstance(grammar, Grammar):
        raise EnvError(f"env {env_name(env)!r}: grammar must be a Grammar or None, got {grammar!r}")
    return int(m)


def checked_reset(env, seed: int) -> str:
    """``env.reset(seed)``, checked: the first observation is a string."""
    try:
        obs = env.reset(seed)
    except Exception as e:
        raise EnvError(f"env {env_name(env)!r} crashed in reset(seed={seed}): {e}") from e
    if not isinstance(obs, str):
        raise EnvError(
            f"env {env_name(env)!r}: reset(seed={seed}) returned {obs!r}, not an observation string"
        )
    return obs


def checked_state_key(env, *, seed: int, step: int):
    """``env.state_key()`` before step ``step`` of the episode of ``seed``, checked: hashable,
    not ``None``."""
    where = f"(seed {seed}, step {step})"
    try:
        key = env.state_key()
    except Exception as e:
        raise EnvError(f"env {env_name(env)!r} crashed in state_key() {where}: {e}") from e
    try:
        hash(key)
    except TypeError:
        raise EnvError(
            f"env {env_name(env)!r}: state_key() {where} returned an unhashable "
            f"{type(key).__name__}"
        ) from None
    if key is None:
        raise EnvError(f"env {env_name(env)!r}: state_key() {where} returned None")
    return key


def _is_flag(x) -> bool:
    try:
        return not isinstance(x, str) and x is not None and x in (True, False)
    except Exception:
        return False


def checked_step(env, action: str, *, seed: int, step: int):
    """``env.step(action)`` at step ``step`` of the episode of ``seed``, checked and returned as
    ``(observation: str, reward: float, terminated: bool, truncated: bool, info: dict)``."""
    name, where = env_name(env), f"(seed {seed}, step {step})"
    try:
        out = env.step(action)
    except Exception as e:
        raise EnvError(f"env {name!r} crashed in step({action!r}) {where}: {e}") from e
    if not isinstance(out, tuple) or len(out) != 5:
        raise EnvError(
            f"env {name!r}: step() {where} returned {out!r}, not "
            "(observation, reward, terminated, truncated, info)"
        )
    obs, reward, terminated, truncated, info = out
    if not isinstance(obs, str):
        raise EnvError(f"env {name!r}: step() {where} returned the observation {obs!r}")
    if (
        isinstance(reward, bool)
        or not isinstance(reward, numbers.Real)
        or not abs(float(reward)) <= FLOAT32_MAX  # (NaN fails too)
    ):
        raise EnvError(
            f"env {name!r}: step() {where} returned the reward {reward!r}, not a finite number "
            "(within float32's range: rewards are float32 in a StepBatch)"
        )
    for label, flag in (("terminated", terminated), ("truncated", truncated)):
        if not _is_flag(flag):
            raise EnvError(f"env {name!r}: step() {where} returned {label}={flag!r}, not a bool")
    if not isinstance(info, Mapping):
        raise EnvError(f"env {name!r}: step() {where} returned info={info!r}, not a dict")
    return obs, float(reward), bool(terminated), bool(truncated), info


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
    limit = checked_max_steps(env)
    checked_reset(env, seed)
    total, steps, info = 0.0, 0, {"success": False}
    while True:
        _, reward, terminated, truncated, info = checked_step(
            env, env.grammar.sample(rng), seed=seed, step=steps
        )
        total += reward
        steps += 1
        if terminated or truncated or steps >= limit:  # cut at max_steps: never hangs
            return {"success": bool(info.get("success", False)), "return": total, "steps": steps}


def random_policy_success_rate(name: str, seeds: range, policy_seed: int = 0) -> float:
    """Fraction of ``seeds`` the random grammar policy solves on ``make_env(name)``."""
    env, rng = make_env(name), random.Random(policy_seed)
    wins = sum(run_random_episode(env, s, rng)["success"] for s in seeds)
    return wins / max(1, len(seeds))
