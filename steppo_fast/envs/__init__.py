"""Built-in multi-turn environments.

- ``doors`` (:class:`DoorsEnv`): the easy default; read a colour, ``open`` the door; 3 doors
  within 8 steps.
- ``quest`` (:class:`QuestEnv`): the harder one for comparisons; fetch the right key, open the
  chest, bring the gem; ordered sub-goals, distractors, a step cost, 20 steps.
- ``haystack`` (:class:`HaystackEnv`): the long-context one; read long pages (600 words each),
  find the hidden key, submit it; trajectories reach 8k tokens.

All speak text (see :class:`Env`), declare an action :class:`Grammar` for constrained
decoding, and use the shipped word-level vocabulary (:func:`default_tokenizer`,
:mod:`.tokenizer`). With a model's own tokenizer (``steppo train --model PATH``) they are
driven in plain text through :class:`HFTokenizer` (:mod:`.hf_tokenizer`; transformers is
imported only when one is built).
"""

from .base import (
    Env,
    EnvError,
    checked_max_steps,
    checked_reset,
    checked_state_key,
    checked_step,
    env_names,
    make_env,
    random_policy_success_rate,
    register,
    run_random_episode,
)
from .doors import DoorsEnv
from .grammar import Grammar
from .haystack import HaystackEnv, scripted_action
from .hf_tokenizer import HFTokenizer
from .quest import QuestEnv
from .tokenizer import WordTokenizer, default_tokenizer

__all__ = [
    "DoorsEnv",
    "Env",
    "EnvError",
    "checked_max_steps",
    "checked_reset",
    "checked_state_key",
    "checked_step",
    "Grammar",
    "HaystackEnv",
    "HFTokenizer",
    "QuestEnv",
    "WordTokenizer",
    "default_tokenizer",
    "env_names",
    "make_env",
    "random_policy_success_rate",
    "register",
    "run_random_episode",
    "scripted_action",
]
