"""Public loss ops (validation + dispatch by ``impl=``): the StepPO clipped policy loss, the
clipped value loss, per-token KL penalties, and the normaliser for gradient accumulation.

Layout (docs/design.md §2): A action tokens ordered by (trajectory, step, position);
``cu_steps`` [S+1] splits them into S steps (n_s = cu_steps[s+1] - cu_steps[s] >= 1 tokens);
``cu_trajs`` [B+1] splits the steps into B trajectories. Offsets are int32 (int64 accepted).
"""

from __future__ import annotations

import torch

from .._defs import AGGS, KL_KINDS, RATIO_LEVELS, STAT_KEYS, PackedStats, StepLossOptions
from .._dispatch import resolve
from .._validate import (
    check_choice,
    check_float,
    check_nonempty_segments,
    check_number,
    check_offsets,
    check_offsets_metadata,
    check_weights,
    compute_dtype,
    read_values,
)
from ..reference.loss import loss_normalizer as _reference_loss_normalizer
from ..reference.segments import segment_ids
from ._loss_checks import check_policy_magnitudes, check_values, compute_limit

STATS_MODES = ("float", "tensor")


def _check_weights(name: str, w, length: int, device) -> None:
    """[length] float weights, every entry finite and >= 0 (names the first bad index)."""
    check_float(name, w, ndim=1, length=length, device=device)
    check_weights(name, w)


def _check_normalizer(normalizer) -> float | None:
    if normalizer is None:
        return None
    return check_number("normalizer", normalizer, lambda v: v > 0, "> 0")


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", *, impl: str = "auto"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With d = ref_logp - logp:
    - ``"k1"``: logp - ref_logp (unbiased, high variance; not clamped);
    - ``"k2"``: 0.5 (logp - ref_logp)^2 (not clamped);
    - ``"k3"``: exp(d) - d - 1, clamped to [-10, 10] (verl's ``low_var_kl``; >= 0).

    Args:
        logp, ref_logp: [A] fp32/bf16/fp16/fp64 log-probs of the same tokens.
        kind: "k1", "k2" or "k3".

    Returns:
        [A] fp32 (fp64 for fp64 inputs); differentiable w.r.t. both inputs (zero gradient where
        k3 is clamped).

    Raises:
        ValueError: naming the argument and index of a NaN or inf entry (one ``aminmax`` per
            input, one host transfer; skipped under ``torch.compile``), or for bad shapes.

    Equivalent to (k3)::

        d = (ref_logp.float() - logp.float()).clamp(-20, 20)  # value-neutral, keeps grads finite
        (d.exp() - d - 1).clamp(-10, 10)
    """
    check_float("logp", logp, ndim=1)
    check_float("ref_logp", ref_logp, ndim=1, length=logp.shape[0], device=logp.device)
    check_choice("kind", kind, KL_KINDS)
    check_values("weight", None, {"logp": logp, "ref_logp": ref_logp})
    backend = resolve(impl, "kl_penalty", logp, ref_logp)
    return backend.kl_penalty(logp, ref_logp, kind=kind)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip: float | None = None,
    weight: torch.Tensor | None = None,
    normalizer: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """PPO clipped value loss, a weighted mean over entries (e.g. steps).

    e_j = 0.5 * max((v_j - R_j)^2, (old_j + clamp(v_j - old_j, -clip, clip) - R_j)^2), the
    second term only when ``clip`` is given; loss = sum_j w_j e_j / sum_j w_j with w = 1 when
    ``weight`` is None. ``normalizer`` replaces the denominator (micro-batch losses with the
    global normalizer sum exactly to the full-batch loss). Zero total weight -> 0 (a tensor
    still connected to ``values``: zero gradients, never NaN). Entries with w_j = 0 never reach
    the loss, whatever their values.

    Args:
        values: [M] fp32/bf16/fp16/fp64 current critic values (differentiable).
        old_values: [M] values at rollout time; returns: [M] targets R. All three must be
            finite on the entries with w_j > 0 (a ``ValueError`` names the first other one;
            entries of weight 0 may hold anything).
        clip: None or a number >= 0. weight: None or [M] float, finite and >= 0.
        normalizer: None or a finite number > 0.

    Returns:
        0-d fp32 loss (fp64 when an input is fp64).

    Equivalent to::

        err = (v - R) ** 2
        if clip is not None:
            err = torch.maximum(err, (old + (v - old).clamp(-clip, clip) - R) ** 2)
        (0.5 * w * err).sum() / (normalizer or w.sum())
    """
    check_float("values", values, ndim=1)
    length, device = values.shape[0], values.device
    check_float("old_values", old_values, ndim=1, length=length, device=device)
    check_float("returns", returns, ndim=1, length=length, device=device)
    if clip is not None:
        clip = check_number("clip", clip, lambda v: v >= 0, ">= 0 (or None)")
    if weight is not None:
        check_float("weight", weight, ndim=1, length=length, device=device)
    normalizer = _check_normalizer(normalizer)
    check_values("weight", weight, {"values": values, "old_values": old_values, "returns": returns})
    backend = resolve(impl, "value_loss", values, old_values, returns, weight)
    return backend.value_loss(
        values, old_values, returns, clip=clip, weight=weight, normalizer=normalizer
    )


def _validate_layout(cu_steps, cu_trajs, num_tokens, num_steps, device, needs_trajs, why):
    """Metadata of the offsets (their values are checked with the other values, in one read)."""
    check_offsets_metadata("cu_steps", cu_steps, device=device)
    if cu_steps.numel() - 1 != num_steps:
        raise ValueError(
            f"cu_steps: {cu_steps.numel() - 1} steps (len(cu_steps) - 1) != "
            f"len(advantages) = {num_steps}"
        )
    if cu_trajs is None:
        if needs_trajs:
            raise ValueError(f"cu_trajs: required for {why}")
    else:
        check_offsets_metadata("cu_trajs", cu_trajs, device=device)


def _check_layout_values(cu_steps, cu_trajs, num_tokens, num_steps, summaries) -> None:
    """The offsets' value rules, from the (first, last, smallest step) already read."""
    check_offsets("cu_steps", cu_steps, num_tokens, summary=summaries[0])
    check_nonempty_segments(
        "cu_steps", cu_steps, smallest_step=None if summaries[0] is None else summaries[0][2]
    )
    if cu_trajs is not None:
        check_offsets("cu_trajs", cu_trajs, num_steps, summary=summaries[1])


def step_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_steps: torch.Tensor,
    *,
    cu_trajs: torch.Tensor | None = None,
    ratio_level: str = "step",
    length_power: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "step-mean",
    step_weight: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    normalizer: float | None = None,
    stats: str = "float",
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]] | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """StepPO clipped policy loss (docs/design.md §1, §4 "Aggregation, exactly") and batch stats.

    Ratios (x_i = logp_i - old_logp_i; p = ``length_power``):
    - ``"step"``: one per step, l_s = sum_{i in s} x_i / n_s**p (p = 1: GSPO-style mean);
    - ``"token"``: one per token, l_i = x_i (PPO; p unused);
    - ``"trajectory"``: one per trajectory, l_b = sum_{i in b} x_i / N_b**p over the N_b action
      tokens of b's steps with step_weight > 0, shared by all steps of b (needs ``cu_trajs``).
    rho = exp(clamp(l, -20, 20)). Units u are tokens for "token" and steps otherwise; A_u is
    the advantage of the unit's step. Per unit:
    L_u = -min(rho A_u, clip(rho, 1 - clip_low, 1 + clip_high) A_u), and for A_u < 0 with
    ``dual_clip``: L_u = min(L_u, -dual_clip A_u). Clipped units get exactly zero gradient.

    Weights w_u (sw_s = ``step_weight``, 1 if None): ``"step-mean"`` 1 per step unit, 1/n_s per
    token unit (each step sums to 1); ``"token-mean"`` n_s per step unit, 1 per token unit;
    ``"traj-mean"`` 1/c_b, c_b = number of units of trajectory b whose step has sw > 0 (each
    trajectory sums to 1; needs ``cu_trajs``); all multiplied by sw_s. w'_t are the same
    weights for token units (the KL term's units). With D = sum_u w_u:

        loss = (sum_u w_u L_u + kl_coef * sum_t w'_t KL_t) / (normalizer or D),
        KL_t = kl_penalty(logp_t, ref_logp_t, kl_type).

    The KL term shares the denominator D (= its own sum_t w'_t, except under "traj-mean" with
    fractional step weights and step/trajectory ratios), so ``loss(normalizer=None) ==
    loss(normalizer=loss_normalizer(...))`` always, and micro-batches split by whole
    trajectories with the global ``normalizer`` (sum of their ``loss_normalizer``) sum exactly
    to the full-batch loss and gradients. D = 0 (empty batch, all-zero weights) -> loss 0, still
    connected to ``logp`` (zero gradients, never NaN). Steps with sw = 0 never reach the loss.

    Stats (over counted units w_u > 0, weighted by w_u, normalised by D):
    ``clip_frac`` = weighted fraction of units on the clipped PPO branch (A>0 and rho >
    1+clip_high, or A<0 and rho < 1-clip_low); ``dual_clip_frac`` = weighted fraction on the
    dual-clip branch (A<0, rho > dual_clip; 0 without dual clip); ``ratio_mean`` = weighted mean
    of rho; ``ratio_min``/``ratio_max`` = min/max of rho; ``approx_kl`` = sum_t w'_t
    (old_logp_t - logp_t) / sum_t w'_t (k1 estimate of KL(old || new) over token units). No
    counted unit: fracs and approx_kl 0.0, ratio_mean/min/max 1.0 (the on-policy ratio).
    ``stats="float"`` (default) returns them as Python floats, read with one host sync;
    ``stats="tensor"`` returns detached 0-d tensors (the loss's dtype and device) without any
    sync, e.g. to log them asynchronously or to trace the call with ``torch.compile``. Under
    ``torch.compile(fullgraph=True)``, ``stats="float"`` is an error asking for
    ``stats="tensor"`` (a host read cannot be traced); without ``fullgraph`` Dynamo breaks the
    graph at that error and runs the call eagerly, where it works.

    Value checks (one ``aminmax`` per tensor, one host transfer for all of them, skipped under
    ``torch.compile``): ``logp``, ``old_logp``, ``advantages`` (and ``ref_logp`` when the KL
    term reads it, i.e. ``kl_coef != 0``) must be finite on steps with sw > 0 (padding steps
    may hold anything), else a ``ValueError`` names the argument and entry. Magnitudes must
    keep every backend's sums finite: with N the units of ``agg`` (S for step-mean, A for
    token-mean, B for traj-mean), N * max(sw) * (e^20 max|A| + |kl_coef| k_max) and
    A * (max|logp| + max|old_logp|), divided by ``normalizer`` when given, must stay below half
    the compute dtype's largest value (fp32: 1.7e38; |A| up to ~1e23 for a million units), else
    a ``ValueError`` names the input (so no backend returns inf or NaN for finite inputs, and
    all agree; see :mod:`steppo_fast.ops._loss_checks`).

    Args:
        logp: [A] fp32/bf16/fp16/fp64 current log-probs (differentiable).
        old_logp: [A] rollout-time log-probs. advantages: [S] one per step.
        cu_steps: [S+1] offsets ending at A; every step non-empty.
        cu_trajs: None or [B+1] offsets ending at S.
        ratio_level: "step", "token", "trajectory". agg: "step-mean", "token-mean", "traj-mean".
        length_power: >= 0. clip_low: in [0, 1). clip_high: >= 0. dual_clip: None or > 1.
        step_weight: None or [S] float, finite and >= 0.
        ref_logp: [A], required when kl_coef != 0. kl_type: "k1", "k2", "k3".
        normalizer: None or a finite number > 0 (a Python number under ``torch.compile``).
        stats: "float" (Python floats, one host sync) or "tensor" (0-d tensors, no sync).

    Returns:
        (loss, stats): 0-d fp32 loss (fp64 when an input is fp64) and the dict above.

    Equivalent to (ratio_level="step", agg="step-mean"; without weights, dual clip, KL)::

        n = cu_steps.diff()
        l = segment_sum(logp - old_logp, cu_steps) / n ** length_power
        rho = l.clamp(-20, 20).exp()
        L = -torch.minimum(rho * adv, rho.clamp(1 - clip_low, 1 + clip_high) * adv)
        loss = L.mean()
    """
    check_float("logp", logp, ndim=1)
    num_tokens, device = logp.shape[0], logp.device
    check_float("old_logp", old_logp, ndim=1, length=num_tokens, device=device)
    check_float("advantages", advantages, ndim=1, device=device)
    num_steps = advantages.shape[0]
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("agg", agg, AGGS)
    check_choice("kl_type", kl_type, KL_KINDS)
    check_choice("stats", stats, STATS_MODES)
    if stats == "float" and torch.compiler.is_compiling():
        raise ValueError(
            "stats: 'float' reads the stats on the host, which torch.compile cannot trace; "
            "pass stats='tensor' (detached 0-d tensors) and read them outside the compiled code"
        )
    needs_trajs = ratio_level == "trajectory" or agg == "traj-mean"
    why = "ratio_level='trajectory'" if ratio_level == "trajectory" else "agg='traj-mean'"
    _validate_layout(cu_steps, cu_trajs, num_tokens, num_steps, device, needs_trajs, why)
    length_power = check_number("length_power", length_power, lambda v: v >= 0, ">= 0")
    clip_low = check_number("clip_low", clip_low, lambda v: 0 <= v < 1, "in [0, 1)")
    clip_high = check_number("clip_high", clip_high, lambda v: v >= 0, ">= 0")
    if dual_clip is not None:
        dual_clip = check_number("dual_clip", dual_clip, lambda v: v > 1, "> 1 (or None)")
    if step_weight is not None:
        check_float("step_weight", step_weight, ndim=1, length=num_steps, device=device)
    kl_coef = check_number("kl_coef", kl_coef, rule="a finite number")
    if ref_logp is not None:
        check_float("ref_logp", ref_logp, ndim=1, length=num_tokens, device=device)
    elif kl_coef != 0.0:
        raise ValueError(f"ref_logp: required when kl_coef != 0 (got kl_coef={kl_coef})")
    normalizer = _check_normalizer(normalizer)
    used_ref = ref_logp if kl_coef != 0.0 else None  # ref_logp is read only by the KL term
    # every value rule below from one host transfer (offsets, weights, finiteness, magnitudes)
    floats = (step_weight, advantages, logp, old_logp, used_ref)
    bounds, summaries = read_values(floats, (cu_steps, cu_trajs))
    _check_layout_values(cu_steps, cu_trajs, num_tokens, num_steps, summaries)
    bounds = check_values(
        "step_weight",
        step_weight,
        {"advantages": advantages},
        {"logp": logp, "old_logp": old_logp, "ref_logp": used_ref},
        token_entry=lambda: segment_ids(cu_steps, num_tokens),
        bounds=bounds,
    )
    if any(b is not None for b in bounds):  # values were read (not under torch.compile)
        if agg == "step-mean":
            units = num_steps
        elif agg == "token-mean":
            units = num_tokens
        else:
            units = cu_trajs.shape[0] - 1
        check_policy_magnitudes(
            bounds,
            (advantages, logp, old_logp, used_ref),
            step_weight=step_weight,
            cu_steps=cu_steps,
            num_units=units,
            kl_coef=kl_coef,
            kl_type=kl_type,
            normalizer=normalizer,
            limit=compute_limit(compute_dtype(logp, old_logp, advantages, step_weight, ref_logp)),
        )

    tensors = (logp, old_logp, advantages, cu_steps, cu_trajs, step_weight, ref_logp)
    backend = resolve(impl, "step_policy_loss", *tensors)
    options = StepLossOptions(
        ratio_level=ratio_level,
        length_power=length_power,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        kl_coef=kl_coef,
        kl_type=kl_type,
        normalizer=normalizer,
    )
    loss, stat_tensors = backend.step_policy_loss(*tensors, options)
    # backends return 0-d tensors (no sync), views of one [6] tensor (PackedStats) when they
    # can: "float" then costs one host transfer and no stacking launch
    if isinstance(stat_tensors, PackedStats):
        packed = stat_tensors.packed.detach()
    else:
        packed = torch.stack([stat_tensors[key].detach() for key in STAT_KEYS])
    if stats == "float":
        return loss, dict(zip(STAT_KEYS, packed.tolist()))
    return loss, dict(zip(STAT_KEYS, packed.to(loss.dtype).unbind()))


def loss_normalizer(
    cu_steps: torch.Tensor,
    *,
    cu_trajs: torch.Tensor | None = None,
    ratio_level: str = "step",
    agg: str = "step-mean",
    step_weight: torch.Tensor | None = None,
) -> float:
    """The denominator D = sum_u w_u that ``step_policy_loss`` uses when ``normalizer`` is None.

    For gradient accumulation / data parallelism: sum this over the micro-batches (or
    all-reduce it over ranks) of one optimizer step and pass the total as ``normalizer``; the
    micro-batch losses then add up exactly to the full-batch loss (split by whole trajectories).
    Same arguments and meaning as in :func:`step_policy_loss`; returns a Python float (fp64 sum).

    Equivalent to (agg="step-mean", non-token ratio): ``float(step_weight.sum())``.
    """
    num_steps = check_offsets("cu_steps", cu_steps)
    device = cu_steps.device
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("agg", agg, AGGS)
    if agg == "traj-mean" and cu_trajs is None:
        raise ValueError("cu_trajs: required for agg='traj-mean'")
    if cu_trajs is not None:
        check_offsets("cu_trajs", cu_trajs, num_steps, device=device)
    if step_weight is not None:
        _check_weights("step_weight", step_weight, num_steps, device)
    return _reference_loss_normalizer(
        cu_steps, cu_trajs=cu_trajs, ratio_level=ratio_level, agg=agg, step_weight=step_weight
    )
