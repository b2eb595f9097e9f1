"""``quest``: the harder built-in environment, for algorithm comparisons.

A small house of ``n_rooms`` (3) rooms drawn from :data:`ROOMS`. A locked chest holds a gem; it
opens only with the key of one colour, and keys of the other colours lie around as
distractors. The first observation states the task: which key, where it is, where the chest is,
where to bring the gem, and what the agent sees where it starts::

    task : red key in attic , chest in cellar , gem to garden . at hall : blue key .

Sub-goals must be reached in order: go to the key's room, take the right key, go to the
chest's room, ``open chest`` (needs the right key; the agent takes the gem out), go to the
target room (success: reward +1, terminated). Every step costs ``step_cost`` (0.01), so short
solutions return more; the episode is truncated after ``max_steps`` (20) steps.
Distractors: wrong-colour keys (taking one wastes a step, the chest stays locked), rooms that
play no part, and moves that lead away. Observations are terse (``at cellar : chest .``,
``took red key .``, ``chest locked .``), so the plan must be recalled from the first
observation and progress from the history.

Grammar (10 actions, 2 words each)::

    go <hall|kitchen|attic|cellar|garden|study>  |  take <red|blue|green>  |  open chest

(``take red`` takes the red key). A uniformly random grammar policy succeeds on about 6% of
seeds (6.5% over 20000 seeds; the tests check the bounds). There are 29160 distinct tasks
(C(6, 3) houses x 3 key colours x 6 chest/target rooms x 27 key placements x 3 starts), so
held-out seeds are almost always new tasks (tested: < 5% of 64 held-out tasks appear among
the 1600 tasks of a 100-iteration run).
"""

from __future__ import annotations

import random
from typing import Any

from .base import register
from .grammar import Grammar

ROOMS = ("hall", "kitchen", "attic", "cellar", "garden", "study")
KEY_COLOURS = ("red", "blue", "green")
WORDS = (
    ROOMS
    + KEY_COLOURS
    + ("task", ":", ",", ".", "key", "in", "chest", "gem", "to", "at", "nothing", "go", "take")
    + ("open", "no", "here", "already", "took", "locked", "opens", "delivered", "you", "win")
    + ("invalid", "action", "time", "up")
)


class QuestEnv:
    """The key / chest / gem task (see the module docstring)."""

    name = "quest"

    def __init__(self, n_rooms: int = 3, max_steps: int = 20, step_cost: float = 0.01):
        if not 3 <= n_rooms <= len(ROOMS) or max_steps < 1:
            raise ValueError(f"quest: need 3 <= n_rooms <= {len(ROOMS)} and max_steps >= 1")
        self.n_rooms, self.max_steps, self.step_cost = n_rooms, max_steps, step_cost
        self.grammar = Grammar(
            [[("go",), ROOMS], [("take",), KEY_COLOURS], [("open",), ("chest",)]]
        )
        self._t = 0

    # ----------------------------------------------------------------------------- state
    def reset(self, seed: int) -> str:
        rng = random.Random(f"quest:{seed}")
        self._rooms = rng.sample(ROOMS, self.n_rooms)
        self._key_colour = rng.choice(KEY_COLOURS)
        self._chest_room, self._target = rng.sample(self._rooms, 2)
        self._items: dict[str, list[str]] = {r: [] for r in self._rooms}
        for colour in KEY_COLOURS:  # every colour has one key somewhere (wrong ones distract)
            self._items[rng.choice(self._rooms)].append(f"{colour} key")
        self._key_room = next(r for r in self._rooms if f"{self._key_colour} key" in self._items[r])
        self._room = rng.choice(self._rooms)
        self._carry: list[str] = []
        self._chest_open = False
        self._t = 0
        task = (
            f"task : {self._key_colour} key in {self._key_room} , chest in {self._chest_room} , "
            f"gem to {self._target} . "
        )
        return task + self._describe()

    def state_key(self) -> str:
        items = ";".join(f"{r}={','.join(self._items[r])}" for r in self._rooms)
        return f"{self._room}|{','.join(self._carry)}|{int(self._chest_open)}|{items}"

    def task_key(self) -> str:
        """Identity of the task drawn by the last ``reset`` (to count distinct tasks)."""
        items = ";".join(f"{r}={','.join(sorted(self._items[r]))}" for r in sorted(self._rooms))
        return f"{self._key_colour}|{self._chest_room}|{self._target}|{self._room}|{items}"

    def _describe(self) -> str:
        here = list(self._items[self._room])
        if self._room == self._chest_room and not self._chest_open:
            here.append("chest")
        return f"at {self._room} : {' '.join(here) if here else 'nothing'} ."

    # ------------------------------------------------------------------------------ step
    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._t >= self.max_steps:
            raise RuntimeError("quest: step() after the episode ended; call reset()")
        self._t += 1
        words = action.split()
        valid = self.grammar.is_complete(words)
        success = False
        if not valid:
            text = "invalid action ."
        elif words[0] == "go":
            text, success = self._go(words[1])
        elif words[0] == "take":
            text = self._take(f"{words[1]} key")
        else:
            text = self._open_chest()
        reward = (1.0 if success else 0.0) - self.step_cost
        truncated = not success and self._t >= self.max_steps
        if truncated:
            text += " time up ."
        info = {"success": success, "valid": valid, "state": self.state_key()}
        return text, reward, success, truncated, info

    def _go(self, room: str) -> tuple[str, bool]:
        if room not in self._rooms:
            return f"no {room} here .", False
        if room == self._room:
            return f"already at {room} .", False
        self._room = room
        if room == self._target and "gem" in self._carry:
            return f"gem delivered to {room} . you win .", True
        return self._describe(), False

    def _take(self, item: str) -> str:
        if item not in self._items[self._room]:
            return f"no {item} here ."
        self._items[self._room].remove(item)
        self._carry.append(item)
        return f"took {item} ."

    def _open_chest(self) -> str:
        if self._room != self._chest_room:
            return "no chest here ."
        if self._chest_open:
            return "chest already open ."
        if f"{self._key_colour} key" not in self._carry:
            return "chest locked ."
        self._chest_open = True
        self._carry.append("gem")
        return "chest opens . took gem ."


def scripted_action(observations: list[str]) -> str:
    """The optimal next action given the episode's observations so far (the first one from
    ``reset`` states the task). Stateless: the plan is re-read from the first observation and
    the progress from the history (the current room from the newest ``at <room> :``; the key
    once ``took <colour> key .`` was seen; the gem once ``chest opens``), so it also acts
    optimally from states a noisy or random prefix led to."""
    first = observations[0].split()
    if len(first) < 14 or first[:2] != ["task", ":"]:
        raise ValueError("quest scripted_action: observations[0] is not a task statement")
    colour, key_room, chest_room, target = first[2], first[5], first[9], first[13]
    room, has_key, has_gem = None, False, False
    for text in observations:
        words = text.split()
        for i in range(len(words) - 1):
            if words[i] == "at" and words[i + 1] in ROOMS and i + 2 < len(words):
                if words[i + 2] == ":":
                    room = words[i + 1]
        has_key = has_key or f"took {colour} key" in text
        has_gem = has_gem or text.startswith("chest opens")
    if room is None:
        raise ValueError("quest scripted_action: no observation says where the agent is")
    if has_gem:
        return f"go {target}"
    if has_key:
        return "open chest" if room == chest_room else f"go {chest_room}"
    return f"take {colour}" if room == key_room else f"go {key_room}"


register("quest", QuestEnv)
