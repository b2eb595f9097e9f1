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

import torch

from .._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float,
    check_index,
    check_number,
    check_offsets,
    check_tensor,
)
from ._resolve import resolve

GROUP_MODES = ("grpo", "dr_grpo", "rloo")
GIGPO_MODES = ("mean_std_norm", "mean_norm")


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
    n_trajs = check_offsets("cu_trajs", cu_trajs, n_steps, device=device)
    if last_values is not None:
        check_float("last_values", last_values, length=n_trajs, device=device)
        check_finite("last_values", last_values)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    lam = check_number("lam", lam, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    check_finite("rewards", rewards)
    check_finite("values", values)
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
    n_trajs = check_offsets("cu_trajs", cu_trajs, n_steps, device=device)
    if last_values is not None:
        check_float("last_values", last_values, length=n_trajs, device=device)
        check_finite("last_values", last_values)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    check_finite("rewards", rewards)
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

    Degenerate cases (never NaN): no counted entry returns ``x`` unchanged (mean 0, scale 1);
    one counted entry returns ``x - x_counted`` (scale 1); all counted entries equal give
    ``(x - mean) / eps``, i.e. 0 on the counted entries.

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
        if weight.dtype != torch.bool:
            check_finite("weight", weight)
    eps = check_number("eps", eps, lambda v: v >= 0, ">= 0")
    check_finite("x", x)
    backend = resolve(impl, "whiten", x, weight)
    return backend.whiten(x, weight, eps=eps)


def group_advantages(scores, group, *, mode="grpo", eps=1e-6, impl="auto"):
    """Trajectory-level group-relative advantages (GRPO, Dr.GRPO, RLOO).

    With ``mean_g``, ``std_g`` (unbiased, as ``torch.std``) and ``n_g`` over the trajectories
    sharing a group id::

        grpo:    (s - mean_g) / (std_g + eps)
        dr_grpo: s - mean_g
        rloo:    n_g / (n_g - 1) * (s - mean_g)   (= s minus the mean of the other members)

    Groups of one give 0 in every mode.

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
    check_finite("scores", scores)
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
    "mean_norm", over a class (unbiased std); a class of one gives 0::

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
    n_trajs = check_offsets("cu_trajs", cu_trajs, n_steps, device=device)
    check_index("group", group, length=n_trajs, device=device)
    check_index("anchor", anchor, length=n_steps, device=device)
    step_weight = check_number("step_weight", step_weight)
    gamma = check_number("gamma", gamma, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")
    check_choice("mode", mode, GIGPO_MODES)
    eps = check_number("eps", eps, lambda v: v >= 0, ">= 0")
    check_finite("rewards", rewards)
    backend = resolve(impl, "gigpo_advantages", rewards, cu_trajs, group, anchor)
    return backend.gigpo_advantages(
        rewards, cu_trajs, group, anchor, step_weight=step_weight, gamma=gamma, mode=mode, eps=eps
    )
