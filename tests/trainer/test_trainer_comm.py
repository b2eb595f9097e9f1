"""The trainer's communicators (steppo_fast.trainer.comm): one Trainer loop for 1..W ranks.

A single process runs the same ``Trainer.step`` as every rank of a ``torchrun`` job, on a
``LocalComm`` whose collectives return their input exactly. Checked here: the identities
themselves (a mean over one rank is the value, never ``v * w / w``), whitening on one process
(the ``whiten`` op, bit for bit) against the collective float64 path, and one iteration through
a real one-rank gloo ``Comm`` against the same iteration on a ``LocalComm``. The W-rank ==
1-rank equality is tests/trainer/test_distributed.py's.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tolerance import assert_within, sum_error, unit_roundoff
from _trainer_setup import small_cfg

from steppo_fast import whiten
from steppo_fast.trainer.algorithms import compute_targets
from steppo_fast.trainer.comm import (
    LOCAL,
    Comm,
    LocalComm,
    global_traj_ids,
    global_whiten,
    init_from_env,
    rank_groups,
)
from steppo_fast.trainer.loop import Trainer


def _inexact_mean_value() -> tuple[float, float]:
    """(v, w) with ``v * w / w != v`` in float64 (the rounding a sum-based mean would add)."""
    for i in range(1, 1000):
        v, w = 0.1 * i, 3.0 + i % 7
        if v * w / w != v:
            return v, w
    raise AssertionError("no inexact pair found")


def test_local_comm_collectives_are_exact_identities():
    comm = LocalComm()
    assert (comm.rank, comm.world, comm.is_main, comm.can_shard) == (0, 1, True, False)
    assert comm.device == torch.device("cpu") and LOCAL == comm
    values = [3, 0.1, -2.5e-300, 7e300]
    for op in (comm.all_reduce_sum, comm.all_reduce_max):
        out = op(values)
        assert out == [float(v) for v in values] and all(type(v) is float for v in out)
    v, w = _inexact_mean_value()
    assert comm.mean([v, 0.25], weight=w) == [v, 0.25]  # exactly the rank's own mean
    assert comm.mean([v], weight=0) == [v]
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert rank_groups(5, comm) == [0, 1, 2, 3, 4]
    assert global_traj_ids(rank_groups(3, comm), 2).tolist() == list(range(6))


def test_local_comm_leaves_gradients_and_parameters_alone_and_raises_through_together():
    comm = LocalComm()
    lin = torch.nn.Linear(3, 2)
    lin(torch.randn(4, 3)).sum().backward()
    grads = [p.grad for p in lin.parameters()]
    before = [g.clone() for g in grads]
    params = [p.detach().clone() for p in lin.parameters()]
    comm.all_reduce_grads(list(lin.parameters()))
    comm.broadcast_params(lin)
    comm.barrier()
    for p, g, g0, p0 in zip(lin.parameters(), grads, before, params):
        assert p.grad is g and torch.equal(g, g0) and torch.equal(p.detach(), p0)
    ran = []
    comm.together(lambda: ran.append(1))
    assert ran == [1]

    def fail():
        raise ValueError("--out: a file")

    with pytest.raises(ValueError, match="--out: a file"):  # the rank's own exception
        comm.together(fail)


def test_init_from_env_gives_a_local_comm_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") == LocalComm(torch.device("cpu"))


def _z_exact(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """fp64 ``(x - mean) / (std + 1e-8)`` (n >= 2) and the scale of its fp64 error."""
    xd = x.double()
    std = float(xd.std())
    z = (xd - xd.mean()) / (std + 1e-8)
    # mean and std are fp64 sums of n terms of magnitude <= sum|x|; in z units / std
    return z, sum_error(torch.float64, x.numel(), float(xd.abs().sum()), worst=True) / std


@pytest.mark.parametrize("n", [2, 7, 512, 4099])
def test_whitening_on_one_process_is_the_whiten_op_and_agrees_with_the_collective_path(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3.0 + 1.5
    local = LOCAL.whiten(x, "auto")
    assert torch.equal(local, whiten(x))  # the op itself, bit for bit
    generic = global_whiten(x, LOCAL)  # float64 sums through the identity collectives
    assert local.dtype == generic.dtype == torch.float32
    z, fp64_err = _z_exact(x)
    # each accumulates in fp64 and rounds once into fp32 (steppo_fast.reference.whiten; the
    # global path by construction): within u32 |z| + the fp64 error of the exact result
    bound = unit_roundoff(torch.float32) * z.abs() + 2 * fp64_err + torch.finfo(torch.float32).tiny
    assert_within(local, z, bound, "whiten op")
    assert_within(generic, z, bound, "global_whiten")


def test_one_process_whitens_with_the_op(monkeypatch):
    """The fused op (its backend chosen by ``impl``), not the float64 collective path (which
    rounds to the same fp32 values on most inputs, so only a call count tells them apart)."""
    import steppo_fast.trainer.comm as C

    calls = []
    monkeypatch.setattr(C, "whiten", lambda x, impl: calls.append(impl) or whiten(x, impl=impl))
    LOCAL.whiten(torch.arange(4.0), "torch")
    assert calls == ["torch"]


@pytest.mark.parametrize("x", [[], [2.5], [4.0, 4.0, 4.0]], ids=["empty", "one", "constant"])
def test_whitening_degenerate_cases_agree(x):
    x = torch.tensor(x, dtype=torch.float32)
    torch.testing.assert_close(global_whiten(x, LOCAL), LOCAL.whiten(x), atol=0, rtol=0)


def test_critic_targets_whiten_through_the_communicator():
    """``compute_targets(..., comm)`` whitens with ``comm.whiten``: on one process the op."""
    cfg = small_cfg(None, "doors", out="unused").resolved()

    class Spy(LocalComm):
        def whiten(self, x, impl="auto"):
            calls.append(x.numel())
            return super().whiten(x, impl)

    calls = []
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0])
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    batch = type("B", (), {"rewards": rewards, "cu_trajs": torch.tensor([0, 2, 5])})()
    got = compute_targets(cfg, batch, values, Spy())
    assert calls == [5]
    want = compute_targets(cfg, batch, values)  # default communicator: LOCAL
    assert torch.equal(got.advantages, want.advantages)
    assert torch.equal(got.advantages, whiten(got.raw_advantages))


def test_one_iteration_through_a_one_rank_process_group_equals_the_local_one(tmp_path):
    """GRPO (no whitening, so no fp32-vs-fp64 difference): the generic collectives of a real
    one-rank gloo ``Comm`` (float64 all-reduces, the flat gradient all-reduce, weighted means)
    give the parameters of the ``LocalComm`` iteration bit for bit, and the same row up to the
    rounding of ``v * w / w`` (two fp64 roundings)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    local = Trainer(small_cfg(tmp_path / "local", "doors", algo="grpo"))
    row_local = local.step()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        comm = Comm(0, 1, torch.device("cpu"))
        group = Trainer(small_cfg(tmp_path / "group", "doors", algo="grpo", shard="none"), comm)
        assert group.sharded is None and local.sharded is None
        row_group = group.step()
    finally:
        dist.destroy_process_group()
    for a, b in zip(local.models.policy.parameters(), group.models.policy.parameters()):
        assert torch.equal(a, b)
    assert row_local.keys() == row_group.keys() and row_local["ranks"] == 1
    two_roundings = 2 * torch.finfo(torch.float64).eps
    for key, a in row_local.items():
        b = row_group[key]
        if key.endswith("_s") or a is None:
            assert (a is None) == (b is None), key
            continue
        assert math.isclose(a, b, rel_tol=two_roundings, abs_tol=0.0), (key, a, b)
