"""``doors``: the easy built-in environment (the default of ``steppo train``).

A corridor of ``n_doors`` locked doors. Each door has a colour drawn from the seed; the
observation names the current door's colour, and the action ``open <colour>`` with the matching
colour opens it. Other actions waste a step: ``open`` with another colour ("wrong key"),
``knock`` and ``look`` (distractors). Reward is sparse and delayed: 1 when the last door
opens (terminated, success), 0 otherwise; the episode is truncated after ``max_steps`` steps.

Grammar (6 actions)::

    open <red|blue|green|yellow>  |  knock  |  look

so a uniformly random grammar policy (uniform over the allowed words at each position) picks
the right action with probability 1/3 * 1/4 per step, and opens 3 doors within 8 steps about 2%
of the time (measured: 2.1% over 20000 seeds). A learned policy reads the colour
from the last observation and solves every task in ``n_doors`` steps.

Example episode (seed-dependent colours)::

    reset  -> "open 3 doors . door 1 is blue ."
    "open blue"  -> "door 1 opens . door 2 is red ."
    "knock"      -> "no answer . door 2 is red ."
    "open red"   -> "door 2 opens . door 3 is red ."
    "open red"   -> "door 3 opens . you are out ."       reward 1, terminated
"""

from __future__ import annotations

import random
from typing import Any

from .base import register
from .grammar import Grammar

COLOURS = ("red", "blue", "green", "yellow")
NUMBERS = ("1", "2", "3", "4", "5", "6", "7", "8", "9")
WORDS = (
    COLOURS
    + NUMBERS
    + ("open", "knock", "look", "door", "doors", "is", "opens", "you", "are", "out", "wrong")
    + ("key", "no", "answer", "invalid", "action", "say", "or", ",", "time", "up", ".")
)


class DoorsEnv:
    """The easy corridor task (see the module docstring)."""

    name = "doors"

    def __init__(self, n_doors: int = 3, max_steps: int = 8, colours: tuple[str, ...] = COLOURS):
        if not 1 <= n_doors <= len(NUMBERS) or max_steps < n_doors or len(colours) < 2:
            raise ValueError("doors: need 1 <= n_doors <= 9, max_steps >= n_doors, >= 2 colours")
        self.n_doors, self.max_steps, self.colours = n_doors, max_steps, tuple(colours)
        self.grammar = Grammar([[("open",), self.colours], [("knock",)], [("look",)]])
        self._door_colours: list[str] = []
        self._door = 0
        self._t = 0

    def _describe(self) -> str:
        return f"door {self._door + 1} is {self._door_colours[self._door]} ."

    def state_key(self) -> str:
        return f"{'-'.join(self._door_colours)}|{self._door}"

    def reset(self, seed: int) -> str:
        rng = random.Random(f"doors:{seed}")
        self._door_colours = [rng.choice(self.colours) for _ in range(self.n_doors)]
        self._door, self._t = 0, 0
        return f"open {self.n_doors} doors . " + self._describe()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._t >= self.max_steps or self._door >= self.n_doors:
            raise RuntimeError("doors: step() after the episode ended; call reset()")
        self._t += 1
        words = action.split()
        valid = self.grammar.is_complete(words)
        reward, terminated = 0.0, False
        if not valid:
            text = "invalid action . say open , knock or look . " + self._describe()
        elif words[0] == "open" and words[1] == self._door_colours[self._door]:
            self._door += 1
            if self._door == self.n_doors:
                text, reward, terminated = f"door {self._door} opens . you are out .", 1.0, True
            else:
                text = f"door {self._door} opens . " + self._describe()
        elif words[0] == "open":
            text = "wrong key . " + self._describe()
        elif words[0] == "knock":
            text = "no answer . " + self._describe()
        else:  # look
            text = self._describe()
        truncated = not terminated and self._t >= self.max_steps
        if truncated:
            text += " time up ."
        info = {"success": terminated, "valid": valid, "state": self.state_key()}
        return text, reward, terminated, truncated, info


def scripted_action(observations: list[str]) -> str:
    """The optimal next action given the episode's observations so far: ``open`` the colour
    of the current door, read from the newest observation naming one (every observation of
    a live episode ends with ``door <n> is <colour> .``)."""
    for text in reversed(observations):
        words = text.split()
        for i in range(len(words) - 3, -1, -1):
            if words[i] == "door" and words[i + 2] == "is":
                return f"open {words[i + 3]}"
    raise ValueError("doors scripted_action: no observation names a door's colour")


register("doors", DoorsEnv)
