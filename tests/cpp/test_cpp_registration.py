"""The C++ kernels as registered torch ops: ``torch.library.opcheck`` (schema, fake kernel,
autograd registration, AOT dispatch) for every op, and ``torch.compile(fullgraph=True)``
through the ops with their fake kernels and autograd formulas."""

import pytest
import torch
from _cpp_helpers import requires_cpp
from _csr import offsets

pytestmark = requires_cpp


def _ops():
    import steppo_fast.cpp  # noqa: F401  (registers fake kernels and autograd)

    return torch.ops.steppo_fast


def sample_args():
    gen = torch.Generator().manual_seed(0)
    cu_trajs = offsets([2, 0, 3])
    cu_steps = offsets([1, 3, 2, 1, 2])
    a = int(cu_steps[-1])

    def x(n, grad=False):
        return torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=grad)

    weight = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    return {
        "step_gae": [
            (x(5), x(5), cu_trajs, 0.9, 0.8, x(3)),
            (x(5), x(5), cu_trajs, 1.0, 1.0, None),
        ],
        "discounted_returns": [(x(5, True), cu_trajs, 0.9, x(3, True))],
        "segment_sum": [(x(a, True), cu_steps)],
        "segment_mean": [(x(a, True), cu_steps)],
        "segment_broadcast": [(x(5, True), cu_steps)],
        "segment_mean_backward": [(x(5), cu_steps)],
        "whiten": [(x(5, True), weight, 1e-6), (x(5, True), None, 1e-8)],
        "whiten_backward": [(x(5), x(5), weight, 1e-6)],
        "group_advantages": [
            (x(6, True), torch.tensor([3, 1, 3, 3, 1, 7]), mode, 1e-6)
            for mode in ("grpo", "dr_grpo", "rloo")
        ],
        "group_advantages_backward": [(x(6), x(6), torch.tensor([3, 1, 3, 3, 1, 7]), "grpo", 1e-6)],
        "step_policy_loss": [
            (
                x(a, True),
                x(a),
                x(5),
                cu_steps,
                cu_trajs,
                weight,
                x(a),
                "step",
                1.0,
                0.2,
                0.2,
                3.0,
                "traj-mean",
                0.1,
                "k3",
                True,
            ),
            (
                x(a, True),
                x(a),
                x(5),
                cu_steps,
                None,
                None,
                None,
                "token",
                0.5,
                0.2,
                0.3,
                None,
                "step-mean",
                0.0,
                "k1",
                True,
            ),
        ],
    }


@pytest.mark.parametrize("name", list(sample_args()))
def test_opcheck(name):
    op = getattr(_ops(), name).default
    for args in sample_args()[name]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_with_backward():
    import steppo_fast.cpp as cpu

    def pipeline(rewards, values, logp, old_logp, cu_trajs, cu_steps):
        adv, _ = cpu.step_gae(rewards, values, cu_trajs, gamma=0.9, lam=0.8)
        adv = cpu.whiten(adv)
        token_adv = cpu.segment_broadcast(adv, cu_steps)
        ratio = cpu.segment_mean(logp - old_logp, cu_steps)
        return (cpu.segment_sum(token_adv * logp, cu_steps) * ratio.exp()).sum()

    gen = torch.Generator().manual_seed(1)
    cu_trajs, cu_steps = offsets([2, 3]), offsets([1, 3, 2, 1, 2])
    rewards, values = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    old = torch.randn(9, generator=gen)
    logp = torch.randn(9, generator=gen, requires_grad=True)
    eager = pipeline(rewards, values, logp, old, cu_trajs, cu_steps)
    (grad_eager,) = torch.autograd.grad(eager, logp)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    out = compiled(rewards, values, logp, old, cu_trajs, cu_steps)
    (grad_compiled,) = torch.autograd.grad(out, logp)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)
