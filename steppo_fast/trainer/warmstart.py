"""``steppo train --init DIR``: start a run's policy from a saved model folder.

``DIR`` is a folder in HF format written by ``steppo sft`` (``RUN_DIR/model``) or
``steppo train`` (``RUN_DIR/model``). Its weights are copied into the policy the run built
(``--model`` / ``--arch`` / ``--hidden-size`` / ...), so the folder must hold the same
architecture: the same model class, the same parameter names and shapes. The trainer loads it
before it builds the critic, so a separate critic's backbone is a copy of the initial policy's
backbone (its value head starts at zero), and the KL reference is the initial policy.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


@contextlib.contextmanager
def quiet_transformers():
    """transformers' weight loading / saving progress bars off (they would break the CLI's
    one-line errors), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_init(policy: nn.Module, path: str) -> None:
    """Copy the weights of the model folder ``path`` into ``policy`` (in place).

    Raises ``ValueError`` naming ``--init`` when ``path`` is not a directory, cannot be loaded,
    or holds another model class or parameter set (the first differing name and its shapes)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(
            f"--init: {path!r} is not a directory (expected a model folder such as the "
            "RUN_DIR/model that steppo sft or steppo train writes)"
        )
    try:
        with quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError) as e:
        raise ValueError(f"--init: cannot load {path!r} ({str(e).splitlines()[0]})") from None
    if type(loaded).__name__ != type(policy).__name__:
        raise ValueError(
            f"--init: {path!r} holds a {type(loaded).__name__}, the run's policy is a "
            f"{type(policy).__name__} (use the --model / --arch of the run that wrote it)"
        )
    want = policy.state_dict()
    have = loaded.state_dict()
    for name in sorted(set(want) | set(have)):
        a = tuple(have[name].shape) if name in have else None
        b = tuple(want[name].shape) if name in want else None
        if a != b:
            raise ValueError(
                f"--init: {path!r} does not match the run's policy: parameter {name} has shape "
                f"{a} in the folder, {b} in the policy (use the --model / --arch / "
                "--hidden-size / --num-layers / --num-heads of the run that wrote it)"
            )
    with torch.no_grad():
        for name, tensor in want.items():
            tensor.copy_(have[name])
