"""A deterministic word-level tokenizer over the vocabulary shipped with the package.

Text is split on whitespace; each word is one token. The vocabulary (``vocab.txt`` beside this
file, one word per line, the line number is the id) covers every word the built-in environments
and their grammars produce, plus the special tokens below. Decoding joins words with one space,
so ``decode(encode(text)) == " ".join(text.split())`` for any in-vocabulary text.

Special tokens: ``<pad>`` (padding, never attended), ``<bos>`` (start of an episode),
``<unk>`` (any out-of-vocabulary word), ``<obs>`` (an observation follows), ``<act>`` (the
policy acts next; the critic reads the state value here), ``<end>`` (ends a free-form action
when no grammar is used).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

PAD, BOS, UNK, OBS, ACT, END = "<pad>", "<bos>", "<unk>", "<obs>", "<act>", "<end>"
SPECIALS = (PAD, BOS, UNK, OBS, ACT, END)
VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab.txt")


class WordTokenizer:
    """Word <-> id mapping. ``words`` must start with :data:`SPECIALS` in that order."""

    def __init__(self, words: Iterable[str]):
        self.words: tuple[str, ...] = tuple(words)
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"words: the vocabulary must start with {SPECIALS}")
        if len(set(self.words)) != len(self.words):
            dup = next(w for i, w in enumerate(self.words) if w in self.words[:i])
            raise ValueError(f"words: {dup!r} appears twice")
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.unk_id, self.obs_id, self.act_id, self.end_id = (
            self.ids[s] for s in SPECIALS
        )

    @classmethod
    def from_file(cls, path: str = VOCAB_FILE) -> WordTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls(line.strip() for line in f if line.strip())

    def __len__(self) -> int:
        return len(self.words)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Token ids of the whitespace-separated words of ``text`` (unknown words -> ``<unk>``)."""
        return [self.ids.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by single spaces (ids must be in range)."""
        return " ".join(self.words[int(i)] for i in ids)

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary (for tests and env authors)."""
        return [w for w in text.split() if w not in self.ids]


@functools.cache
def default_tokenizer() -> WordTokenizer:
    """The tokenizer over the shipped vocabulary (cached; it is immutable)."""
    return WordTokenizer.from_file()
