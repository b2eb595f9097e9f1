"""StepPO through verl 0.9's real engine workers on CPU (actor and critic).

Each module-scoped fixture runs ``_verl_worker_runs.py`` once in a subprocess (verl's workers
in-process there, on the CPU platform fixture ``_verl_cpu_platform``) and the tests check what
came back. Skipped, with the reason, where verl 0.9.x is not installed (CI: .venv-verl).

Tolerance for "equal" actor runs: steppo and gspo compute the same loss in a different order,
so their gradients differ by O(K * eps32) relatively (K <= 10 tokens per row); Adam's update
lr * m / (sqrt(v) + eps) does not scale with the gradient, so after u updates the log-probs
differ by O(u * K * eps32 * max|logp|).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

verl = pytest.importorskip(
    "verl",
    reason="verl is not installed here; CI runs this file in .venv-verl "
    "(scripts/setup_verl_env.sh)",
)
if not verl.__version__.startswith("0.9."):
    pytest.skip(
        f"verl {verl.__version__} is installed; these tests drive verl 0.9.x's workers",
        allow_module_level=True,
    )

from _verl_oracle import oracle_steps  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "_verl_worker_runs.py"
EPS32 = torch.finfo(torch.float32).eps
TOKENS_PER_ROW = 10


def run_workers(which, tmp_path_factory):
    out = tmp_path_factory.mktemp(which) / "out.pt"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), which, str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    return run_workers("actor", tmp_path_factory)


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    return run_workers("critic", tmp_path_factory)


def equal_tol(run, updates):
    return updates * TOKENS_PER_ROW * EPS32 * float(run["old"].abs().max())


def test_actor_numbers_are_finite(actor):
    for layout in ("rows", "multi"):
        for mode in ("steppo", "gspo"):
            run = actor[(layout, mode)]
            assert torch.isfinite(run["old"]).all()
            assert all(torch.isfinite(lp).all() for lp in run["logp"])
            for metrics in run["metrics"]:
                assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
            assert (run["logp"][0] - run["old"]).abs().max() > 0.01  # the updates did something
    steppo = actor[("multi", "steppo")]["metrics"]
    assert {"actor/steppo_num_steps", "actor/steppo_ratio_mean", "actor/pg_clipfrac"} <= set(
        steppo[0]
    )
    assert steppo[0]["actor/steppo_ratio_mean"] == 1.0  # on-policy first update
    assert steppo[1]["actor/steppo_ratio_mean"] != 1.0


def test_actor_one_step_per_row_steppo_equals_gspo(actor):
    steppo, gspo = actor[("rows", "steppo")], actor[("rows", "gspo")]
    assert torch.equal(steppo["old"], gspo["old"])
    for k in range(2):
        diff = (steppo["logp"][k] - gspo["logp"][k]).abs().max()
        assert diff <= equal_tol(steppo, k + 1), (k, float(diff))


def test_actor_multi_step_rows_equal_at_first_update_then_differ(actor):
    """On-policy (ratio 1) the step ratio and gspo's sequence ratio have the same gradient;
    once the policy moved, one ratio per step differs from one ratio per row."""
    steppo, gspo = actor[("multi", "steppo")], actor[("multi", "gspo")]
    first = (steppo["logp"][0] - gspo["logp"][0]).abs().max()
    assert first <= equal_tol(steppo, 1)
    second = (steppo["logp"][1] - gspo["logp"][1]).abs().max()
    assert second > 1000 * equal_tol(steppo, 2)


@pytest.mark.parametrize("layout", ["rows", "multi"])
def test_actor_each_step_moves_with_its_advantage(actor, layout):
    mask, adv = actor[(layout, "mask")], actor[(layout, "adv")]
    run = actor[(layout, "steppo")]
    steps = oracle_steps(mask)
    assert len({float(adv[r, s]) for r, s, _ in steps}) == 2  # both signs present
    for k in range(2):
        for r, s, e in steps:
            moved = float((run["logp"][k][r, s:e] - run["old"][r, s:e]).mean())
            assert moved * float(adv[r, s]) > 0, (k, r, s, moved)


def boundaries(mask):
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for r, s, _ in oracle_steps(mask):
        out[r, s] = True
    return out


def test_critic_installed_through_the_trainers_loss_name(critic):
    assert critic["installed_is_step_loss"]


def test_critic_boundary_values_move_toward_returns(critic):
    mask, returns, run = critic["mask"], critic["returns"], critic["step"]
    at = boundaries(mask)
    before, after = run["before"][at], run["after"][at]
    assert torch.isfinite(run["after"]).all()
    assert ((after - returns[at]).abs() < (before - returns[at]).abs()).all()


def test_critic_only_step_boundaries_are_trained(critic):
    """Targets off the step boundaries (garbage here) change nothing; verl's own value loss on
    the same data trains every action token and ends elsewhere (so this test can fail)."""
    assert not torch.equal(critic["returns"], critic["scrambled"])
    assert torch.equal(critic["step_scrambled"]["before"], critic["step"]["before"])
    assert torch.equal(critic["step_scrambled"]["after"], critic["step"]["after"])
    assert critic["step_scrambled"]["metrics"]["loss"] == critic["step"]["metrics"]["loss"]
    verl_diff = (critic["verl_scrambled"]["after"] - critic["step"]["after"]).abs().max()
    assert verl_diff > 0.01


def test_critic_loss_is_globally_normalised(critic):
    """Two micro-batches or one: the same summed loss (the mini-batch mean, seq-mean-token-mean
    of 0.5 (v_s - R_s)^2 on each step's tokens) and the same update."""
    mask, returns = critic["mask"], critic["returns"]
    run, one = critic["step"], critic["step_one_micro_batch"]
    assert (run["micro"], one["micro"]) == (2, 1)
    v = run["before"].double()
    rows = {}
    for r, s, e in oracle_steps(mask):
        rows.setdefault(r, []).append((e - s) * 0.5 * (float(v[r, s]) - float(returns[r, s])) ** 2)
    expected = sum(sum(x) / float(mask[r].sum()) for r, x in rows.items()) / 4
    # fp32 loss of <= 40 terms: a few eps32 relative
    assert run["metrics"]["loss"] == pytest.approx(expected, rel=64 * EPS32)
    assert one["metrics"]["loss"] == pytest.approx(expected, rel=64 * EPS32)
    tol = TOKENS_PER_ROW * EPS32 * float(run["after"].abs().max())
    assert (run["after"] - one["after"]).abs().max() <= tol


def test_critic_values_to_step_gae_to_critic_update(critic):
    """The full-StepPO critic loop: the critic worker's values go through verl's v1
    compute_advantage path (adv_estimator=steppo) into the returns the worker trains on."""
    from verl.trainer.config import AlgoConfig

    import steppo_fast.integrations.verl as sv

    run, mask = critic["pipeline"], critic["mask"]
    assert torch.equal(run["before"], run["values"])  # trained from the values it produced
    advantages, returns = sv.compute_steppo_advantage(
        token_level_rewards=run["rewards"],
        response_mask=mask,
        config=AlgoConfig(gamma=0.95, lam=0.9),
        values=run["values"],
    )
    assert torch.equal(run["advantages"], advantages) and torch.equal(run["returns"], returns)
    at = boundaries(mask)
    target = run["returns"][at]
    assert ((run["after"][at] - target).abs() < (run["before"][at] - target).abs()).all()
