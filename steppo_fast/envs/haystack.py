"""``haystack``: the long-context built-in environment (long observations, recall needed).

``n_pages`` (8) pages, numbered 1..n; each is ``page_tokens`` (600) words of filler drawn from the
seed. One page hides a three-digit key (``key is 7 2 5``) at a random position; the others hold
filler only. The agent reads pages (``look <n>``: the observation is the whole page) and wins by
submitting the key (``open <d> <d> <d>``: reward 1, terminated, success). A wrong key is answered
``wrong key .`` and the episode goes on; it is truncated after ``max_steps`` (14) steps. The key
is read in one observation and must be recalled several hundred tokens later, so the policy has
to attend back across earlier observations. Filler words are rooms, colours and a few others,
never digits nor ``key``, so the key is the only digit run on its page.

Token budget: every ``look`` adds ``page_tokens + 2`` tokens, so an episode that keeps reading
reaches ``max_steps * (page_tokens + 2)`` tokens (8.4k with the defaults); a scripted reader
finds the key after ``n_pages / 2`` looks on average (about 2.7k tokens).

Grammar (17 + 729 actions)::

    look <1..n_pages>  |  open <1..9> <1..9> <1..9>

A uniformly random grammar policy opens with probability 1/2 per step and then guesses one of
729 keys: it succeeds on about 14 * 1/2 * 1/729 ~ 1% of seeds (tested: < 3% over 500).
:func:`scripted_action` is the optimal reader (look at unread pages in order, open the key once
seen), for SFT data or as a baseline.

Example (``page_tokens=6``)::

    reset     -> "task : key in 1 to 8 . look or open ."
    "look 1"  -> "1 : red hall , study garden door"
    "look 2"  -> "2 : attic key is 7 2 5 blue"
    "open 7 2 5" -> "opens . you win ."        reward 1, terminated
"""

from __future__ import annotations

import random
from typing import Any

from .base import register
from .grammar import Grammar

DIGITS = tuple(str(d) for d in range(1, 10))
FILLER = (
    "hall",
    "kitchen",
    "attic",
    "cellar",
    "garden",
    "study",
    "red",
    "blue",
    "green",
    "yellow",
) + ("door", "chest", "gem", "locked", "nothing", "here", "at", "in", "to", ",", ".")
WORDS = DIGITS + FILLER + ("task", ":", "key", "look", "or", "open", "is", "wrong")
WORDS += ("opens", "you", "win", "invalid", "action", "say", "time", "up")


class HaystackEnv:
    """Find the key hidden in one of several long pages (see the module docstring).

    Args:
        n_pages: pages to search (1..9).
        page_tokens: filler words per page (>= 8): the observation length of a ``look``.
        max_steps: steps before truncation (>= 2).
    """

    name = "haystack"

    def __init__(self, n_pages: int = 8, page_tokens: int = 600, max_steps: int = 14):
        if not 1 <= n_pages <= 9:
            raise ValueError(f"n_pages: must lie in 1..9, got {n_pages}")
        if page_tokens < 8:
            raise ValueError(f"page_tokens: must be >= 8, got {page_tokens}")
        if max_steps < 2:
            raise ValueError(f"max_steps: must be >= 2, got {max_steps}")
        self.n_pages, self.page_tokens, self.max_steps = n_pages, page_tokens, max_steps
        self.grammar = Grammar([[("look",), DIGITS[:n_pages]], [("open",), DIGITS, DIGITS, DIGITS]])
        self._seed = 0
        self._key: tuple[str, ...] = ()
        self._page = 0  # 0-based page holding the key
        self._read: set[int] = set()
        self._t = 0
        self._done = True

    def reset(self, seed: int) -> str:
        rng = random.Random(f"haystack:{seed}")
        self._seed = seed
        self._key = tuple(rng.choice(DIGITS) for _ in range(3))
        self._page = rng.randrange(self.n_pages)
        self._read, self._t, self._done = set(), 0, False
        return f"task : key in 1 to {self.n_pages} . look or open ."

    def page(self, n: int) -> str:
        """The text of page ``n`` (1-based) of the current task: deterministic by seed."""
        rng = random.Random(f"haystack:{self._seed}:page:{n}")
        words = [rng.choice(FILLER) for _ in range(self.page_tokens)]
        if n - 1 == self._page:
            at = rng.randrange(self.page_tokens - 4)
            words[at : at + 5] = ["key", "is", *self._key]
        return f"{n} : " + " ".join(words)

    def state_key(self) -> str:
        read = "".join(str(p) for p in sorted(self._read))
        return f"{''.join(self._key)}@{self._page}|{read}|{int(self._page in self._read)}"

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("haystack: step() after the episode ended; call reset()")
        self._t += 1
        words = action.split()
        valid = self.grammar.is_complete(words)
        reward, terminated = 0.0, False
        if not valid:
            text = "invalid action . say look or open ."
        elif words[0] == "look":
            n = int(words[1])
            self._read.add(n - 1)
            text = self.page(n)
        elif tuple(words[1:]) == self._key:
            text, reward, terminated = "opens . you win .", 1.0, True
        else:
            text = "wrong key ."
        truncated = not terminated and self._t >= self.max_steps
        if truncated:
            text += " time up ."
        self._done = terminated or truncated
        info = {"success": terminated, "valid": valid, "state": self.state_key()}
        return text, reward, terminated, truncated, info


def scripted_action(observations: list[str], n_pages: int = 8) -> str:
    """The optimal reader's next action given the episode's observations so far (the first one
    from ``reset``): ``open`` the key once a page showed it, else ``look`` at the lowest-numbered
    page not yet read (so from a clean start pages are read in order 1, 2, ...; after other
    actions, no page is read twice)."""
    read = set()
    for text in observations[1:]:
        words = text.split()
        for i in range(len(words) - 4):
            if words[i] == "key" and words[i + 1] == "is":
                return "open " + " ".join(words[i + 2 : i + 5])
        if len(words) > 1 and words[1] == ":" and words[0] in DIGITS:
            read.add(int(words[0]))
    unread = [n for n in range(1, n_pages + 1) if n not in read]
    return f"look {unread[0] if unread else n_pages}"


def small_haystack() -> HaystackEnv:
    """``haystack-small``: 4 pages of 24 words, 8 steps. The same find-and-recall task at a size
    whose warm start (``steppo sft``) and algorithm comparison fit in minutes of CPU with the tiny
    model; the default ``haystack`` is the long-context one."""
    return HaystackEnv(n_pages=4, page_tokens=24, max_steps=8)


register("haystack", HaystackEnv)
register("haystack-small", small_haystack)
