"""Batched multi-turn rollouts with a KV cache, recording what training needs.

All episodes of a call advance together, one environment step at a time:

1. *prefill*: every live episode feeds the context tokens not yet in the cache (the previous
   action's last token, then ``<obs> observation <act>``), right-padded to a common chunk
   length; the logits at each row's last real token give the first action token's distribution;
2. *decode*: each row draws action tokens one at a time (masked by the grammar when the env has
   one), feeding each drawn token back, until its action is complete (grammar) or it drew
   ``<end>`` / hit ``max_action_tokens`` (no grammar); rows with nothing new to feed get a
   masked pad column;
3. the action text goes to the env; finished episodes leave the batch (their cache rows are
   dropped with ``DynamicCache.batch_select_indices``).

The cache is a transformers ``DynamicCache`` handed to the model under the name its
``forward`` declares: ``cache`` (recent 5.x releases such as 5.25, where ``past_key_values``
is deprecated until its removal in 5.40) or ``past_key_values`` (earlier releases such as 5.10,
which silently ignore a ``cache=`` argument), so no release warns or decodes without its cache.
A wrapper whose ``forward`` only takes ``**kwargs`` gets ``past_key_values`` (works everywhere
before 5.40, with the deprecation warning on new releases).

Rows share one cache whose columns hold each row's real tokens plus pad columns; a 2-D
``attention_mask`` (1 = real token) hides the pads and explicit ``position_ids`` count real
tokens only, so each row computes exactly what it would alone (tested against the packed
training forward).

Token format of one episode (also the StepBatch merged sequence), with the word tokenizer::

    <bos> <obs> o_0 ... <act> a_0 ... <obs> o_1 ... <act> a_1 ...

and with a model's own tokenizer (:mod:`steppo_fast.envs.hf_tokenizer`, plain text)::

    [bos] "Observation: o_0\nAction:" " a_0" <end> "Observation: o_1\nAction:" ...

``value_index`` of step t is its last prompt token (``<act>``, or the last token of
"\nAction:"). Each step record is ``{"prompt_ids", "action_ids", "reward", "logprobs",
"anchor"}`` (docs/design.md §2); trajectories are ``{"steps", "terminated", "group"}`` plus
``success`` / ``return`` / ``seed`` for logging. The grammar masks of every action token, in
StepBatch action order, are returned separately: dense ``[A, V]`` bool with the word
tokenizer, :class:`~.masking.SparseMasks` with a model tokenizer.

Devices: every tensor fed to the model, the sampler's logits and masks, and the returned masks
live on the model's device (``generator`` must be a generator of that device). Each feed's
ids / mask / positions are staged on the host (they come from Python lists) and copied to the
device once per forward; the drawn tokens and their log-probs are read back once per decode
step for the whole batch (the environment and the records need them as Python numbers), never
per row or per token.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..envs.base import (
    Env,
    checked_max_steps,
    checked_reset,
    checked_state_key,
    checked_step,
    env_name,
)
from ..envs.tokenizer import WordTokenizer
from .masking import SparseMasks, make_grammar_masks, sample_from_allowed, sample_from_logits


@dataclass
class _Row:
    """One live episode."""

    env: Env
    seed: int
    group: int
    context: list[int]  # every token so far (prompt + actions + observations)
    n_cached: int = 0  # how many context tokens are in the KV cache
    steps: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)  # [V] bool / allowed ids per token
    action: list[int] = field(default_factory=list)  # the action being decoded
    action_logp: list[float] = field(default_factory=list)
    action_masks: list[torch.Tensor] = field(default_factory=list)
    done_acting: bool = False
    total_reward: float = 0.0
    terminated: bool = False
    success: bool = False


@dataclass
class RolloutResult:
    trajectories: list[dict]  # StepBatch.from_trajectories records (+ success/return/seed)
    # [A, V] bool (word tokenizer) or SparseMasks (model tokenizer) in StepBatch action order;
    # None without grammar
    masks: torch.Tensor | SparseMasks | None
    generated_tokens: int  # action tokens drawn
    forward_calls: int


def observation_ids(tokenizer, text: str, previous_action: list[int] | None = None) -> list[int]:
    """The tokens appended to the context for one observation: ``<obs> text <act>`` (word
    tokenizer) or the model tokenizer's framing (:meth:`HFTokenizer.observation_ids`)."""
    if isinstance(tokenizer, WordTokenizer):
        return [tokenizer.obs_id, *tokenizer.encode(text), tokenizer.act_id]
    return tokenizer.observation_ids(text, previous_action)


def prompt_ids(tokenizer, first_observation: str) -> list[int]:
    """The first context of an episode: ``<bos>`` + the framed first observation."""
    if isinstance(tokenizer, WordTokenizer):
        return [tokenizer.bos_id, *observation_ids(tokenizer, first_observation)]
    return tokenizer.prompt_ids(first_observation)


def action_text(tokenizer, ids: list[int]) -> str:
    """The text the env receives for drawn action tokens (end-of-action tokens dropped)."""
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.decode([w for w in ids if w != tokenizer.end_id])
    return tokenizer.action_text(ids)


def cache_keyword(model) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``"cache"`` where it
    declares one (transformers renamed ``past_key_values``, deprecated until its removal in
    5.40), else ``"past_key_values"`` (older releases, or a forward that only takes
    ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class _Cache:
    """KV cache + padding mask over the live rows."""

    def __init__(self, model, pad_id: int, device: torch.device):
        from transformers import DynamicCache

        self.model, self.pad_id, self.device = model, pad_id, device
        self.kv = DynamicCache(config=model.config)
        self.kv_keyword = cache_keyword(model)
        self.mask = None  # [B, L] long on the device, 1 = real token
        self.calls = 0

    def feed(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Feed each row's uncached context tokens; return logits [B, V] at each row's last
        real token (rows with nothing to feed get a pad column and garbage logits)."""
        chunks = [r.context[r.n_cached :] for r in rows]
        width = max(len(c) for c in chunks)
        # staged from Python lists on the CPU, then copied to the device (one copy each)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # host: staged
        real = torch.zeros((len(rows), width), dtype=torch.long)  # host: staged
        pos = torch.zeros((len(rows), width), dtype=torch.long)  # host: staged
        last = torch.zeros(len(rows), dtype=torch.long)  # host: staged
        for i, (row, chunk) in enumerate(zip(rows, chunks)):
            n = len(chunk)
            if n:
                ids[i, :n] = torch.tensor(chunk)  # host: staged
                real[i, :n] = 1
                pos[i, :n] = torch.arange(row.n_cached, row.n_cached + n)  # host: staged
                last[i] = n - 1
            pos[i, n:] = max(row.n_cached + n - 1, 0)  # pads: any position, they are masked
            row.n_cached += n
        # logits only at the columns read below (<= B of them), never [B, width, V]
        keep = torch.unique(last)  # host: sorted
        col = torch.searchsorted(keep, last)  # host
        ids, real, pos, keep, col = (t.to(self.device) for t in (ids, real, pos, keep, col))
        self.mask = real if self.mask is None else torch.cat([self.mask, real], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=pos,
            use_cache=True,
            **{self.kv_keyword: self.kv},
            logits_to_keep=keep,
        )
        self.calls += 1
        return out.logits[torch.arange(len(rows), device=self.device), col]

    def keep(self, index: list[int]) -> None:
        """Keep only the rows in ``index`` (finished episodes leave)."""
        idx = torch.tensor(index, dtype=torch.long, device=self.device)
        self.kv.batch_select_indices(idx)
        self.mask = self.mask[idx]


@torch.no_grad()
def rollout(
    model,
    tokenizer,
    make_env: Callable[[], Env],
    seeds: Sequence[int],
    groups: Sequence[int],
    *,
    use_grammar: bool = True,
    temperature: float = 1.0,
    greedy: bool = False,
    max_action_tokens: int = 6,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RolloutResult:
    """Play one episode per ``seeds[i]`` (task group ``groups[i]``) with ``model`` sampling.

    Args:
        model: an HF causal LM over ``tokenizer``'s ids (put in eval mode by the caller).
        tokenizer: the word tokenizer or an :class:`~steppo_fast.envs.hf_tokenizer.HFTokenizer`.
        make_env: builds a fresh environment (one per episode).
        use_grammar: mask sampling with the env's grammar (if it declares one).
        temperature, greedy: sampling temperature / argmax decoding.
        max_action_tokens: cap on free-form actions (no grammar); ``<end>`` ends them earlier.
        generator: the torch RNG for sampling, on the model's device (saved in checkpoints for
            exact resumption).
        on_step: called with the number of episodes that finished at each env step (progress).
    """
    rows: list[_Row] = []
    for seed, group in zip(seeds, groups):
        env = make_env()
        checked_max_steps(env)
        first = checked_reset(env, int(seed))
        rows.append(_Row(env, int(seed), int(group), prompt_ids(tokenizer, first)))
    device = next(model.parameters()).device
    grammar_masks = None
    if use_grammar and rows and rows[0].env.grammar is not None:
        grammar_masks = make_grammar_masks(rows[0].env.grammar, tokenizer, device=device)
    full = None  # dense grammar: the all-allowed row of rows whose action is complete
    if grammar_masks is not None and not grammar_masks.sparse:
        full = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    finished: list[_Row] = []
    cut_short = False  # an episode the env did not end within its max_steps
    cache = _Cache(model, tokenizer.pad_id, device)
    generated = 0
    live = list(rows)
    while live:
        # ---- decode one action per live row
        for r in live:
            r.action, r.action_logp, r.action_masks, r.done_acting = [], [], [], False
        logits = cache.feed(live)
        while True:
            mask_rows = None
            if grammar_masks is None:
                tokens, logps = sample_from_logits(
                    logits, None, temperature=temperature, greedy=greedy, generator=generator
                )
            elif grammar_masks.sparse:
                mask_rows = [grammar_masks.allowed(tuple(r.action)) for r in live]
                # rows whose action is complete draw from any set; their draw is ignored
                anyset = next(m for m in mask_rows if m is not None)
                tokens, logps = sample_from_allowed(
                    logits,
                    [m if m is not None else anyset for m in mask_rows],
                    temperature=temperature,
                    greedy=greedy,
                    generator=generator,
                )
            else:
                mask_rows = [grammar_masks.allowed(tuple(r.action)) for r in live]
                mask = torch.stack([m if m is not None else full for m in mask_rows])
                tokens, logps = sample_from_logits(
                    logits, mask, temperature=temperature, greedy=greedy, generator=generator
                )
            # one device -> host read per decode step for the whole batch (exact: int64 ids
            # < 2**53 and fp32 log-probs are representable in fp64)
            drawn_tokens, drawn_logps = torch.stack((tokens.double(), logps.double())).tolist()
            for i, r in enumerate(live):
                if r.done_acting:
                    continue
                tok = int(drawn_tokens[i])
                r.action.append(tok)
                r.action_logp.append(drawn_logps[i])
                if mask_rows is not None:
                    r.action_masks.append(mask_rows[i])
                r.context.append(tok)
                generated += 1
                if grammar_masks is not None:
                    r.done_acting = grammar_masks.allowed(tuple(r.action)) is None
                else:
                    r.done_acting = tok == tokenizer.end_id or len(r.action) >= max_action_tokens
            if all(r.done_acting for r in live):
                break
            # rows feed their newest token (a row whose action just completed feeds its last
            # token now; rows with nothing new feed a masked pad column)
            logits = cache.feed(live)
        # ---- environment step
        still: list[int] = []
        n_done = 0
        for i, r in enumerate(live):
            prompt = r.context[: len(r.context) - len(r.action)]
            where = dict(seed=r.seed, step=len(r.steps))
            anchor_key = checked_state_key(r.env, **where)
            text = action_text(tokenizer, r.action)
            obs, reward, terminated, truncated, info = checked_step(r.env, text, **where)
            if not (terminated or truncated) and len(r.steps) + 1 >= r.env.max_steps:
                truncated = cut_short = True  # the env did not end it: never hang
            r.total_reward += float(reward)
            r.steps.append(
                {
                    "prompt_ids": prompt,
                    "action_ids": list(r.action),
                    "reward": float(reward),
                    "logprobs": list(r.action_logp),
                    "anchor_key": anchor_key,
                }
            )
            r.masks.extend(r.action_masks)
            if terminated or truncated:
                r.terminated, r.success = bool(terminated), bool(info.get("success", False))
                finished.append(r)
                n_done += 1
            else:
                r.context.extend(observation_ids(tokenizer, obs, r.action))
                still.append(i)
        if on_step is not None:
            on_step(n_done)
        if len(still) < len(live):
            if still:
                cache.keep(still)
            live = [live[i] for i in still]
    if cut_short:
        warnings.warn(
            f"env {env_name(rows[0].env)!r} did not end every episode within its max_steps "
            f"({rows[0].env.max_steps}); they were cut there (truncated)",
            stacklevel=2,
        )
    masks_kind = None if grammar_masks is None else ("sparse" if grammar_masks.sparse else "dense")
    return _collect(rows, masks_kind, generated, cache.calls, device)


def _collect(
    rows: list[_Row], masks_kind: str | None, generated: int, calls: int, device: torch.device
) -> RolloutResult:
    """Trajectory records in input order, anchors as ints, masks stacked in action order (on
    ``device``, where the grammar's rows already are)."""
    anchor_ids: dict[str, int] = {}
    trajectories, masks = [], []
    for r in rows:
        for step in r.steps:
            step["anchor"] = anchor_ids.setdefault(step.pop("anchor_key"), len(anchor_ids))
        trajectories.append(
            {
                "steps": r.steps,
                "terminated": r.terminated,
                "group": r.group,
                "success": r.success,
                "return": r.total_reward,
                "seed": r.seed,
            }
        )
        masks.extend(r.masks)
    if masks_kind == "sparse":
        stacked = SparseMasks.from_rows(masks, device=device)
    else:
        stacked = torch.stack(masks) if masks_kind == "dense" and masks else None
    return RolloutResult(trajectories, stacked, generated, calls)
