"""Constrained decoding masks and the log-probs taken under them.

With a grammar, the sampler draws each action token from the policy renormalised over the
tokens the grammar allows next::

    logp(a_i) = log_softmax(where(mask_i, z_i / T, -inf))[a_i],   z_i = W h_i (+ b)

and every log-prob used in training (current, old, reference) is taken under the *same*
``mask_i``; otherwise ``logp - old_logp`` mixes two different distributions and the importance
ratios are wrong. The rollout stores ``mask_i`` per action token (``[A, V]`` bool), which is
cheap for the small vocabularies grammars are meant for (``A * V`` bytes), and
:func:`masked_logprobs` applies it as ``-inf`` on the logits. Unmasked log-probs (no grammar) go
through :func:`steppo_fast.linear_logprobs`, which never materialises ``[A, V]``.
"""

from __future__ import annotations

import torch

from ..envs.grammar import Grammar
from ..envs.tokenizer import WordTokenizer


class GrammarMasks:
    """Token-level view of a word grammar: ``allowed(prefix_ids)`` -> ``[V]`` bool row.

    Rows are built once per grammar prefix and shared (the same tensor object for every action
    token with that prefix), so storing a row per action token costs a reference, not ``V``
    bytes, until the batch is stacked."""

    def __init__(self, grammar: Grammar, tokenizer: WordTokenizer):
        self.grammar, self.tokenizer = grammar, tokenizer
        self._rows: dict[tuple[int, ...], torch.Tensor | None] = {}
        missing = [w for w in grammar.words if w not in tokenizer.ids]
        if missing:
            raise ValueError(f"grammar: words {missing} are not in the tokenizer's vocabulary")

    def allowed(self, prefix_ids: tuple[int, ...]) -> torch.Tensor | None:
        """``[V]`` bool of the tokens allowed after ``prefix_ids``; ``None`` when the action is
        complete."""
        row = self._rows.get(prefix_ids, False)
        if row is False:
            words = self.grammar.allowed_next([self.tokenizer.words[i] for i in prefix_ids])
            if words:
                row = torch.zeros(len(self.tokenizer), dtype=torch.bool)
                row[[self.tokenizer.ids[w] for w in words]] = True
            else:
                row = None
            self._rows[prefix_ids] = row
        return row


def sample_from_logits(
    logits: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` [B, V] under ``mask`` [B, V] (or no mask).

    Returns ``(tokens [B] int64, logp [B] fp32)`` with ``logp`` the log-prob of the drawn token
    under the same masked, temperature-scaled distribution that training recomputes."""
    z = logits.float() / temperature
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    if greedy:
        tokens = logp_all.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
    return tokens, logp_all.gather(1, tokens[:, None]).squeeze(1)


def masked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of ``targets`` under the grammar-masked policy.

    Args:
        hidden: [M, H] hidden states that predict the targets (any float dtype).
        weight: [V, H] output embedding; bias: optional [V].
        targets: [M] int64 token ids (each must be allowed by its mask row).
        mask: [M, V] bool, True = allowed.
        temperature: > 0, the sampler's temperature.

    Returns:
        ``(logp [M], entropy [M])`` in fp32 (fp64 for fp64 inputs); differentiable w.r.t.
        ``hidden``, ``weight``, ``bias``. Materialises ``[M, V]`` (small action vocabularies).

    Equivalent to::

        z = (hidden @ weight.T + bias) / temperature
        logp_all = log_softmax(z.masked_fill(~mask, -inf), -1)
        logp = logp_all.gather(1, targets[:, None])[:, 0]
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = (z / temperature).masked_fill(~mask, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    probs = logp_all.exp()
    # entropy = -sum p log p over allowed tokens (masked entries have p = 0 and would give nan)
    entropy = -(probs * logp_all.masked_fill(~mask, 0.0)).sum(-1)
    return logp, entropy
