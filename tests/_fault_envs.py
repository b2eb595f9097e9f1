"""Misbehaving environments for tests/trainer/test_trainer_faults.py and
tests/trainer/test_trainer_env_faults.py (a module of its own so a child ``steppo train`` process
can register them too).

- ``killer``: doors (one door, 3 steps) whose process ``kill -9``s itself at the
  ``STEPPO_TEST_KILL_AT``-th ``step()`` call when that variable is set (else a plain env);
- :class:`Faulty`: a one-step-per-call env whose ``reset`` / ``step`` / ``state_key`` returns or
  raises what the test asks for.
"""

from __future__ import annotations

import os
import signal

from steppo_fast.envs import DoorsEnv, register

_calls = {"step": 0}


class KillerEnv(DoorsEnv):
    name = "killer"

    def __init__(self):
        super().__init__(n_doors=1, max_steps=3)

    def step(self, action):
        _calls["step"] += 1
        at = os.environ.get("STEPPO_TEST_KILL_AT")
        if at is not None and _calls["step"] >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(action)


class Faulty:
    """A text env (no grammar unless given) that never ends an episode by itself unless
    ``end_after`` is set; each of
    ``obs``, ``reward``, ``terminated``, ``info``, ``key``, ``first`` replaces what it returns
    (a callable is called; an exception instance is raised)."""

    def __init__(self, name="faulty", max_steps=4, end_after=None, grammar=None, **returns):
        self.name, self.max_steps, self.end_after = name, max_steps, end_after
        self.grammar = grammar
        self.returns, self.t = returns, 0

    def _get(self, what, default):
        value = self.returns.get(what, default)
        if isinstance(value, Exception):
            raise value
        return value

    def reset(self, seed):
        self.t = 0
        return self._get("first", "door 1 is red .")

    def state_key(self):
        return self._get("key", f"t{self.t}")

    def step(self, action):
        self.t += 1
        if self.t > 10 * self.max_steps:  # a test that would hang fails instead
            raise RuntimeError("test guard: the episode was never cut")
        ended = self.end_after is not None and self.t >= self.end_after
        return (
            self._get("obs", "door 1 is red ."),
            self._get("reward", 0.0),
            self._get("terminated", ended),
            False,
            self._get("info", {"success": False}),
        )


register("killer", KillerEnv)
