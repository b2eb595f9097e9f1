"""Loop oracles for the verl adapter, written from the math (docs/verl.md, docs/design.md §1): they
share no code with steppo_fast.integrations and never import verl."""

from __future__ import annotations

import math

import torch


def oracle_steps(mask) -> list[tuple[int, int, int]]:
    """(row, start, end) of every maximal run of 1s, row-major."""
    out = []
    for r, row in enumerate(mask.tolist()):
        t = 0
        while t < len(row):
            if row[t]:
                s = t
                while t < len(row) and row[t]:
                    t += 1
                out.append((r, s, t))
            else:
                t += 1
    return out


def oracle_step_losses(
    log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip=None
):
    """Per-step StepPO loss L_s (float), in oracle_steps order."""
    losses = []
    for r, s, e in oracle_steps(mask):
        n = e - s
        log_ratio = sum(float(log_prob[r, t]) - float(old_log_prob[r, t]) for t in range(s, e)) / n
        rho = math.exp(max(-20.0, min(20.0, log_ratio)))
        a = sum(float(advantages[r, t]) for t in range(s, e)) / n
        loss = -min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
        if dual_clip is not None and a < 0:
            loss = min(loss, -dual_clip * a)
        losses.append(loss)
    return losses


def oracle_verl_agg(
    step_losses,
    mask,
    mode,
    *,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    token_weights=None,
):
    """verl's agg_loss semantics on the loss matrix holding L_s on every token of step s
    (times token_weights[r][t] when given), written as loops."""
    steps = oracle_steps(mask)
    rows = {}
    for (r, s, e), loss in zip(steps, step_losses):
        for t in range(s, e):
            w = 1.0 if token_weights is None else float(token_weights[r, t])
            rows.setdefault(r, []).append(w * loss)
    tokens = sum(len(v) for v in rows.values())
    if mode == "token-mean":
        denom = tokens if batch_num_tokens is None else batch_num_tokens
        return sum(sum(v) for v in rows.values()) / denom * dp_size if denom else 0.0
    if mode == "token-sum":
        return sum(sum(v) for v in rows.values()) * dp_size
    denom = len(rows) if global_batch_size is None else global_batch_size
    if not denom:
        return 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in rows.values()) / denom * dp_size
    total = sum(sum(v) for v in rows.values()) / denom * dp_size
    if mode == "seq-mean-token-sum":
        return total
    assert mode == "seq-mean-token-sum-norm"
    return total / (mask.shape[1] if loss_scale_factor is None else loss_scale_factor)


def oracle_step_advantages(
    rewards, values, mask, traj_uid=None, step_idx=None, gamma=1.0, lam=1.0, whiten=True, eps=1e-8
):
    """StepPO advantages/returns [R, L] as nested lists, by loops over trajectories."""
    num_rows, length = mask.shape
    uids = list(range(num_rows)) if traj_uid is None else list(traj_uid)
    order = {}
    for r in range(num_rows):
        order.setdefault(uids[r], []).append(r)
    if step_idx is not None:
        for rows in order.values():
            rows.sort(key=lambda r: step_idx[r])
    all_steps = oracle_steps(mask)
    by_row = {}
    for r, s, e in all_steps:
        by_row.setdefault(r, []).append((s, e))
    trajs = []  # list of lists of (row, start, end, reward, value)
    for rows in order.values():
        traj = []
        for r in rows:
            row_steps = by_row.get(r, [])
            for k, (s, e) in enumerate(row_steps):
                stop = row_steps[k + 1][0] if k + 1 < len(row_steps) else length
                reward = sum(float(rewards[r, t]) for t in range(s, stop))
                value = 0.0 if values is None else float(values[r, s])
                traj.append((r, s, e, reward, value))
        trajs.append(traj)
    adv_of, ret_of = {}, {}
    for traj in trajs:
        gae, next_v = 0.0, 0.0
        for r, s, _e, reward, value in reversed(traj):
            delta = reward + gamma * next_v - value
            gae = delta + gamma * lam * gae
            adv_of[(r, s)], ret_of[(r, s)] = gae, gae + value
            next_v = value
    if whiten and len(adv_of) >= 2:
        xs = list(adv_of.values())
        m = sum(xs) / len(xs)
        std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        adv_of = {k: (v - m) / (std + eps) for k, v in adv_of.items()}
    elif whiten and len(adv_of) == 1:
        adv_of = {k: 0.0 for k in adv_of}
    adv = [[0.0] * length for _ in range(num_rows)]
    ret = [[0.0] * length for _ in range(num_rows)]
    for r, s, e in all_steps:
        for t in range(s, e):
            adv[r][t], ret[r][t] = adv_of[(r, s)], ret_of[(r, s)]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def random_mask(num_rows, length, *, multi_turn, generator, empty_rows=False):
    """[R, L] 0/1 float mask: one left-aligned run per row, or several runs (multi-turn)."""
    mask = torch.zeros(num_rows, length)
    for r in range(num_rows):
        if empty_rows and r % 4 == 3:
            continue
        if not multi_turn:
            n = int(torch.randint(1, length + 1, (1,), generator=generator))
            mask[r, :n] = 1
            continue
        t = 0
        while t < length:
            run = int(torch.randint(1, 4, (1,), generator=generator))
            mask[r, t : t + run] = 1
            t += run + int(torch.randint(1, 3, (1,), generator=generator))
        if torch.rand((), generator=generator) < 0.5:
            mask[r, -1] = 0  # some rows end on observation tokens
    return mask
