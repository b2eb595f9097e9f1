"""step_gae, discounted_returns and whiten, continued: a 5000-step trajectory, token-level GAE
through ``cu_steps[cu_trajs]``, dtypes (bf16/fp16 computed in fp32, fp64 kept), and parity with
StepPO's dense-table semantics. Loop oracles and helpers: test_advantages.py."""

import math

import pytest
import torch
from _csr import offsets
from _tolerance import assert_within, gae_error, unit_roundoff
from test_advantages import (
    FP32_EPS,
    abs_scan_oracle,
    close,
    gae_oracle,
)

from steppo_fast import discounted_returns, segment_broadcast, step_gae, whiten


# ----------------------------------------------------------------------------- long / token-level
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.984375, 0.75)])
def test_5000_step_trajectory(gamma, lam):
    # gamma and lam are exact in fp32 here, so the fp32 run differs from the exact oracle only
    # by the rounding of its own arithmetic: at most depth*(depth+2)+4 units of fp32 eps on the
    # discounted sum of magnitudes (depth = log2 passes of the doubling scan).
    lengths = [5000, 1, 37]
    cu = offsets(lengths)
    r = torch.randn(sum(lengths), dtype=torch.float64)
    v = torch.randn(sum(lengths), dtype=torch.float64)
    last = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)
    ref_adv, ref_ret = gae_oracle(r.tolist(), v.tolist(), cu.tolist(), gamma, lam, last.tolist())
    adv, ret = step_gae(r, v, cu, gamma=gamma, lam=lam, last_values=last)
    # fp64 scan vs the fp64 loop oracle: twice one evaluation's bound (+ the return's rounding)
    bound = 2 * gae_error(torch.float64, r, v, cu, gamma, lam, last, adv)
    assert_within(adv, torch.tensor(ref_adv, dtype=torch.float64), bound, "fp64 advantages")
    bound = bound + 2 * unit_roundoff(torch.float64) * ret.abs()
    assert_within(ret, torch.tensor(ref_ret, dtype=torch.float64), bound, "fp64 returns")

    adv32, ret32 = step_gae(
        r.float(), v.float(), cu, gamma=gamma, lam=lam, last_values=last.float()
    )
    r32, v32 = r.float().double().tolist(), v.float().double().tolist()
    exact_adv, exact_ret = gae_oracle(r32, v32, cu.tolist(), gamma, lam, last.tolist())
    next_v = [abs(x) for x in v32[1:]] + [0.0]
    magnitude = [abs(a) + gamma * b + abs(c) for a, b, c in zip(r32, next_v, v32)]
    depth = math.ceil(math.log2(5000))
    bound = torch.tensor(abs_scan_oracle(magnitude, cu.tolist(), gamma * lam), dtype=torch.float64)
    bound = (depth * (depth + 2) + 4) * FP32_EPS * (bound + torch.tensor(v32).abs())
    assert ((adv32.double() - torch.tensor(exact_adv)).abs() <= bound).all()
    assert ((ret32.double() - torch.tensor(exact_ret)).abs() <= bound).all()


def test_token_level_gae_via_cu_steps_of_cu_trajs():
    # ~100k action tokens: reward on the last token of each step, a value on every token.
    gen = torch.Generator().manual_seed(1)
    steps_per_traj = torch.randint(1, 40, (64,), generator=gen).tolist()
    steps_per_traj[0] = 1200  # one long trajectory (tens of thousands of tokens)
    tokens_per_step = torch.randint(1, 60, (sum(steps_per_traj),), generator=gen)
    cu_trajs = offsets(steps_per_traj)
    cu_steps = offsets(tokens_per_step.tolist())
    n_tokens = int(cu_steps[-1])
    step_rewards = torch.randn(len(tokens_per_step), generator=gen, dtype=torch.float64)
    token_rewards = torch.zeros(n_tokens, dtype=torch.float64)
    token_rewards[cu_steps[1:].long() - 1] = step_rewards
    token_values = torch.randn(n_tokens, generator=gen, dtype=torch.float64)
    token_cu_trajs = cu_steps[cu_trajs.long()]
    assert 50_000 < n_tokens < 200_000

    adv, ret = step_gae(token_rewards, token_values, token_cu_trajs, gamma=0.999, lam=0.95)
    exp_adv, exp_ret = gae_oracle(
        token_rewards.tolist(), token_values.tolist(), token_cu_trajs.tolist(), 0.999, 0.95
    )
    args = (token_rewards, token_values, token_cu_trajs, 0.999, 0.95, None, adv)
    bound = 2 * gae_error(torch.float64, *args)  # fp64 scan vs fp64 loop
    assert_within(adv, torch.tensor(exp_adv, dtype=torch.float64), bound, "advantages")
    bound = bound + 2 * unit_roundoff(torch.float64) * ret.abs()
    assert_within(ret, torch.tensor(exp_ret, dtype=torch.float64), bound, "returns")


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(low):
    cu = offsets([3, 1, 6])
    r, v, last = torch.randn(10).to(low), torch.randn(10).to(low), torch.randn(3).to(low)
    adv, ret = step_gae(r, v, cu, gamma=0.99, lam=0.95, last_values=last)
    ref_adv, ref_ret = step_gae(
        r.float(), v.float(), cu, gamma=0.99, lam=0.95, last_values=last.float()
    )
    assert adv.dtype == ret.dtype == torch.float32
    close(adv, ref_adv, low if low == torch.bfloat16 else torch.float32)
    close(ret, ref_ret, low if low == torch.bfloat16 else torch.float32)
    out = discounted_returns(r, cu, gamma=0.9, last_values=last)
    assert out.dtype == torch.float32
    close(
        out, discounted_returns(r.float(), cu, gamma=0.9, last_values=last.float()), torch.float32
    )
    w = whiten(r)
    assert w.dtype == torch.float32
    close(w, whiten(r.float()), torch.float32)


def test_fp64_stays_fp64_and_fp32_matches_oracle():
    cu = offsets([4, 2])
    r, v = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    adv, ret = step_gae(r, v, cu, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float64
    assert discounted_returns(r, cu).dtype == whiten(r).dtype == torch.float64
    adv32, _ = step_gae(r.float(), v.float(), cu, gamma=0.99, lam=0.95)
    exp, _ = gae_oracle(r.float().tolist(), v.float().tolist(), cu.tolist(), 0.99, 0.95)
    close(adv32, exp, torch.float32)


def test_auto_and_torch_impls_agree():
    cu = offsets([5, 2])
    r, v = torch.randn(7), torch.randn(7)
    a_auto, _ = step_gae(r, v, cu, gamma=0.9, lam=0.9)
    a_torch, _ = step_gae(r, v, cu, gamma=0.9, lam=0.9, impl="torch")
    # two fp32 evaluations (any backend): twice one evaluation's bound
    assert_within(a_auto, a_torch, 2 * gae_error(torch.float32, r, v, cu, 0.9, 0.9, None, a_torch))


# ----------------------------------------------------------------------------- StepPO parity
def steppo_dense_oracle(table, gamma, lam, eps=1e-8):
    """StepPO's semantics on a dense (trajectory, step) table, one padded row per step.

    ``table[b][t]`` is None for a padding row, else a dict with the step's ``reward``, the
    critic ``value`` read at the step boundary and the row's ``response_mask`` (1 on the
    step's action tokens, 0 on padding). Per trajectory, GAE runs backwards over its valid
    rows, bootstrapping from 0 when the episode terminated and from the critic's value of the
    final state when it was truncated. The advantages of all valid rows are whitened together
    (unbiased std), and each row's advantage is written onto its action tokens via the mask.
    """
    raw = {}
    for b, (rows, terminated, final_value) in enumerate(table):
        next_value = 0.0 if terminated else final_value
        running = 0.0
        for t in reversed(range(len(rows))):
            if rows[t] is None:
                continue
            delta = rows[t]["reward"] + gamma * next_value - rows[t]["value"]
            running = delta + gamma * lam * running
            raw[b, t] = running
            next_value = rows[t]["value"]
    valid = list(raw.values())
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((a - mean) ** 2 for a in valid) / (len(valid) - 1))
    tokens = []
    for b, (rows, _, _) in enumerate(table):
        for t, row in enumerate(rows):
            if row is not None:
                adv = (raw[b, t] - mean) / (std + eps)
                tokens += [adv * m for m in row["response_mask"] if m]
    return tokens


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95)])
def test_steppo_parity(gamma, lam):
    gen = torch.Generator().manual_seed(7)
    n_trajs, max_steps, max_tokens = 6, 5, 7
    table, rewards, values, step_tokens, traj_steps, last_values = [], [], [], [], [], []
    for b in range(n_trajs):
        n_steps = 1 if b == 0 else int(torch.randint(1, max_steps + 1, (1,), generator=gen))
        terminated = b % 2 == 0
        final_value = float(torch.randn(1, generator=gen, dtype=torch.float64))
        rows = []
        for _ in range(n_steps):
            n_act = 1 if b == 1 else int(torch.randint(1, max_tokens + 1, (1,), generator=gen))
            row = {
                "reward": float(torch.randn(1, generator=gen, dtype=torch.float64)),
                "value": float(torch.randn(1, generator=gen, dtype=torch.float64)),
                "response_mask": [1] * n_act + [0] * (max_tokens - n_act),
            }
            rows.append(row)
            rewards.append(row["reward"])
            values.append(row["value"])
            step_tokens.append(n_act)
        rows += [None] * (max_steps - n_steps)
        table.append((rows, terminated, final_value))
        traj_steps.append(n_steps)
        last_values.append(0.0 if terminated else final_value)

    expected = steppo_dense_oracle(table, gamma, lam)
    f64 = dict(dtype=torch.float64)
    adv, _ = step_gae(
        torch.tensor(rewards, **f64),
        torch.tensor(values, **f64),
        offsets(traj_steps),
        gamma=gamma,
        lam=lam,
        last_values=torch.tensor(last_values, **f64),
    )
    token_adv = segment_broadcast(whiten(adv), offsets(step_tokens))
    close(token_adv, expected, torch.float64)
