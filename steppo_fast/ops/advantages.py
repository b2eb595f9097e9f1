"""Public advantage ops: validation, then dispatch by ``impl=`` to a backend.

Layout (docs/design.md §2): ``S`` steps ordered by (trajectory, time); trajectory ``b`` is the steps
``[cu_trajs[b], cu_trajs[b+1])`` of the CSR offsets ``cu_trajs`` [B+1] (int32, int64 accepted).
The same ops run at token level when given token rewards/values and ``cu_steps[cu_trajs]``.
Empty trajectories (two equal offsets) and empty batches (S = 0, B >= 0) are accepted.

Dtypes: float inputs fp32/bf16/fp16 are computed in fp32 and returned fp32; fp64 inputs are
computed and returned in fp64. Every violation raises ``ValueError`` naming the argument (and
the index, for values); nothing is clamped or dropped. Under ``torch.compile`` the checks that
read tensor values (offsets, finiteness) are skipped (policy in :mod:`steppo_fast._validate`).
"""

from __future__ import annotations

import math

import torch

from .._dispatch import resolve
from .._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float,
    check_index,
    check_number,
    check_offsets,
    check_offsets_metadata,
    check_tensor,
    compute_dtype,
    read_values,
)

GROUP_MODES = ("grpo", "dr_grpo", "rloo")
GIGPO_MODES = ("mean_std_norm", "mean_norm")


def _check_all_finite(cu_trajs=None, n_steps: int = 0, lengths=None, **tensors) -> dict:
    """The value rules of an advantage op in one host transfer: ``cu_trajs`` (when given, its
    metadata already checked) are offsets ending at ``n_steps``, and every given float tensor
    (None skipped) is finite; the first offender is named with its index. Returns each
    tensor's max |entry| (None when nothing was read: None or empty tensors, or under
    torch.compile). ``lengths``: tensors whose length must be the number of trajectories,
    checked after the offsets (whose own error is the root cause when both are wrong)."""
    bounds, summaries = read_values(tuple(tensors.values()), (cu_trajs,))
    if cu_trajs is not None:
        check_offsets("cu_trajs", cu_trajs, n_steps, summary=summaries[0])
    for name in lengths or ():
        check_float(name, tensors[name], length=cu_trajs.numel() - 1)
    highs = {}
    for (name, x), b in zip(tensors.items(), bounds):
        highs[name] = None
        if b is not None:
            check_finite(name, x, bounds=b)
            highs[name] = max(abs(b[0]), abs(b[1]))
    return highs


def _check_scan_magnitude(highs: dict, num_steps: int, dtype, *, values_weight: float) -> None:
    """Finite inputs whose returns could overflow a backend's sums are refused, so that every
    backend returns the same finite result (the fp32 scans of torch and triton would give inf
    or NaN where the C++ scan in double does not). A trajectory has at most S steps and every
    decay factor is <= 1, so with m = max|rewards| + ``values_weight`` * max|values or
    last_values|, |returns| <= (S + 1) * m; it must stay below half the compute dtype's largest
    value (fp32: 1.7e38)."""
    if all(v is None for v in highs.values()):
        return
    limit = torch.finfo(dtype).max / 2
    r = highs.get("rewards") or 0.0
    v = max(highs.get("values") or 0.0, highs.get("last_values") or 0.0)
    if (num_steps + 1) * (r + values_weight * v) > limit:
        name = (
            "rewards"
            if r >= values_weight * v
            else ("values" if (highs.get("values") or 0.0) >= v else "last_values")
        )
        raise ValueError(
            f"{name}: |{name}| up to {max(r, v):.3g} can overflow the returns: (S + 1) * "
            f"(max|rewards| + {values_weight:g} max|values, last_values|) must stay below "
            f"{limit:.3g} (S = {num_steps} steps)"
        )


def _check_normalise_magnitude(name: str, high: float | None, n: int) -> None:
    """The normalisations (whiten, group statistics) run in fp64: their sum of squared
    deviations, at most n (2 max|x|)^2, must stay below half the fp64 limit (9e307). Always
    true for fp32/bf16/fp16 inputs (n (6.8e38)^2 ~ 5e77 n); fp64 inputs beyond ~1e150 are
    refused instead of giving NaN or a silently wrong 0."""
    if high is None:
        return
    limit = torch.finfo(torch.float64).max / 2
    if 2 * high > math.sqrt(limit / max(n, 1)):
        raise ValueError(
            f"{name}: |{name}| up to {high:.3g} can overflow the fp64 statistics: "
            f"n * (2 max|{name}|)^2 must stay below {limit:.3g} (n = {n})"
        )


def step_gae(rewards, values, cu_trajs, *, gamma=1.0, lam=1.0, last_values=None, impl="auto"):
    """Generalised advantage estimation per trajectory, over steps (or tokens).

    Math, per trajectory b with steps t = 0..T-1::

        delta_t = r_t + gamma * V_{t+1} - V_t        V_T = last_values[b] (0 if None; pass 0
                                                     for terminated, the critic's value for
                                                     truncated trajectories)
        A_t = delta_t + gamma * lam * A_{t+1}        A_T = 0
        R_t = A_t + V_t

    Args:
        rewards: [S] float, reward after each step.
        values: [S] float, critic value at each step boundary.
        cu_trajs: [B+1] int32/int64 offsets ending at S. For token-level GAE pass token
            rewards/values and ``cu_steps[cu_trajs]``.
        gamma, lam: discount and GAE lambda, finite in [0, 1].
        last_values: [B] float bootstrap values, or None (all 0).
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        ``(advantages [S], returns [S])``, raw (not whitened), without autograd graph; fp32
        (fp64 if any float input is fp64).

    Equivalent to::

        for b in range(B):
            s, e = cu_trajs[b], cu_trajs[b + 1]
            next_v = 0.0 if last_values is None else last_values[b]
            gae = 0.0
            for t in reversed(range(s, e)):
                delta = rewards[t] + gamma * next_v - values[t]
                gae = delta + gamma * lam * gae
                adv[t], ret[t], next_v = gae, gae + values[t], values[t]
    """
    check_float("rewards", rewards)
    n_steps, device = rewards.shape[0], rewards.device
    check_float("values", values, length=n_steps, device=device)
    check_offsets_metadata("cu_trajs", cu_trajs, device=device)
    if last_values is not None:
        check_float("last_values", last_values, device=device)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    lam = check_number("lam", lam, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    highs = _check_all_finite(
        cu_trajs,
        n_steps,
        lengths=() if last_values is None else ("last_values",),
        rewards=rewards,
        values=values,
        last_values=last_values,
    )
    dtype = compute_dtype(rewards, values, last_values)
    _check_scan_magnitude(highs, n_steps, dtype, values_weight=2.0)  # delta = r + gV' - V
    backend = resolve(impl, "step_gae", rewards, values, cu_trajs)
    with torch.no_grad():
        advantages, returns = backend.step_gae(
            rewards, values, cu_trajs, gamma=gamma, lam=lam, last_values=last_values
        )
    return advantages.detach(), returns.detach()


def discounted_returns(rewards, cu_trajs, *, gamma=1.0, last_values=None, impl="auto"):
    """Discounted reward-to-go per trajectory: ``G_t = r_t + gamma * G_{t+1}``,
    ``G_T = last_values[b]`` (0 if None).

    Args:
        rewards: [S] float.
        cu_trajs: [B+1] int32/int64 offsets ending at S.
        gamma: finite in [0, 1].
        last_values: [B] float or None.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [S] fp32 (fp64 if any float input is fp64); differentiable w.r.t. ``rewards`` and
        ``last_values``.

    Equivalent to::

        for b in range(B):
            g = 0.0 if last_values is None else last_values[b]
            for t in reversed(range(cu_trajs[b], cu_trajs[b + 1])):
                g = rewards[t] + gamma * g
                out[t] = g
    """
    check_float("rewards", rewards)
    n_steps, device = rewards.shape[0], rewards.device
    check_offsets_metadata("cu_trajs", cu_trajs, device=device)
    if last_values is not None:
        check_float("last_values", last_values, device=device)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    highs = _check_all_finite(
        cu_trajs,
        n_steps,
        lengths=() if last_values is None else ("last_values",),
        rewards=rewards,
        last_values=last_values,
    )
    _check_scan_magnitude(highs, n_steps, compute_dtype(rewards, last_values), values_weight=1.0)
    backend = resolve(impl, "discounted_returns", rewards, cu_trajs)
    return backend.discounted_returns(rewards, cu_trajs, gamma=gamma, last_values=last_values)


def whiten(x, weight=None, eps=1e-8, *, impl="auto"):
    """Whitening: ``(x - mean) / (std + eps)``, mean and unbiased (n-1) std over the entries
    with ``weight > 0`` (a mask: counted entries weigh equally); every entry is transformed.

    Args:
        x: [...] float (any shape; usually step advantages [S]).
        weight: same shape as ``x``, float or bool, or None (every entry counted).
        eps: finite, >= 0.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        Same shape as ``x``, fp32 (fp64 for fp64 ``x``); differentiable w.r.t. ``x``.

    Precision: every backend computes in fp64 and rounds once to the output dtype, so values up
    to the fp32 limit (+-3.4e38, whose sums and squares overflow fp32) give the exact result
    rounded (+-inf only where that result itself is beyond fp32, e.g. an uncounted entry far
    from a tiny std); equal counted entries give a mean equal to them bit for bit.

    Degenerate cases (never NaN): no counted entry returns ``x`` unchanged (mean 0, scale 1);
    one counted entry returns ``x - x_counted`` (scale 1); all counted entries equal give
    ``(x - mean) / eps``, i.e. 0 on the counted entries, and ``x - mean`` (scale 1) when
    ``eps == 0`` (a zero ``std + eps`` is never divided by).

    Equivalent to::

        kept = [x[i] for i in range(n) if weight is None or weight[i] > 0]
        m = sum(kept) / len(kept) if kept else 0.0
        if len(kept) < 2:
            out = [xi - m for xi in x]
        else:
            std = (sum((k - m) ** 2 for k in kept) / (len(kept) - 1)) ** 0.5
            out = [(xi - m) / (std + eps) for xi in x]
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES + (torch.bool,), device=x.device)
        if weight.shape != x.shape:
            raise ValueError(f"weight: shape {tuple(weight.shape)} != shape of x {tuple(x.shape)}")
    eps = check_number("eps", eps, lambda v: v >= 0, ">= 0")
    float_weight = None if weight is None or weight.dtype == torch.bool else weight
    highs = _check_all_finite(x=x, weight=float_weight)
    _check_normalise_magnitude("x", highs["x"], x.numel())
    backend = resolve(impl, "whiten", x, weight)
    return backend.whiten(x, weight, eps=eps)


def group_advantages(scores, group, *, mode="grpo", eps=1e-6, impl="auto"):
    """Trajectory-level group-relative advantages (GRPO, Dr.GRPO, RLOO).

    With ``mean_g``, ``std_g`` (unbiased, as ``torch.std``) and ``n_g`` over the trajectories
    sharing a group id::

        grpo:    (s - mean_g) / (std_g + eps)
        dr_grpo: s - mean_g
        rloo:    n_g / (n_g - 1) * (s - mean_g)   (= s minus the mean of the other members)

    Groups of one give 0 in every mode; a group of equal scores gives 0 also with ``eps = 0``
    (a zero ``std + eps`` is replaced by 1, never divided by). Statistics in fp64, rounded
    once, on every backend: scores up to the fp32 limit are exact.

    Args:
        scores: [B] float, one score per trajectory.
        group: [B] int32/int64, arbitrary group ids (need not be 0..G-1 nor sorted).
        mode: "grpo", "dr_grpo" or "rloo".
        eps: finite, >= 0.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [B] fp32 (fp64 for fp64 ``scores``); differentiable w.r.t. ``scores``.

    Equivalent to::

        for b in range(B):
            members = [scores[j] for j in range(B) if group[j] == group[b]]
            n, m = len(members), sum(members) / len(members)
            if n == 1:
                out[b] = 0.0
            elif mode == "grpo":
                std = (sum((x - m) ** 2 for x in members) / (n - 1)) ** 0.5
                out[b] = (scores[b] - m) / (std + eps)
            elif mode == "dr_grpo":
                out[b] = scores[b] - m
            else:
                out[b] = n / (n - 1) * (scores[b] - m)
    """
    check_float("scores", scores)
    check_index("group", group, length=scores.shape[0], device=scores.device)
    check_choice("mode", mode, GROUP_MODES)
    eps = check_number("eps", eps, lambda v: v >= 0, ">= 0")
    highs = _check_all_finite(scores=scores)
    _check_normalise_magnitude("scores", highs["scores"], scores.numel())
    backend = resolve(impl, "group_advantages", scores, group)
    return backend.group_advantages(scores, group, mode=mode, eps=eps)


def gigpo_advantages(
    rewards,
    cu_trajs,
    group,
    anchor,
    *,
    step_weight=1.0,
    gamma=1.0,
    mode="mean_std_norm",
    eps=1e-6,
    impl="auto",
):
    """GiGPO advantages (episode-level + anchor-state step-level), one per step.

    ``norm`` is ``(x - mean) / (std + eps)`` for "mean_std_norm" and ``x - mean`` for
    "mean_norm", over a class (unbiased std); a class of one gives 0, and a class of equal
    values gives 0 also with ``eps = 0``. Computed in fp64 and rounded once::

        episode[b] = norm over trajectories of the same group of sum_t r_t   (each trajectory
                     counts once, also one with no steps, whose sum is 0)
        G_t        = discounted_returns(rewards, cu_trajs, gamma=gamma)      (bootstrap 0)
        step[t]    = norm of G_t over the steps sharing (group of their trajectory, anchor)
        out[t]     = episode[trajectory of t] + step_weight * step[t]

    Args:
        rewards: [S] float.
        cu_trajs: [B+1] int32/int64 offsets ending at S.
        group: [B] int32/int64 group ids of the trajectories.
        anchor: [S] int32/int64 anchor-state ids of the steps.
        step_weight: finite weight of the step part.
        gamma: finite in [0, 1].
        mode: "mean_std_norm" or "mean_norm".
        eps: finite, >= 0.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [S] fp32 (fp64 for fp64 ``rewards``); differentiable w.r.t. ``rewards``.

    Equivalent to::

        traj = [b for b in range(B) for _ in range(cu_trajs[b], cu_trajs[b + 1])]
        ep = norm_within([sum(rewards[cu_trajs[b]:cu_trajs[b + 1]]) for b in range(B)],
                         keys=list(group))
        G = discounted_returns(rewards, cu_trajs, gamma=gamma)
        st = norm_within(G, keys=[(group[traj[t]], anchor[t]) for t in range(S)])
        out = [ep[traj[t]] + step_weight * st[t] for t in range(S)]
    """
    check_float("rewards", rewards)
    n_steps, device = rewards.shape[0], rewards.device
    check_offsets_metadata("cu_trajs", cu_trajs, device=device)
    n_trajs = cu_trajs.numel() - 1
    check_index("group", group, length=n_trajs, device=device)
    check_index("anchor", anchor, length=n_steps, device=device)
    step_weight = check_number("step_weight", step_weight)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    check_choice("mode", mode, GIGPO_MODES)
    eps = check_number("eps", eps, lambda v: v >= 0, ">= 0")
    highs = _check_all_finite(cu_trajs, n_steps, rewards=rewards)
    if highs["rewards"] is not None:  # returns (and episode sums) reach (S + 1) max|r|
        _check_normalise_magnitude("rewards", (n_steps + 1) * highs["rewards"], n_steps)
    backend = resolve(impl, "gigpo_advantages", rewards, cu_trajs, group, anchor)
    return backend.gigpo_advantages(
        rewards, cu_trajs, group, anchor, step_weight=step_weight, gamma=gamma, mode=mode, eps=eps
    )
