"""Forward passes over a StepBatch and the PPO-style update (epochs x mini-batches x
token-budget micro-batches with global normalizers).

One optimizer step per mini-batch: its micro-batches (``StepBatch.microbatches``, whole
trajectories under a token budget) accumulate gradients of losses that were divided by the
*mini-batch's* normalizer (``loss_normalizer`` summed over its micro-batches), so the
accumulated gradient equals the gradient of the mini-batch loss computed in one piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import linear_logprobs, step_policy_loss, value_loss
from ..ops.loss import loss_normalizer
from .algorithms import Targets, unit_offsets
from .comm import LOCAL, Comm
from .config import TrainConfig
from .masking import masked_logprobs
from .memory import compute_dtype
from .policy import Critic, hidden_states


@dataclass
class Models:
    policy: nn.Module  # HF causal LM
    critic: Critic | None  # None for critic-free algorithms
    reference: nn.Module | None  # frozen initial policy (KL penalty), None when kl_coef == 0
    forward_mode: str = "padded"  # see policy.hidden_states
    impl: str = "auto"  # backend of the steppo_fast ops (auto | torch | triton | cpp)
    bucket_tokens: int | None = 8192  # padded forward buckets (None: one forward per call)


@dataclass
class ForwardOut:
    logp: torch.Tensor  # [A] fp32 (under the grammar mask when given)
    entropy: torch.Tensor  # [A] fp32
    values: torch.Tensor | None  # [S] (step units) or [A] (token units), fp32


def action_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    batch,
    masks: torch.Tensor | None,
    temperature: float,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the batch's action tokens from the model's LM head.

    With grammar ``masks`` [A, V] the distribution is renormalised over the allowed tokens
    (:func:`masked_logprobs`); without, :func:`steppo_fast.linear_logprobs` (fused, exact).
    bf16 hidden states (``--dtype bf16``) meet the LM head cast to bf16 (a differentiable
    copy: the gradient reaches the fp32 weight); both paths accumulate in fp32."""
    head = model.get_output_embeddings()
    h = hidden[batch.logit_index]
    bias = getattr(head, "bias", None)
    weight = head.weight
    if h.dtype == torch.bfloat16 and weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
        bias = None if bias is None else bias.to(h.dtype)
    # the log-prob ops accumulate in fp32 themselves: never under an enclosing bf16 autocast
    with torch.autocast(h.device.type, enabled=False):
        if masks is not None:
            return masked_logprobs(
                h, weight, batch.action_ids, masks, bias=bias, temperature=temperature
            )
        return linear_logprobs(
            h,
            weight,
            batch.action_ids,
            bias=bias,
            temperature=temperature,
            return_entropy=True,
            impl=impl,
        )


def forward(
    models: Models, batch, masks: torch.Tensor | None, temperature: float, value_units: str | None
) -> ForwardOut:
    """Policy log-probs/entropies and (``value_units`` = "step" | "token") critic values."""
    hidden = hidden_states(models.policy, batch, models.forward_mode, models.bucket_tokens)
    logp, entropy = action_logprobs(models.policy, hidden, batch, masks, temperature, models.impl)
    values = None
    if value_units is not None and models.critic is not None:
        critic = models.critic
        if not critic.shared:
            hidden = hidden_states(
                critic.backbone, batch, models.forward_mode, models.bucket_tokens
            )
        index = batch.value_index if value_units == "step" else batch.logit_index
        values = critic.values(hidden, index)
    return ForwardOut(logp.float(), entropy.float(), values)


def reference_logprobs(
    model: nn.Module,
    batch,
    masks: torch.Tensor | None,
    temperature: float,
    mode: str,
    impl: str = "auto",
) -> torch.Tensor:
    """[A] fp32 log-probs of the batch's actions under ``model`` (old or reference policy),
    computed under ``torch.inference_mode()`` through the action-only path; returned as a
    normal tensor (a clone), usable anywhere."""
    with torch.inference_mode():
        hidden = hidden_states(model, batch, mode)
        logp = action_logprobs(model, hidden, batch, masks, temperature, impl)[0].float()
    return logp.clone()


# every stat ppo_update reports (summed over ranks under data parallelism); not the loss's
# steppo_fast._defs.STAT_KEYS, of which it reports clip_frac, approx_kl, ratio_mean
UPDATE_STAT_KEYS = (
    "policy_loss",
    "value_loss",
    "clip_frac",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "grad_norm",
)


def _unit_index(parent, step_index: torch.Tensor, token_units: bool) -> torch.Tensor:
    return parent.actions_of_steps(step_index) if token_units else step_index


def ppo_update(
    cfg: TrainConfig,
    models: Models,
    optimizer: torch.optim.Optimizer,
    batch,
    masks: torch.Tensor | None,
    targets: Targets,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    shuffle: torch.Generator,
    on_step: Callable[[int], None] | None = None,
    comm: Comm = LOCAL,
    traj_ids: torch.Tensor | None = None,
    sharded=None,
    train_policy: bool = True,
) -> dict[str, float]:
    """``cfg.epochs`` passes over ``batch``; each pass splits the trajectories at random into
    ``cfg.minibatches`` mini-batches (one optimizer step each; ``on_step(1)`` after each, for
    progress bars). Returns stats averaged over micro-batches (weighted by their loss weight).
    ``shuffle`` is a CPU generator (it permutes trajectory ids on the host, whatever the device
    of ``batch``, so the mini-batches do not depend on the device).

    ``comm`` (:mod:`steppo_fast.trainer.comm`; default: one process): ``batch`` holds this
    rank's trajectories, ``traj_ids`` [T_local] their ids in the global batch (default: the
    batch is the whole batch, ids ``0..T-1``); the permutation is drawn over the global ids,
    the normalisers, gradients and stats are summed over ranks (identities on one process).

    FSDP (``sharded``, a :class:`steppo_fast.trainer.fsdp.ShardedModels`, with ``comm``): the
    micro-batch forwards run through its sharded module, every rank pads its micro-batches of a
    mini-batch to the largest count over ranks with zero-loss dummy forward/backwards (FSDP's
    collectives must match), and FSDP reduce-scatters the gradients as sums.

    ``train_policy=False`` (critic warm-up, ``--critic-warmup``): only the value loss is
    back-propagated (the policy loss and its stats are still computed and reported); a separate
    critic leaves the policy's gradients ``None``, so AdamW does not touch the policy."""
    value_units = (
        ("token" if targets.token_units else "step") if targets.returns is not None else None
    )
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    critic_params = [] if models.critic is None else list(models.critic.parameters())
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}

    def add(key: str, value: float, weight: float = 1.0) -> None:
        sums[key] = sums.get(key, 0.0) + value * weight
        weights[key] = weights.get(key, 0.0) + weight

    kl_coef = cfg.kl_coef if ref_logp is not None else 0.0
    n_trajs = int(comm.all_reduce_sum([batch.num_trajs])[0])
    n_mini = max(1, min(cfg.minibatches, n_trajs))
    for _ in range(cfg.epochs):
        perm = torch.randperm(n_trajs, generator=shuffle)  # host: permutes trajectory ids
        for chunk in perm.chunk(n_mini):
            chosen = chunk.sort().values
            if traj_ids is not None:  # this rank's trajectories of the chunk
                chosen = torch.isin(traj_ids, chosen).nonzero().squeeze(1)
            mini = batch.select_trajectories(chosen)
            mbs = mini.batch.microbatches(cfg.micro_batch_tokens)
            parts = []
            for mb in mbs:
                steps = mini.step_index[mb.step_index]  # parent step ids of the micro-batch
                cu_u, cu_t = unit_offsets(mb.batch, targets.token_units)
                d = loss_normalizer(cu_u, cu_trajs=cu_t, ratio_level=cfg.ratio_level, agg=cfg.agg)
                parts.append((mb, steps, cu_u, cu_t, d))
            norm = sum(p[4] for p in parts)
            n_values = sum(int(p[2].numel()) - 1 for p in parts)
            n_dummy = 0
            norm, n_values = comm.all_reduce_sum([norm, n_values])
            if sharded is not None:  # lock-step: the same number of forward/backward per rank
                n_dummy = int(comm.all_reduce_max([len(parts)])[0]) - len(parts)
            if norm <= 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            for mb, steps, cu_u, cu_t, d in parts:
                actions = batch.actions_of_steps(steps)
                units = _unit_index(batch, steps, targets.token_units)
                with compute_dtype(cfg.dtype, mb.batch.input_ids.device):
                    out = (forward if sharded is None else sharded.forward)(
                        models,
                        mb.batch,
                        None if masks is None else masks[actions],
                        cfg.temperature,
                        value_units,
                    )
                loss, stats = step_policy_loss(
                    out.logp,
                    old_logp[actions],
                    targets.advantages[units],
                    cu_u,
                    cu_trajs=cu_t,
                    ratio_level=cfg.ratio_level,
                    length_power=cfg.length_power,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip,
                    agg=cfg.agg,
                    ref_logp=None if ref_logp is None else ref_logp[actions],
                    kl_coef=kl_coef,
                    kl_type=cfg.kl_type,
                    normalizer=norm,
                    impl=cfg.impl,
                )
                total = loss if train_policy else None
                if value_units is not None:
                    vloss = value_loss(
                        out.values,
                        targets.old_values[units],
                        targets.returns[units],
                        clip=cfg.value_clip,
                        normalizer=float(n_values),
                        impl=cfg.impl,
                    )
                    vterm = cfg.vf_coef * vloss
                    total = vterm if total is None else total + vterm
                    n_mb = cu_u.numel() - 1
                    add("value_loss", float(vloss.detach()) * n_values / max(n_mb, 1), n_mb)
                if total is not None:
                    total.backward()
                add("policy_loss", float(loss.detach()) * norm / max(d, 1e-12), d)
                for key in ("clip_frac", "approx_kl", "ratio_mean"):
                    add(key, stats[key], d)
                add(
                    "entropy",
                    float(out.entropy.detach().mean()) if out.entropy.numel() else 0.0,
                    out.entropy.numel(),
                )
            for _ in range(n_dummy):
                sharded.dummy_backward(cfg.temperature, value_units)
            if sharded is None:  # (FSDP reduce-scatters in backward)
                comm.all_reduce_grads(policy_params + critic_params)
            if cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(policy_params, cfg.grad_clip)
                add("grad_norm", float(gn))
                if critic_params:
                    torch.nn.utils.clip_grad_norm_(critic_params, cfg.grad_clip)
            optimizer.step()
            if on_step is not None:
                on_step(1)
    keys = sorted(UPDATE_STAT_KEYS)  # the same list on every rank (a rank may have no stats)
    totals = comm.all_reduce_sum([sums.get(k, 0.0) for k in keys])
    counts = comm.all_reduce_sum([weights.get(k, 0.0) for k in keys])
    sums, weights = dict(zip(keys, totals)), dict(zip(keys, counts))
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
