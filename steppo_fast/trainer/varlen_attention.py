"""Variable-length (packed) attention for Hugging Face models, registered with transformers'
attention interface as ``"steppo_varlen"``.

A packed row holds R sequences back to back (``cu_seqlens`` [R+1], int32 offsets). transformers'
own packed path (sdpa + ``position_ids`` restarting per sequence) builds an [N, N] block mask:
O(N^2) memory and time for N tokens, whatever the sequences' lengths. ``steppo_varlen`` instead
receives the offsets (the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
``max_length_k`` keyword arguments that transformers forwards to flash-attention) and attends
within each sequence only:

- CUDA with ``flash_attn`` installed and fp16/bf16 tensors: ``flash_attn_varlen_func`` on the
  [N, heads, D] tensors (causal). **Not run here** (no GPU in this project): written to
  flash-attn's documented signature, untested.
- otherwise (CPU; CUDA without flash-attn): causal ``scaled_dot_product_attention`` on each
  sequence's slice, ``sum_r L_r^2`` work and O(N) memory beyond the per-sequence kernel (the CPU
  SDPA kernel is a flash-style kernel with O(L) workspace when no mask is given).

Every other call (no ``cu_seq_lens_q``: rollouts with a KV cache and a 2-D padding mask, padded
training rows) is plain ``"sdpa"``: masks are built by transformers' ``sdpa_mask`` and attention
is ``sdpa_attention_forward``, so switching a model to ``"steppo_varlen"``
(:func:`enable_varlen_attention`) changes nothing but packed forwards. While a packed forward
runs (:func:`packed_mask_skipped`), the mask builder returns no mask at all, so the [N, N] mask
is never built.

Shapes: ``query`` [1, Hq, N, D], ``key`` / ``value`` [1, Hkv, N, D] (Hq a multiple of Hkv:
grouped-query attention); returns ``(out [1, N, Hq, D], None)`` as every transformers attention
function does. dtype: whatever the projections produced (fp32, or bf16 under autocast).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

NAME = "steppo_varlen"
_state = threading.local()


def _flash_varlen():
    """flash-attn's ``flash_attn_varlen_func`` when importable, else ``None``."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # pragma: no cover - flash-attn is never installed on CPU machines
        return None
    return flash_attn_varlen_func


def varlen_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: list[int],
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention within each sequence ``[cu_seqlens[r], cu_seqlens[r+1])`` of one packed
    row. ``query`` [1, Hq, N, D], ``key``/``value`` [1, Hkv, N, D] -> [1, Hq, N, D]."""
    gqa = query.shape[1] != key.shape[1]
    lens = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    if cu_seqlens[0] != 0 or any(n < 0 for n in lens):
        raise ValueError("cu_seq_lens_q: offsets must start at 0 and never decrease")
    # split (one backward: a single cat of the pieces' gradients), not slicing (each slice's
    # backward writes a full-size zero gradient: O(R * N) traffic)
    qs, ks, vs = (t.split(lens, dim=2) for t in (query, key, value))
    outs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v, n in zip(qs, ks, vs, lens)
        if n
    ]
    if not outs:
        return query.new_zeros(query.shape[:3] + (value.shape[-1],))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The ``"steppo_varlen"`` attention function (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # not a packed call: exactly sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q: packed attention needs one row, got {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("attention_mask: must be None with cu_seq_lens_q (packed attention)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding_window: not supported by steppo_varlen attention")
    if dropout and module.training:
        raise ValueError("dropout: attention dropout is not supported by steppo_varlen")
    n = query.shape[2]
    if int(cu[-1]) != n:
        raise ValueError(f"cu_seq_lens_q: ends at {int(cu[-1])}, but the row has {n} tokens")
    half = query.dtype in (torch.float16, torch.bfloat16)  # flash-attn has no fp32 kernel
    flash = _flash_varlen() if query.is_cuda and half else None
    if flash is not None:  # pragma: no cover - needs a GPU and flash-attn
        max_len = kwargs.get("max_length_q") or int(cu.diff().max())
        cu32 = cu.to(torch.int32)
        out = flash(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu32,
            cu32,
            max_len,
            max_len,
            dropout_p=0.0,
            softmax_scale=scaling,
            causal=True,
        )
        return out[None], None
    out = varlen_sdpa(query, key, value, cu.tolist(), scaling)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """Mask builder of ``"steppo_varlen"``: none during a packed forward, else ``sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    if getattr(_state, "packed", False):
        return None
    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def packed_mask_skipped():
    """While active (one packed forward), ``"steppo_varlen"`` models build no attention mask."""
    before = getattr(_state, "packed", False)
    _state.packed = True
    try:
        yield
    finally:
        _state.packed = before


def register() -> str:
    """Register ``"steppo_varlen"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def enable_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch an sdpa/eager model to ``"steppo_varlen"`` (in place). Models on flash-attention
    keep theirs (it reads the same keyword arguments natively). Returns True when ``model`` can
    take packed ``cu_seq_lens_*`` forwards afterwards."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None and impl.startswith("flash_attention"):
        return True
    if impl == NAME:
        return True
    if impl not in ("sdpa", "eager", None):
        return False
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:  # a bare module holding a config
        config._attn_implementation = NAME
    return True
