"""Threads of the C++ kernels: the ``steppo_fast.cpp.set_num_threads`` knob, the parallel
thresholds, and the caller-runs pool (csrc/parallel.h): results on several threads equal the
one-thread results, a loop below a kernel's threshold never reaches the pool, concurrent
callers and fork children work.

Tolerance (parallel vs one thread): both compute the same double-precision sums in a
different association (chunk partials), so their double results differ by at most about
K * eps64 * scale (K entries summed, scale = max |result|); rounding to fp32 can then flip
the last bit: |parallel - serial| <= eps32 * |serial| + K * eps64 * scale."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from _cpp_helpers import requires_cpp
from _csr import offsets

from steppo_fast._defs import StepLossOptions

pytestmark = requires_cpp

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture
def cpu():
    """steppo_fast.cpp with the thread settings restored after the test."""
    import steppo_fast.cpp as cpu
    from steppo_fast import _C

    before = cpu.thread_setting()
    yield cpu
    _C._set_parallel_min(-1)
    cpu.set_num_threads(before)


def run_all(cpu, n_steps: int = 6000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every threaded kernel on one ragged batch (steps of 1..60 tokens, trajectories of
    1..50 steps, one long trajectory): {name: result}."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_traj = torch.randint(1, 51, (n_steps // 25,), generator=gen)
    steps_per_traj = torch.cat([steps_per_traj, torch.tensor([3000])])
    cu_trajs = offsets(steps_per_traj, torch.int64)
    num_steps = int(cu_trajs[-1])
    tokens = torch.randint(1, 61, (num_steps,), generator=gen)
    cu_steps = offsets(tokens, torch.int64)
    num_tokens = int(cu_steps[-1])
    rewards = torch.randn(num_steps, generator=gen)
    values = torch.randn(num_steps, generator=gen)
    x = torch.randn(num_tokens, generator=gen) * 3 + 1
    logp = -torch.rand(num_tokens, generator=gen)
    old = logp + 0.1 * torch.randn(num_tokens, generator=gen)
    adv, ret = cpu.step_gae(rewards, values, cu_trajs, gamma=0.99, lam=0.95)
    out = {
        "gae_adv": adv,
        "gae_ret": ret,
        "returns": cpu.discounted_returns(rewards, cu_trajs, gamma=0.97),
        "whiten": cpu.whiten(x),
        "whiten_weighted": cpu.whiten(x, weight=(x > 0).float()),
        "broadcast": cpu.segment_broadcast(values, cu_steps),
        "segment_sum": cpu.segment_sum(x, cu_steps),
        "segment_mean": cpu.segment_mean(x, cu_steps),
    }
    for level in ("step", "token", "trajectory"):
        lp = logp.clone().requires_grad_(True)
        options = StepLossOptions(ratio_level=level, agg="token-mean")
        loss, stats = cpu.step_policy_loss(lp, old, adv, cu_steps, cu_trajs, None, None, options)
        (grad,) = torch.autograd.grad(loss, lp)
        out[f"loss_{level}"] = loss.detach().reshape(1)
        out[f"loss_{level}_stats"] = stats.packed.float()
        out[f"loss_{level}_grad"] = grad
    xw = torch.randn(num_steps, generator=gen, requires_grad=True)
    (gw,) = torch.autograd.grad((cpu.whiten(xw) * values).sum(), xw)
    out["whiten_grad"] = gw
    return out


def assert_same_up_to_association(got: dict, want: dict, reduced: int) -> None:
    for name, w in want.items():
        scale = float(w.abs().max()) if w.numel() else 0.0
        atol = reduced * EPS64 * scale
        torch.testing.assert_close(got[name], w, rtol=EPS32, atol=atol, msg=name)


def test_set_num_threads_rejects_bad_values(cpu):
    for bad in (True, 1.5, "2", [2]):
        with pytest.raises(ValueError, match=r"^n: thread count must be an int or None"):
            cpu.set_num_threads(bad)
    for bad in (-1, 1 << 17):
        with pytest.raises(ValueError, match=r"^n: thread count must be in \[1, 65536\]"):
            cpu.set_num_threads(bad)


def test_thread_count_follows_torch_until_set(cpu):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu.thread_setting() is None and cpu.get_num_threads() == 1
        torch.set_num_threads(2)
        assert cpu.get_num_threads() == 2
        cpu.set_num_threads(3)
        assert cpu.thread_setting() == 3 and cpu.get_num_threads() == 3
        with cpu.num_threads(1):
            assert cpu.get_num_threads() == 1 and torch.get_num_threads() == 2
        assert cpu.get_num_threads() == 3
        cpu.set_num_threads(None)
        assert cpu.thread_setting() is None and cpu.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_results_equal_one_thread_results(cpu, threads):
    """Every loop forced onto the pool (threshold 0): same results as one thread. Repeated
    until pool workers have run chunks (the caller may finish a loop before a worker wakes)."""
    from steppo_fast import _C

    with cpu.num_threads(1):
        want = run_all(cpu)
    reduced = max(w.numel() for w in want.values())
    _C._set_parallel_min(0)
    regions0, chunks0 = _C._pool_stats()
    with cpu.num_threads(threads):
        for _ in range(200):
            assert_same_up_to_association(run_all(cpu), want, reduced)
            if _C._pool_stats()[1] > chunks0:
                break
    regions, chunks = _C._pool_stats()
    assert regions > regions0
    assert chunks > chunks0, "no pool worker ran a chunk in 200 tries (machine overloaded?)"


def test_small_inputs_never_reach_the_pool(cpu):
    """Below every kernel's threshold (2**16 entries) a loop runs on its caller, whatever the
    thread count; at and above it, with 2 threads, it is handed to the pool; with the knob at 1
    thread it never is."""
    from steppo_fast import _C

    n = 30_000
    r, v = torch.randn(n), torch.randn(n)
    cu = torch.tensor([0, n // 2, n])
    with cpu.num_threads(2):
        before = _C._pool_stats()[0]
        cpu.step_gae(r, v, cu)
        cpu.whiten(r)
        cpu.segment_broadcast(v[:2], cu)
        cpu.segment_sum(r, cu)
        assert _C._pool_stats()[0] == before
        big = 1 << 17
        cpu.whiten(torch.randn(big))
        assert _C._pool_stats()[0] > before
    with cpu.num_threads(1):
        before = _C._pool_stats()[0]
        run_all(cpu)  # ~200k tokens: the token-level loops are above their threshold
        cpu.whiten(torch.randn(1 << 18))
        assert _C._pool_stats()[0] == before


def test_concurrent_callers_get_their_own_results(cpu):
    """Two Python threads calling kernels at once (torch releases the GIL in ops): one gets
    the pool, the other runs serially; both results are right and nothing deadlocks."""
    from steppo_fast import _C

    with cpu.num_threads(1):
        want = [run_all(cpu, seed=s) for s in (1, 2)]
    reduced = max(w.numel() for w in want[0].values())
    _C._set_parallel_min(0)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                assert_same_up_to_association(run_all(cpu, seed=i + 1), want[i], reduced)
        except Exception as e:  # reported below
            errors.append(e)

    with cpu.num_threads(2):
        workers = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "deadlock: a caller never returned"
    assert not errors, errors


FORK_SCRIPT = r"""
import os, sys, torch
import steppo_fast.cpp as cpu
from steppo_fast import _C
_C._set_parallel_min(0)
cpu.set_num_threads(2)
x = torch.randn(50_000)
want = cpu.whiten(x)  # starts the pool's worker in the parent
pid = os.fork()
if pid == 0:
    ok = all(torch.allclose(cpu.whiten(x), want, rtol=1e-6, atol=1e-6) for _ in range(20))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_runs_threaded_kernels():
    """A fork child (e.g. a DataLoader worker) inherits no pool threads: its parallel loops
    start a fresh pool instead of waiting on the parent's workers."""
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
