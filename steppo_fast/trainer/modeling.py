"""Running a Hugging Face causal LM on a packed :class:`~steppo_fast.StepBatch`.

All R sequences go through the model as **one row** of N tokens; what keeps them apart:

- ``attention="varlen"`` (default): the sequence offsets ``cu_seqlens`` reach the attention
  function (``cu_seq_lens_q/k``, ``max_length_q/k``, the keyword arguments transformers forwards
  to flash-attention); an sdpa/eager model is switched to the ``"steppo_varlen"`` attention of
  :mod:`steppo_fast.trainer.varlen_attention` (flash-attn's varlen kernel on CUDA when
  installed, causal SDPA per sequence otherwise), which builds no [N, N] mask: O(sum_r L_r^2)
  work and O(N) memory. ``position_ids`` restart per sequence (rotary positions) and
  ``use_cache=False``.
- ``attention="position_ids"`` (sdpa / flash-attention / flex): ``position_ids``
  restarting at 0 per sequence, no attention mask and ``use_cache=False``. transformers then
  builds a block-causal mask from the position resets. With the default ``use_cache`` (True
  for most configs) or with a 2-D all-ones ``attention_mask``, transformers silently builds a
  plain causal mask and the sequences attend to each other (tested in
  ``tests/model/test_layouts_model.py``).
- ``attention="block_mask"``: an explicit 4-D additive float mask [1, 1, N, N] (0 = attend,
  dtype min = blocked), built by :func:`block_diagonal_mask`. O(N^2) memory: small batches,
  eager attention and debugging only.

The result is the backbone's last hidden state (after the final norm), [N, H] in the model's
dtype, so that ``hidden[batch.logit_index]`` feeds ``linear_logprobs(…, lm_head.weight,
batch.action_ids)`` and ``hidden[batch.value_index]`` a value head, without materialising
[N, V] logits.
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("varlen", "position_ids", "block_mask")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (``model.base_model``), or ``model`` itself."""
    return getattr(model, "base_model", model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF model: modules whose class is in ``_no_split_modules``
    (e.g. ``Qwen2DecoderLayer``), else the children of ``.layers`` (the units of activation
    checkpointing and of FSDP sharding)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found and hasattr(backbone(model), "layers"):
        found = list(backbone(model).layers)
    return found


def block_diagonal_mask(
    cu_seqlens: torch.Tensor, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Additive block-diagonal causal mask [1, 1, N, N] for one packed row.

    ``mask[0, 0, q, k] = 0`` when tokens q and k are in the same sequence and ``k <= q``, else
    ``torch.finfo(dtype).min``. ``cu_seqlens`` [R+1] int32/int64 sequence offsets; ``dtype``
    must be a float dtype (the model's compute dtype). Memory O(N^2).
    """
    device = cu_seqlens.device if device is None else device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    n = int(cu[-1]) if cu.numel() else 0
    seq_of = torch.repeat_interleave(
        torch.arange(cu.numel() - 1, device=device), cu.diff(), output_size=n
    )
    pos = torch.arange(n, device=device)
    allowed = (seq_of[:, None] == seq_of[None, :]) & (pos[None, :] <= pos[:, None])
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_forward(model: torch.nn.Module, batch, *, attention: str = "varlen"):
    """Hidden states [N, H] of every token of ``batch`` from one packed forward.

    ``model``: a transformers causal LM (``*ForCausalLM``) or its backbone; ``batch``: a
    StepBatch on the model's device. ``attention``: ``"varlen"`` (default; switches an
    sdpa/eager model to ``"steppo_varlen"`` attention in place, see
    :func:`steppo_fast.trainer.varlen_attention.enable_varlen_attention`), ``"position_ids"`` or
    ``"block_mask"`` (see module docstring). Differentiable (train mode works as usual); an
    empty batch gives an empty [0, H] tensor without calling the model.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(
            f"attention: {attention!r} is not one of {', '.join(map(repr, ATTENTION_MODES))}"
        )
    body = backbone(model)
    param = next(body.parameters())
    if batch.num_tokens == 0:
        return torch.zeros(0, body.config.hidden_size, dtype=param.dtype, device=param.device)
    kwargs = {}
    if attention == "varlen":
        from .varlen_attention import enable_varlen_attention, packed_mask_skipped

        if not enable_varlen_attention(body):
            raise ValueError(
                f"attention: 'varlen' needs an sdpa, eager or flash-attention model, got "
                f"{body.config._attn_implementation!r}"
            )
        cu = batch.cu_seqlens
        longest = int(batch.max_seqlen)
        kwargs.update(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest
        )
        with packed_mask_skipped():
            out = body(
                input_ids=batch.input_ids[None],
                position_ids=batch.position_ids[None],
                use_cache=False,
                **kwargs,
            )
        return out.last_hidden_state[0]
    if attention == "block_mask":
        kwargs["attention_mask"] = block_diagonal_mask(batch.cu_seqlens, dtype=param.dtype)
    out = body(
        input_ids=batch.input_ids[None],
        position_ids=batch.position_ids[None],
        use_cache=False,  # with a cache transformers ignores the position resets (leak)
        **kwargs,
    )
    return out.last_hidden_state[0]
