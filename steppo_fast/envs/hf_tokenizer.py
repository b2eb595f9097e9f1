"""Drive the environments with a model's own Hugging Face tokenizer (``--model PATH``).

:class:`HFTokenizer` wraps ``AutoTokenizer.from_pretrained(path, local_files_only=True)`` and
offers the rollout what :class:`~.tokenizer.WordTokenizer` (the built-in vocabulary, beside this
file) offers it (pad / bos ids, the framing of an observation before an action, encode /
decode, vocabulary size) with **plain-text framing** (no chat template, no new special tokens,
no embedding resize)::

    [bos] "Observation: " o_0 "\\nAction:" " " a_0 <end> "Observation: " o_1 "\\nAction:" ...

- each observation is encoded on its own (``encode("Observation: " + text + "\\nAction:")``),
  each action as ``encode(" " + action)`` followed by the *end-of-action* token;
- the end-of-action token :attr:`HFTokenizer.end_id` is the newline token when ``"\\n"``
  encodes to exactly one token (then an action line ends the way text does), else ``eos``; an
  observation that follows an action not ended by a newline gets a leading ``"\\n"``;
- the critic's value is read at the last prompt token before each action (the last token of
  ``"\\nAction:"``), which is what ``StepBatch.value_index`` is.

Each piece is encoded separately, so the merged sequence may tokenize a boundary differently
from encoding the whole transcript at once; rollout and training use the same stored ids, so
this changes nothing in the RL maths (the decoded text is identical).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

OBS_PREFIX = "Observation: "
ACT_SUFFIX = "\nAction:"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def has_tokenizer(path: str) -> bool:
    """True when the directory ``path`` holds tokenizer files."""
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


class HFTokenizer:
    """A transformers tokenizer with the rollout's interface (see the module docstring).

    Args:
        tokenizer: a ``PreTrainedTokenizerBase`` (use :meth:`from_pretrained` for a directory).
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        newline = tokenizer.encode("\n", add_special_tokens=False)
        eos = tokenizer.eos_token_id
        if len(newline) == 1 and tokenizer.decode(newline) == "\n":
            self.end_id = newline[0]
        elif eos is not None:
            self.end_id = int(eos)
        else:
            raise ValueError(
                "--model: the tokenizer encodes '\\n' as several tokens and has no eos token; "
                "there is no end-of-action token"
            )
        self.newline_end = self.end_id == (newline[0] if len(newline) == 1 else None)
        self.bos_id = tokenizer.bos_token_id  # None for tokenizers without one (e.g. Qwen2)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else eos if eos is not None else self.end_id)

    @classmethod
    def from_pretrained(cls, path: str) -> HFTokenizer:
        """Load the tokenizer of the local model directory ``path`` (no download)."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"--model: cannot load the tokenizer of {path!r} ({msg})") from None
        return cls(tok)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens kept, no clean-up: exact round trip)."""
        return self.hf.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def action_ids(self, action: str) -> list[int]:
        """The tokens of a complete action as the policy emits it: ``" " + action`` + end."""
        return [*self.encode(" " + action), self.end_id]

    def action_text(self, ids: Iterable[int]) -> str:
        """The env-facing text of drawn action tokens (end-of-action tokens dropped, stripped)."""
        return self.decode([i for i in ids if int(i) != self.end_id]).strip()

    def prompt_ids(self, first_observation: str) -> list[int]:
        """``[bos] "Observation: <text>\\nAction:"``: the first context of an episode."""
        head = [] if self.bos_id is None else [int(self.bos_id)]
        return head + self.encode(OBS_PREFIX + first_observation + ACT_SUFFIX)

    def observation_ids(self, text: str, previous_action: list[int] | None = None) -> list[int]:
        """The tokens appended after ``previous_action`` for the next observation ``text``:
        ``"Observation: <text>\\nAction:"``, with a leading ``"\\n"`` unless the action ended
        with the newline end-of-action token."""
        ended = bool(previous_action) and previous_action[-1] == self.end_id and self.newline_end
        return self.encode(("" if ended else "\n") + OBS_PREFIX + text + ACT_SUFFIX)

    def save_pretrained(self, path: str) -> None:
        """Write the wrapped tokenizer's files to ``path`` (beside an exported model)."""
        self.hf.save_pretrained(path)
