"""Triton segmented scans (step_gae, discounted_returns and its backward) under the
interpreter, against the torch reference: random CSR layouts, multi-chunk carries, token-level
GAE over the action axis, registered-op checks."""

import pytest
import torch
from _csr import offsets
from _tolerance import assert_within, gae_error, scan_error, unit_roundoff
from steppo_fast.kernels.scan import ops as scan_ops

from steppo_fast import discounted_returns, step_gae

LAYOUTS = {
    "mixed": [3, 1, 0, 17, 5, 1, 40, 2],  # empty and one-step trajectories, odd sizes
    "one_step": [1] * 29,
    "long": [2600, 2],  # several 1024-element chunks: aggregate + carry + apply kernels
    "empty_batch": [],
}


F32 = torch.float32


def gae_bounds(rewards, values, cu, gamma, lam, last, adv, ret):
    """Elementwise bounds on |triton - torch| for fp32 step_gae (both evaluate it in fp32: twice
    ``gae_error``); the return R = A + V adds one rounding of |R| on each side."""
    a = 2 * gae_error(F32, rewards, values, cu, gamma, lam, last, adv)
    return a, a + 2 * unit_roundoff(F32) * ret.double().abs()


def close(got, want, bound, what):
    assert got.dtype == want.dtype == F32
    assert_within(got, want, bound, what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_step_gae_matches_reference(layout, dtype, bootstrap):
    cu = offsets(LAYOUTS[layout])
    n, b = int(cu[-1]), cu.numel() - 1
    rewards, values = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    last = torch.randn(b).to(dtype) if bootstrap else None
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        kw = dict(gamma=gamma, lam=lam, last_values=last)
        adv_t, ret_t = step_gae(rewards, values, cu, impl="triton", **kw)
        adv_r, ret_r = step_gae(rewards, values, cu, impl="torch", **kw)
        bounds = gae_bounds(rewards, values, cu, gamma, lam, last, adv_r, ret_r)
        close(adv_t, adv_r, bounds[0], "advantages")
        close(ret_t, ret_r, bounds[1], "returns")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_discounted_returns_forward_backward_match_reference(layout, dtype):
    cu = offsets(LAYOUTS[layout], torch.int64)
    n, b = int(cu[-1]), cu.numel() - 1
    rewards, last = torch.randn(n).to(dtype), torch.randn(b).to(dtype)
    grad_out = torch.randn(n)
    results = []
    for impl in ("triton", "torch"):
        r, lv = rewards.clone().requires_grad_(), last.clone().requires_grad_()
        out = discounted_returns(r, cu, gamma=0.97, last_values=lv, impl=impl)
        (out * grad_out).sum().backward()
        results.append((out.detach(), r.grad.float(), lv.grad.float()))
    # G_t = r_t + gamma G_{t+1}: 2 roundings of operands <= |r_t| + |G_t| + |r_t|; its backward
    # runs the transposed (forward) scan of grad_out; d last = gamma x that scan's last entry.
    (out, d_r, d_last), want = results[1], results[1]
    twice = 2 * scan_error(F32, 2 * rewards.double().abs() + out.double().abs(), cu, 0.97)
    d_r_bound = 2 * scan_error(
        F32, 2 * grad_out.double().abs() + d_r.double().abs(), cu, 0.97, reverse=False
    )
    nonempty = cu[1:] > cu[:-1]
    d_last_bound = torch.zeros(b, dtype=torch.float64)
    d_last_bound[nonempty] = 0.97 * d_r_bound[cu[1:].long()[nonempty] - 1]
    d_last_bound += 2 * unit_roundoff(F32) * d_last.double().abs()
    for got, ref, bound, what in zip(
        results[0], want, (twice, d_r_bound, d_last_bound), ("G", "d rewards", "d last")
    ):
        close(got, ref, bound, what)


@pytest.mark.parametrize("reverse", [True, False])
def test_many_chunks_exercise_the_carry_loop(reverse):
    """Small blocks: 61 chunks over a 3-tile carry scan, trajectories straddling chunks."""
    cu = offsets([300, 1, 0, 190, 7, 470])
    n = int(cu[-1])
    x, v, last = torch.randn(n), torch.randn(n), torch.randn(cu.numel() - 1)
    got, got_ret = scan_ops.linear_scan(
        x,
        cu,
        decay=0.9 * 0.98,
        gamma=0.9,
        values=v,
        last_values=last,
        reverse=reverse,
        block=16,
        carry_block=32,
    )
    if reverse:
        want, want_ret = step_gae(x, v, cu, gamma=0.9, lam=0.98, last_values=last, impl="torch")
        bound, ret_bound = gae_bounds(x, v, cu, 0.9, 0.98, last, want, want_ret)
        close(got_ret, want_ret, ret_bound, "returns")
    else:  # forward scan y_t = x_t + decay y_{t-1}: the transposed recurrence, loop oracle
        want = torch.empty(n)
        for s in range(cu.numel() - 1):
            acc = 0.0
            for t in range(int(cu[s]), int(cu[s + 1])):
                acc = float(x[t]) + 0.9 * 0.98 * acc
                want[t] = acc
        # one fp32 evaluation (2 roundings of operands <= 2|x_t| + |y_t| per step) against the
        # fp64 loop rounded once to fp32
        magnitude = 2 * x.double().abs() + want.double().abs()
        bound = scan_error(F32, magnitude, cu, 0.9 * 0.98, reverse=False)
        bound = bound + unit_roundoff(F32) * want.double().abs()
    close(got, want, bound, "scan")


def test_token_level_gae_over_the_action_axis():
    """Token-level GAE: the same kernel on token rewards/values with cu_steps[cu_trajs]."""
    cu_steps = offsets([2, 3, 1, 4, 1])
    cu_trajs = torch.tensor([0, 2, 5], dtype=torch.int32)
    token_cu = cu_steps[cu_trajs.long()]
    a = int(cu_steps[-1])
    r, v = torch.randn(a), torch.randn(a)
    got = step_gae(r, v, token_cu, gamma=0.99, lam=0.9, impl="triton")
    want = step_gae(r, v, token_cu, gamma=0.99, lam=0.9, impl="torch")
    bounds = gae_bounds(r, v, token_cu, 0.99, 0.9, None, *want)
    for g, w, bound in zip(got, want, bounds):
        close(g, w, bound, "token-level GAE")


def test_registered_ops_pass_opcheck_and_trace_fullgraph():
    cu = offsets([3, 1, 4])
    r, v, last = torch.randn(8), torch.randn(8), torch.randn(3)
    torch.library.opcheck(scan_ops.step_gae_op, (r, v, cu, last, 0.9, 0.8))
    torch.library.opcheck(scan_ops.step_gae_op, (r, v, cu, None, 1.0, 1.0))
    rg = r.clone().requires_grad_()
    lg = last.clone().requires_grad_()
    torch.library.opcheck(scan_ops.discounted_returns_op, (rg, cu, lg, 0.9))
    torch.library.opcheck(scan_ops.discounted_returns_backward_op, (r, cu, 0.9))

    def f(rewards, lv):
        return scan_ops.discounted_returns_op(rewards, cu, lv, 0.9).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(rg, lg)
    out.backward()
    r2, l2 = r.clone().requires_grad_(), last.clone().requires_grad_()
    discounted_returns(r2, cu, gamma=0.9, last_values=l2, impl="torch").square().sum().backward()
    torch.testing.assert_close(rg.grad, r2.grad)
    torch.testing.assert_close(lg.grad, l2.grad)
