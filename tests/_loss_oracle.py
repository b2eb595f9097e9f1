"""Loop oracles written from the math (docs/design.md §1, §4), one Python iteration per unit,
and random CSR layouts. They share no code with steppo_fast.reference. The policy-loss oracle
works on 0-d torch tensors so the same loop gives values and autograd gradients."""

from __future__ import annotations

import math

import torch
from _csr import random_layout

RATIO_LEVELS = ["step", "token", "trajectory"]
AGGS = ["step-mean", "token-mean", "traj-mean"]


def make_case(seed, weights="none", dtype=torch.float64, num_trajs=3, max_steps=4, max_tokens=4):
    """A random batch: log-ratios ~ N(0, 0.6) (a mix of clipped and unclipped units)."""
    gen = torch.Generator().manual_seed(seed)
    cu_steps, cu_trajs = random_layout(gen, num_trajs, max_steps, max_tokens)
    num_tokens, num_steps = int(cu_steps[-1]), cu_steps.numel() - 1
    old = -2.0 * torch.rand(num_tokens, generator=gen, dtype=torch.float64)
    logp = old + 0.6 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    adv = torch.randn(num_steps, generator=gen, dtype=torch.float64)
    if weights == "none":
        sw = None
    else:
        sw = (torch.rand(num_steps, generator=gen, dtype=torch.float64) > 0.3).double()
        sw[0] = 0.0  # always one padding step
        if weights == "fractional":
            sw = sw * torch.rand(num_steps, generator=gen, dtype=torch.float64).add(0.25)
        sw = sw.to(dtype)
    return dict(
        logp=logp.to(dtype),
        old_logp=old.to(dtype),
        advantages=adv.to(dtype),
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
        step_weight=sw,
        ref_logp=ref.to(dtype),
    )


def oracle_kl(logp: float, ref: float, kind: str) -> float:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = ref - logp
    if d > 700:  # exp overflows a float; k3 is clamped to 10 long before
        return 10.0
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)


def _kl_tensor(logp_t, ref_t, kind):
    if kind == "k1":
        return logp_t - ref_t
    if kind == "k2":
        return 0.5 * (logp_t - ref_t) ** 2
    d = ref_t - logp_t
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def oracle_value_loss(values, old, returns, clip=None, weight=None, normalizer=None) -> float:
    num = den = 0.0
    for j in range(len(values)):
        w = 1.0 if weight is None else float(weight[j])
        if w == 0:
            continue
        v, o, r = float(values[j]), float(old[j]), float(returns[j])
        err = (v - r) ** 2
        if clip is not None:
            v_clip = o + min(max(v - o, -clip), clip)
            err = max(err, (v_clip - r) ** 2)
        num += w * 0.5 * err
        den += w
    if normalizer is not None:
        return num / normalizer
    return num / den if den > 0 else 0.0


def oracle_policy_loss(
    logp,
    old_logp,
    advantages,
    cu_steps,
    *,
    cu_trajs=None,
    ratio_level="step",
    length_power=1.0,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="step-mean",
    step_weight=None,
    ref_logp=None,
    kl_coef=0.0,
    kl_type="k3",
    normalizer=None,
):
    """(loss 0-d tensor, stats dict), from the docs/design.md formulas, one loop iteration per unit.

    Computes in the dtype of ``logp`` (pass fp64 for an exact oracle); differentiable.
    """
    cu = [int(c) for c in cu_steps]
    num_steps = len(cu) - 1
    sw = [1.0] * num_steps if step_weight is None else [float(w) for w in step_weight]
    if cu_trajs is None:
        traj_steps = [list(range(num_steps))]
    else:
        ct = [int(c) for c in cu_trajs]
        traj_steps = [list(range(ct[b], ct[b + 1])) for b in range(len(ct) - 1)]
    n = [cu[s + 1] - cu[s] for s in range(num_steps)]
    x = [logp[i] - old_logp[i] for i in range(cu[-1])]

    # (step, log-ratio, trajectory) of every unit, units in (trajectory, step, token) order
    units = []
    for b, steps in enumerate(traj_steps):
        if ratio_level == "trajectory":
            toks = [i for s in steps if sw[s] > 0 for i in range(cu[s], cu[s + 1])]
            l_b = sum(x[i] for i in toks) / len(toks) ** length_power if toks else 0.0
        for s in steps:
            if ratio_level == "token":
                units += [(s, x[i], b) for i in range(cu[s], cu[s + 1])]
            elif ratio_level == "step":
                units.append(
                    (s, sum(x[i] for i in range(cu[s], cu[s + 1])) / n[s] ** length_power, b)
                )
            else:
                units.append((s, l_b, b))
    token_units = ratio_level == "token"

    def weight(s, b, is_token_unit):
        if sw[s] == 0:
            return 0.0
        if agg == "step-mean":
            base = 1.0 / n[s] if is_token_unit else 1.0
        elif agg == "token-mean":
            base = 1.0 if is_token_unit else float(n[s])
        else:
            counted = [t for t in traj_steps[b] if sw[t] > 0]
            base = 1.0 / (sum(n[t] for t in counted) if is_token_unit else len(counted))
        return base * sw[s]

    num = torch.zeros((), dtype=logp.dtype)
    den = clip_w = dual_w = ratio_sum = 0.0
    ratios = []
    for s, lr, b in units:
        w = weight(s, b, token_units)
        if w == 0:
            continue
        a = advantages[s].to(logp.dtype)
        rho = torch.exp(torch.clamp(torch.as_tensor(lr, dtype=logp.dtype), -20.0, 20.0))
        unclipped = -rho * a
        clipped = -torch.clamp(rho, 1 - clip_low, 1 + clip_high) * a
        loss_u = torch.maximum(unclipped, clipped)  # = -min(rho A, clip(rho) A)
        clip_w += w * float(clipped > unclipped)
        if dual_clip is not None and float(a.detach()) < 0:
            dual_u = -dual_clip * a
            dual_w += w * float(dual_u < loss_u)
            loss_u = torch.minimum(loss_u, dual_u)
        num = num + w * loss_u
        den += w
        ratio_sum += w * float(rho.detach())
        ratios.append(float(rho.detach()))

    kl_num = torch.zeros((), dtype=logp.dtype)
    tok_den = approx_num = 0.0
    for b, steps in enumerate(traj_steps):
        for s in steps:
            for i in range(cu[s], cu[s + 1]):
                w = weight(s, b, True)
                if w == 0:
                    continue
                tok_den += w
                approx_num += w * float((old_logp[i] - logp[i]).detach())
                if kl_coef != 0:
                    kl_num = kl_num + w * _kl_tensor(logp[i], ref_logp[i].to(logp.dtype), kl_type)

    divisor = normalizer if normalizer is not None else (den if den > 0 else 1.0)
    loss = num / divisor + kl_coef * kl_num / divisor
    if den > 0:
        stats = {
            "clip_frac": clip_w / den,
            "dual_clip_frac": dual_w / den,
            "ratio_mean": ratio_sum / den,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    else:
        stats = {"clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio_mean": 1.0}
        stats.update(ratio_min=1.0, ratio_max=1.0)
    stats["approx_kl"] = approx_num / tok_den if tok_den > 0 else 0.0
    return loss, stats
