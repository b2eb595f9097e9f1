"""The policy (any HF causal LM), the critic, and their forward passes over a StepBatch.

- :func:`build_tokenizer`: ``"tiny"`` -> the shipped word tokenizer; a directory holding
  tokenizer files -> its own tokenizer (:class:`~steppo_fast.envs.hf_tokenizer.HFTokenizer`,
  plain-text framing); a directory without tokenizer files -> the word tokenizer only when the
  model's vocabulary is exactly the word vocabulary (a ``steppo train`` export of a tiny run),
  else a ``ValueError`` naming ``--model``.
- :func:`build_policy`: ``"tiny"`` builds a random-init Qwen2/Llama from a config sized by the
  TrainConfig (vocabulary = the shipped word tokenizer); any other value is a local model
  directory loaded with ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``
  (its vocabulary must have at least ``len(tokenizer)`` rows; no embedding resize). A directory
  written by ``steppo train`` (``runs/<name>/model``, with the tokenizer files when the run used
  one) round-trips exactly.
- :class:`Critic`: a value head ``Linear(H, 1)`` read at ``value_index`` (steps) or at
  ``logit_index`` (tokens, for token-level PPO), on its own backbone (``critic="separate"``,
  a copy of the policy's architecture) or on the policy's hidden states (``"shared"``).
- :func:`hidden_states`: last hidden states [N, H] of every token of a batch. ``"padded"``
  (default on CPU) runs the R sequences as R right-padded rows with a 2-D padding mask: cost
  R * L_max^2 attention. ``"packed"`` is :func:`steppo_fast.trainer.modeling.packed_forward`
  (one row, ``position_ids`` restarting per sequence, ``use_cache=False``) with the
  ``"steppo_varlen"`` attention (:mod:`steppo_fast.trainer.varlen_attention`: flash-attn's
  varlen kernel on CUDA when installed, causal SDPA per sequence otherwise; no [N, N] mask).
  Before it, transformers' packed mask made this N^2: 130 s vs 2.6 s padded for 64 x 400
  tokens; now about what padded costs (``bench/bench_packed_forward.py``).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..envs.hf_tokenizer import TOKENIZER_FILES, HFTokenizer, has_tokenizer
from ..envs.tokenizer import WordTokenizer, default_tokenizer
from .config import TrainConfig
from .modeling import backbone

FORWARD_MODES = ("padded", "packed")


def tiny_config(cfg: TrainConfig, tokenizer: WordTokenizer):
    """A transformers config for a small random-init decoder over the word vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    kind = {"qwen2": Qwen2Config, "llama": LlamaConfig}[cfg.arch]
    config = kind(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.end_id,
    )
    config._attn_implementation = "sdpa"
    return config


def build_tokenizer(cfg: TrainConfig) -> WordTokenizer | HFTokenizer:
    """The tokenizer that drives ``cfg.model`` (see the module docstring for the rule)."""
    if cfg.model == "tiny":
        return default_tokenizer()
    if not os.path.isdir(cfg.model):
        raise ValueError(f"--model: {cfg.model!r} is neither 'tiny' nor a local model directory")
    if has_tokenizer(cfg.model):
        return HFTokenizer.from_pretrained(cfg.model)
    from transformers import AutoConfig

    words = default_tokenizer()
    try:
        rows = AutoConfig.from_pretrained(cfg.model, local_files_only=True).vocab_size
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: cannot load {cfg.model!r} ({str(e).splitlines()[0]})") from None
    if rows != len(words):
        raise ValueError(
            f"--model: {cfg.model!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and "
            f"its vocabulary ({rows} rows) is not the {len(words)}-word vocabulary of "
            "'steppo train' models; save the model's tokenizer beside it"
        )
    return words


def build_policy(cfg: TrainConfig, tokenizer: WordTokenizer | HFTokenizer) -> nn.Module:
    """The policy LM (random init for ``"tiny"``, else loaded from a local directory)."""
    from transformers import AutoModelForCausalLM

    if cfg.model == "tiny":
        return AutoModelForCausalLM.from_config(
            tiny_config(cfg, tokenizer), attn_implementation="sdpa"
        )
    if not os.path.isdir(cfg.model):
        raise ValueError(f"--model: {cfg.model!r} is neither 'tiny' nor a local model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: cannot load {cfg.model!r} ({str(e).splitlines()[0]})") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"--model: the model's vocabulary has {rows} rows < the tokenizer's {len(tokenizer)}"
        )
    return model


class Critic(nn.Module):
    """V(s) = head(h) with h from its own backbone or (shared) the policy's hidden states."""

    def __init__(self, policy: nn.Module, shared: bool):
        super().__init__()
        body = backbone(policy)
        self.backbone = None if shared else copy.deepcopy(body)
        # on the policy's device (a critic built beside a policy already on a GPU stays there)
        device = next(body.parameters()).device
        self.head = nn.Linear(body.config.hidden_size, 1, device=device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def shared(self) -> bool:
        return self.backbone is None

    def values(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[len(index)] fp32 values from hidden states [N, H] at token positions ``index``
        (fp32 even under a bf16 autocast: the head reads ``hidden.float()``)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden[index].float()).squeeze(-1)


def hidden_states(
    model: nn.Module, batch, mode: str = "padded", bucket_tokens: int | None = 8192
) -> torch.Tensor:
    """Last hidden states [N, H] (after the final norm) of every token of ``batch``.

    ``"padded"``: sequences sorted by length (longest first) are cut into buckets of at most
    ``bucket_tokens`` padded tokens (rows x longest row; a longer sequence gets a bucket of its
    own; ``None``: one bucket, i.e. exactly one forward per call, as FSDP's lock-step
    collectives need); each bucket is one right-padded forward with a 2-D padding mask, so padding
    waste stays small even in the rows layout. Each sequence is computed exactly as if alone (tested
    against per-sequence forwards). ``"packed"``:
    :func:`steppo_fast.trainer.modeling.packed_forward`."""
    if mode == "packed":
        from .modeling import packed_forward

        return packed_forward(model, batch)
    if mode != "padded":
        raise ValueError(f"forward mode: {mode!r} is not one of {FORWARD_MODES}")
    body = backbone(model)
    if batch.num_tokens == 0:
        param = next(body.parameters())
        return torch.zeros(0, body.config.hidden_size, dtype=param.dtype, device=param.device)
    lens = batch.seqlens.tolist()
    starts = batch.cu_seqlens[:-1].tolist()
    order = sorted(range(len(lens)), key=lambda r: -lens[r])
    outs, where = [], []
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (
            bucket_tokens is None or (j - i + 1) * lens[order[i]] <= bucket_tokens
        ):
            j += 1
        seqs = order[i:j]
        hidden, index = _padded_bucket(
            body, batch.input_ids, [starts[r] for r in seqs], [lens[r] for r in seqs]
        )
        outs.append(hidden)
        where.append(index)
        i = j
    inverse = torch.argsort(torch.cat(where))
    return torch.cat(outs)[inverse]


def _padded_bucket(body, input_ids, starts, lens):
    """One right-padded forward of the sequences ``input_ids[s : s + n]``; returns their hidden
    states (concatenated in the given order) and their token positions in ``input_ids``.
    Everything is built on ``input_ids.device`` from the host lists ``starts`` / ``lens`` (no
    device -> host read)."""
    device = input_ids.device
    total = sum(lens)
    lens_t = torch.tensor(lens, device=device)
    rows = torch.repeat_interleave(
        torch.arange(len(lens), device=device), lens_t, output_size=total
    )
    offsets = torch.cumsum(lens_t, 0) - lens_t
    cols = torch.arange(total, device=device) - offsets[rows]
    index = torch.tensor(starts, device=device)[rows] + cols
    shape = (len(lens), max(lens))
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    ids[rows, cols] = input_ids[index]
    mask = torch.zeros(shape, dtype=torch.long, device=device)
    mask[rows, cols] = 1
    positions = torch.arange(shape[1], device=device).expand(shape)
    out = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[rows, cols], index
