"""Action grammars: which word may come next, given the action so far.

An environment may declare a :class:`Grammar` so that a sampler only emits well-formed actions
(constrained decoding). A grammar is a finite set of *templates*, each a sequence of word slots
(a slot is a tuple of alternative words), e.g. ``[("go",), ROOMS]`` for ``go <room>``.

The grammar is **prefix-free**: no complete action is a proper prefix of another one. So the
sampler needs no end-of-action token: an action is complete exactly when
:meth:`Grammar.allowed_next` returns an empty tuple. The grammar is static (the same in every
state); whether an action makes sense in the current state is the environment's business (it
answers a senseless action with an observation saying so).

Grammar masks are meant for small action vocabularies: the trainer stores one ``[V]`` bool row
per action token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Words = tuple[str, ...]


class Grammar:
    """A prefix-free set of word templates, compiled to a trie ``prefix -> allowed next words``.

    Args:
        templates: each template is a sequence of slots; each slot a sequence of words.
    """

    def __init__(self, templates: Sequence[Sequence[Sequence[str]]]):
        if not templates:
            raise ValueError("templates: a grammar needs at least one template")
        next_words: dict[Words, list[str]] = {}
        complete: set[Words] = set()
        for t, template in enumerate(templates):
            if not template or any(not slot for slot in template):
                raise ValueError(f"templates[{t}]: every template needs >= 1 non-empty slot")
            prefixes: list[Words] = [()]
            for slot in template:
                grown = []
                for prefix in prefixes:
                    options = next_words.setdefault(prefix, [])
                    for word in slot:
                        if not word or any(c.isspace() for c in word):
                            raise ValueError(
                                f"templates[{t}]: word {word!r} is empty or has spaces"
                            )
                        if word not in options:
                            options.append(word)
                        grown.append(prefix + (word,))
                prefixes = grown
            complete.update(prefixes)
        for action in complete:
            if next_words.get(action):
                raise ValueError(
                    f"templates: action {' '.join(action)!r} is a prefix of a longer action; "
                    "a grammar must be prefix-free"
                )
        self._next: dict[Words, Words] = {p: tuple(ws) for p, ws in next_words.items()}
        self._complete = frozenset(complete)
        self.words: Words = tuple(sorted({w for ws in self._next.values() for w in ws}))
        self.max_len = max(len(a) for a in complete)

    def allowed_next(self, prefix: Sequence[str]) -> Words:
        """Words that may follow ``prefix``; ``()`` when ``prefix`` is a complete action.

        Raises ``ValueError`` when ``prefix`` is not the start of any action."""
        prefix = tuple(prefix)
        if prefix in self._complete:
            return ()
        try:
            return self._next[prefix]
        except KeyError:
            raise ValueError(
                f"prefix: {' '.join(prefix)!r} starts no action of the grammar"
            ) from None

    def is_complete(self, words: Sequence[str]) -> bool:
        """True when ``words`` is exactly one complete action."""
        return tuple(words) in self._complete

    def prefixes(self) -> list[Words]:
        """Every incomplete prefix (including ``()``), e.g. to precompute token masks."""
        return list(self._next)

    def actions(self) -> list[Words]:
        """Every complete action, sorted."""
        return sorted(self._complete)

    def sample(self, rng: random.Random) -> str:
        """A uniformly random action built word by word (uniform over the allowed next words at
        each position), i.e. what a random policy under the grammar mask does."""
        words: list[str] = []
        while True:
            options = self.allowed_next(words)
            if not options:
                return " ".join(words)
            words.append(rng.choice(options))
