"""Memory levers of the trainer: activation checkpointing and bf16 compute.

- :func:`enable_grad_checkpointing` (``--grad-checkpointing``): each decoder layer's forward runs
  under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` whenever autograd records
  (training forwards): only the layer inputs [N, H] are kept per layer, and the layer is
  recomputed during backward (one extra forward of the decoder stack: ~1/3 more compute). The
  recompute runs the same kernels on the same inputs, so gradients equal the run without it
  (tested, fp32). It does not depend on ``module.training`` (the trainer keeps its models in
  eval mode) and wraps the layer's ``forward`` only, so FSDP2's hooks on a ``fully_shard``-ed
  layer stay outside the checkpoint (the parameters are gathered again for the recompute).
- :func:`compute_dtype` (``--dtype bf16``): ``torch.autocast`` on the model's device type with
  ``torch.bfloat16``: matmuls run in bf16, parameters, gradients and AdamW state stay fp32
  (master weights). The hidden states then come out bf16; the step ops take them as they are
  and accumulate in fp32 (``linear_logprobs`` gets the LM head cast to bf16, its log-probs are
  fp32; values are read from ``hidden.float()``). On CPU, torch's autocast supports bf16 too.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modeling import decoder_layers

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def enable_grad_checkpointing(model: nn.Module | None) -> int:
    """Wrap the decoder layers of ``model`` (in place, idempotent) in non-reentrant activation
    checkpointing. Returns the number of layers wrapped (0 for ``None``)."""
    if model is None:
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_steppo_checkpointed", False):
            continue
        # a bound method (not a closure over this layer): copy.deepcopy rebinds it to the copy
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        layer._steppo_checkpointed = True
    return len(layers)


def _checkpointed_forward(self, *args, **kwargs):
    inner = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)
    return inner(self, *args, **kwargs)


def compute_dtype(dtype: str, device: torch.device | str):
    """A context manager for the model forwards: bf16 autocast on ``device``'s type for
    ``"bf16"``, nothing for ``"fp32"``. Unknown names are a ``ValueError`` naming ``--dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])
