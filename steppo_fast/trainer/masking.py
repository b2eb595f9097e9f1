"""Constrained decoding masks and the log-probs taken under them.

With a grammar, the sampler draws each action token from the policy renormalised over the
tokens the grammar allows next::

    logp(a_i) = log_softmax(where(mask_i, z_i / T, -inf))[a_i],   z_i = W h_i (+ b)

and every log-prob used in training (current, old, reference) is taken under the *same*
``mask_i``; otherwise ``logp - old_logp`` mixes two different distributions and the importance
ratios are wrong. Two representations of the per-action-token allowed sets:

- **dense** (the word tokenizer, :class:`GrammarMasks`): ``[A, V]`` bool, one row per action
  token, applied as ``-inf`` on the full logits. Cheap for the 63-word vocabulary only.
- **sparse** (a model's own tokenizer, :class:`TokenGrammar` -> :class:`SparseMasks`): each
  action token stores the index of its allowed *set* (one set per grammar token prefix, a few
  dozen sets of a few token ids each), so memory is ``8 A`` bytes plus the tiny set table,
  never ``A x V`` (a real vocabulary has ~150k tokens). The log-probs gather only the ``U``
  weight rows of the union of allowed ids: ``z = h @ W[u].T`` ([A, U]) and
  ``logp = z[a] - logsumexp(z[allowed])``; nothing ``[A, V]`` is built.

:func:`masked_logprobs` takes either. Unmasked log-probs (no grammar) go through
:func:`steppo_fast.linear_logprobs`, which never materialises ``[A, V]``.

Devices: :class:`GrammarMasks` and :class:`TokenGrammar` build their allowed rows / sets on the
``device`` they are given (the model's), once per grammar prefix, so the sampler stacks or
gathers them without host-to-device copies; :class:`SparseMasks` keeps its three tensors on one
device (:meth:`SparseMasks.to`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..envs.grammar import Grammar
from ..envs.tokenizer import WordTokenizer


class GrammarMasks:
    """Dense token-level view of a word grammar: ``allowed(prefix_ids)`` -> ``[V]`` bool row.

    Rows are built once per grammar prefix and shared (the same tensor object for every action
    token with that prefix), so storing a row per action token costs a reference, not ``V``
    bytes, until the batch is stacked."""

    sparse = False

    def __init__(self, grammar: Grammar, tokenizer: WordTokenizer, device=None):
        self.grammar, self.tokenizer = grammar, tokenizer
        self.device = torch.device("cpu") if device is None else torch.device(device)
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
                row = torch.zeros(len(self.tokenizer), dtype=torch.bool, device=self.device)
                ids = [self.tokenizer.ids[w] for w in words]
                row[torch.tensor(ids, dtype=torch.long, device=self.device)] = True
            else:
                row = None
            self._rows[prefix_ids] = row
        return row


class SparseMasks:
    """Allowed-token sets of ``A`` action tokens, stored sparsely.

    Attributes:
        set_index: [A] int64, the allowed set of each action token.
        set_ptr: [S + 1] int64 CSR offsets of the ``S`` sets into ``set_ids``.
        set_ids: [nnz] int64, each set's allowed token ids (sorted within a set).

    ``masks[index]`` (an int tensor or list of action indices) selects action tokens (sharing
    the set table), as the trainer does for mini-batches. All three tensors live on one
    device."""

    def __init__(self, set_index: torch.Tensor, set_ptr: torch.Tensor, set_ids: torch.Tensor):
        self.set_index, self.set_ptr, self.set_ids = set_index, set_ptr, set_ids

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], device=None) -> SparseMasks:
        """Build from one allowed-id tensor per action token; rows that are the same tensor
        object (one per grammar prefix) share one set. The result lives on ``device`` (default:
        the rows' device; the CPU when there are no rows)."""
        if device is None:
            device = rows[0].device if len(rows) else torch.device("cpu")
        slot: dict[int, int] = {}
        sets: list[torch.Tensor] = []
        index = []
        for row in rows:
            k = slot.get(id(row))
            if k is None:
                k = slot[id(row)] = len(sets)
                sets.append(row)
            index.append(k)
        sizes = torch.tensor([0] + [len(r) for r in sets], dtype=torch.long, device=device)
        ids = (
            torch.cat(sets).long().to(device)
            if sets
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        return cls(torch.tensor(index, dtype=torch.long, device=device), sizes.cumsum(0), ids)

    @property
    def device(self) -> torch.device:
        return self.set_index.device

    def to(self, device) -> SparseMasks:
        """A copy on ``device``."""
        return SparseMasks(*(t.to(device) for t in (self.set_index, self.set_ptr, self.set_ids)))

    def __len__(self) -> int:
        return int(self.set_index.numel())

    def __getitem__(self, index) -> SparseMasks:
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return SparseMasks(self.set_index[index], self.set_ptr, self.set_ids)

    def row(self, i: int) -> torch.Tensor:
        """Allowed token ids of action token ``i``."""
        k = int(self.set_index[i])
        return self.set_ids[self.set_ptr[k] : self.set_ptr[k + 1]]

    def union_and_membership(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [U] sorted union of allowed ids, allowed [A, U] bool)``."""
        u, where = torch.unique(self.set_ids, return_inverse=True)
        n_sets = self.set_ptr.numel() - 1
        sizes = self.set_ptr[1:] - self.set_ptr[:-1]
        table = torch.zeros(n_sets, u.numel(), dtype=torch.bool, device=self.device)
        set_of = torch.repeat_interleave(
            torch.arange(n_sets, device=self.device), sizes, output_size=self.set_ids.numel()
        )
        table[set_of, where] = True
        return u, table[self.set_index]

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """``[A, V]`` bool (for tests and small vocabularies)."""
        u, allowed = self.union_and_membership()
        dense = torch.zeros(len(self), vocab_size, dtype=torch.bool, device=self.device)
        dense[:, u] = allowed
        return dense

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.set_index, self.set_ptr, self.set_ids)
        )


class TokenGrammar:
    """A word grammar compiled to a token trie over a model tokenizer (sparse allowed sets).

    Every complete action ``w_1 ... w_k`` becomes ``tokenizer.action_ids("w_1 ... w_k")`` (its
    text after a space, then the end-of-action token). As the end token occurs only last, the
    token sequences are prefix-free even when the tokenizer merges across words. ``allowed``
    returns the *same* sorted id tensor for every query of one prefix (so
    :meth:`SparseMasks.from_rows` stores each set once).

    Raises ``ValueError`` when two actions encode to the same tokens, an action's tokens hold
    the end token, or an action does not decode back to its text (the env would misread it)."""

    sparse = True

    def __init__(self, grammar: Grammar, tokenizer, device=None):
        self.grammar, self.tokenizer = grammar, tokenizer
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.actions: dict[tuple[int, ...], str] = {}
        nexts: dict[tuple[int, ...], set[int]] = {}
        for words in grammar.actions():
            text = " ".join(words)
            ids = tuple(tokenizer.action_ids(text))
            if tokenizer.end_id in ids[:-1]:
                raise ValueError(f"grammar: action {text!r} encodes the end-of-action token")
            if ids in self.actions:
                raise ValueError(
                    f"grammar: actions {self.actions[ids]!r} and {text!r} encode to the same tokens"
                )
            if tokenizer.action_text(ids) != text:
                raise ValueError(
                    f"grammar: action {text!r} decodes as {tokenizer.action_text(ids)!r}"
                )
            self.actions[ids] = text
            for k in range(len(ids)):
                nexts.setdefault(ids[:k], set()).add(ids[k])
        self._allowed = {
            p: torch.tensor(sorted(s), dtype=torch.long, device=self.device)
            for p, s in nexts.items()
        }
        self.max_len = max(len(a) for a in self.actions)

    def allowed(self, prefix_ids: tuple[int, ...]) -> torch.Tensor | None:
        """Sorted int64 ids allowed after ``prefix_ids``; ``None`` once the action is complete."""
        if prefix_ids in self.actions:
            return None
        try:
            return self._allowed[prefix_ids]
        except KeyError:
            raise ValueError(f"prefix: tokens {list(prefix_ids)} start no action") from None


def make_grammar_masks(grammar: Grammar, tokenizer, device=None) -> GrammarMasks | TokenGrammar:
    """Dense :class:`GrammarMasks` for the word tokenizer, sparse :class:`TokenGrammar` for a
    model tokenizer (one with ``action_ids``); rows / sets on ``device`` (default CPU)."""
    if isinstance(tokenizer, WordTokenizer):
        return GrammarMasks(grammar, tokenizer, device)
    return TokenGrammar(grammar, tokenizer, device)


def sample_from_allowed(
    logits: torch.Tensor,
    allowed: Sequence[torch.Tensor],
    *,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_from_logits` with sparse allowed sets: row ``b`` of ``logits`` [B, V]
    draws among the ids ``allowed[b]`` only (gathered, padded with ``-inf``); the sets must be
    on the logits' device."""
    device = logits.device
    idx = torch.nn.utils.rnn.pad_sequence(list(allowed), batch_first=True)  # [B, K]
    sizes = torch.tensor([len(a) for a in allowed], device=device)
    valid = torch.arange(idx.shape[1], device=device)[None, :] < sizes[:, None]
    z = (logits.float().gather(1, idx) / temperature).masked_fill(~valid, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    if greedy:
        k = logp_all.argmax(dim=-1)
    else:
        k = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
    return idx.gather(1, k[:, None]).squeeze(1), logp_all.gather(1, k[:, None]).squeeze(1)


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
    mask: torch.Tensor | SparseMasks,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of ``targets`` under the grammar-masked policy.

    Args:
        hidden: [M, H] hidden states that predict the targets (any float dtype).
        weight: [V, H] output embedding; bias: optional [V].
        targets: [M] int64 token ids (each must be allowed by its mask row).
        mask: [M, V] bool, True = allowed (materialises ``[M, V]``: small vocabularies); or
            a :class:`SparseMasks` of M rows (only the ``U`` rows of ``weight`` in the union
            of allowed ids are read: ``[M, U]``; every target must be allowed).
        temperature: > 0, the sampler's temperature.

    Returns:
        ``(logp [M], entropy [M])`` in fp32 (fp64 for fp64 inputs); differentiable w.r.t.
        ``hidden``, ``weight``, ``bias``.

    Equivalent to::

        z = (hidden @ weight.T + bias) / temperature
        logp_all = log_softmax(z.masked_fill(~mask, -inf), -1)
        logp = logp_all.gather(1, targets[:, None])[:, 0]
    """
    if isinstance(mask, SparseMasks):
        return _sparse_masked_logprobs(hidden, weight, targets, mask, bias, temperature)
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


def _sparse_masked_logprobs(hidden, weight, targets, masks, bias, temperature):
    """:func:`masked_logprobs` over the union ``u`` of allowed ids: ``[M, U]``, not ``[M, V]``."""
    if len(masks) != targets.numel():
        raise ValueError(f"mask: {len(masks)} rows for {targets.numel()} targets")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    u, allowed = masks.union_and_membership()  # [U], [M, U]
    col = torch.searchsorted(u, targets).clamp(max=max(u.numel() - 1, 0))
    rows = torch.arange(targets.numel(), device=targets.device)
    if targets.numel() and not bool((allowed[rows, col] & (u[col] == targets)).all()):
        bad = int((~(allowed[rows, col] & (u[col] == targets))).nonzero()[0, 0])
        raise ValueError(f"targets[{bad}]: token {int(targets[bad])} is not allowed by its mask")
    z = hidden.to(dtype) @ weight[u].to(dtype).T
    if bias is not None:
        z = z + bias[u].to(dtype)
    z = (z / temperature).masked_fill(~allowed, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, col[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all.masked_fill(~allowed, 0.0)).sum(-1)
    return logp, entropy
