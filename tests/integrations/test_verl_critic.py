"""steppo_fast.integrations.verl_critic against the real verl 0.9: the compute_advantage wrapper
on the v1 path, the names it replaces, its guards. The wrappers are installed for this module
only (fixture) and removed afterwards, so other test modules see stock verl."""

import importlib
import logging
import sys

import numpy as np
import pytest
import torch

verl = pytest.importorskip(
    "verl",
    reason="verl is not installed here; CI runs this file in .venv-verl "
    "(scripts/setup_verl_env.sh)",
)
if not verl.__version__.startswith("0.9."):
    pytest.skip(
        f"verl {verl.__version__} is installed; verl_critic wraps verl 0.9.x",
        allow_module_level=True,
    )

from _verl_oracle import oracle_steps, random_mask  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import ray_trainer  # noqa: E402
from verl.trainer.ppo.v1 import trainer_base  # noqa: E402
from verl.trainer.ppo.v1 import utils as v1_utils  # noqa: E402
from verl.utils.debug import metrics as debug_metrics  # noqa: E402
from verl.workers.utils import losses  # noqa: E402

import steppo_fast.integrations.verl as sv  # noqa: E402

MODULE = "steppo_fast.integrations.verl_critic"
STOCK = {
    "compute_advantage": ray_trainer.compute_advantage,
    "value_loss": losses.value_loss,
    "calculate_debug_metrics": debug_metrics.calculate_debug_metrics,
}


@pytest.fixture(scope="module")
def vc():
    module = importlib.import_module(MODULE)
    module.install()
    yield module
    module.uninstall()


def test_installed_names(vc):
    assert vc.installed()
    for module in (ray_trainer, v1_utils):
        assert module.compute_advantage.__steppo_original__ is STOCK["compute_advantage"]
    assert losses.value_loss is vc.step_value_loss
    assert trainer_base.value_loss is vc.step_value_loss
    for module in (trainer_base, debug_metrics):
        original = module.calculate_debug_metrics.__steppo_original__
        assert original is STOCK["calculate_debug_metrics"]


def batch(layout, seed, with_ids=False):
    g = torch.Generator().manual_seed(seed)
    rows = 6
    mask = random_mask(rows, 9, multi_turn=layout == "multi", generator=g)
    rewards = torch.zeros(rows, 9)
    for r in range(rows):
        rewards[r, int(mask[r].nonzero().max())] = float(torch.randn((), generator=g))
    tensors = {
        "token_level_rewards": rewards,
        "response_mask": mask,
        "values": torch.randn(rows, 9, generator=g),
        "rm_scores": rewards.clone(),
    }
    non_tensors = {"uid": np.array([f"p{r // 2}" for r in range(rows)], dtype=object)}
    if with_ids:
        non_tensors["traj_uid"] = np.array(["a", "b", "a", "b", "a", "c"], dtype=object)
        non_tensors["step_idx"] = np.array([2, 1, 0, 0, 1, 0], dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def v1_advantage(data, estimator, **kwargs):
    """verl's v1 trainer path: compute_advantage_for_multi_trajectories -> compute_advantage."""
    keys = [f"{uid}_0_{i}" for i, uid in enumerate(data.non_tensor_batch["uid"])]
    config = AlgoConfig(gamma=0.9, lam=0.8, adv_estimator=estimator, **kwargs)
    return v1_utils.compute_advantage_for_multi_trajectories(
        data,
        batch_keys=keys,
        adv_estimator=estimator,
        gamma=config.gamma,
        lam=config.lam,
        num_repeat=1,
        config=config,
    )


@pytest.mark.parametrize("layout,with_ids", [("multi", False), ("rows", True), ("rows", False)])
def test_v1_path_equals_compute_steppo_advantage(vc, layout, with_ids):
    data = batch(layout, 3, with_ids)
    expected = sv.compute_steppo_advantage(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        config=AlgoConfig(gamma=0.9, lam=0.8),
        values=data.batch["values"],
        traj_uid=data.non_tensor_batch.get("traj_uid"),
        step_idx=data.non_tensor_batch.get("step_idx"),
    )
    out = v1_advantage(data, "steppo")
    assert torch.equal(out.batch["advantages"], expected[0])
    assert torch.equal(out.batch["returns"], expected[1])
    legacy = ray_trainer.compute_advantage(  # the legacy RayPPOTrainer's name
        batch(layout, 3, with_ids), "steppo", gamma=0.9, lam=0.8, config=AlgoConfig()
    )
    assert torch.equal(legacy.batch["advantages"], expected[0])
    assert torch.equal(legacy.batch["returns"], expected[1])
    # the advantage is the step's (constant over its tokens), whitened over steps
    steps = oracle_steps(data.batch["response_mask"])
    step_adv = torch.tensor([float(out.batch["advantages"][r, s]) for r, s, _ in steps])
    assert abs(float(step_adv.mean())) < 1e-5 and abs(float(step_adv.std()) - 1) < 1e-4
    for r, s, e in steps:
        assert (out.batch["advantages"][r, s:e] == out.batch["advantages"][r, s]).all()


NON_CRITIC = ["grpo", "rloo", "reinforce_plus_plus", "steppo_mc", "opo", "gpg", "grpo_passk"]


@pytest.mark.parametrize("estimator", NON_CRITIC)
def test_other_estimators_bit_identical(vc, estimator):
    with_wrapper = v1_advantage(batch("multi", 5), estimator)  # the same fresh batch twice
    vc.uninstall()
    try:
        without = v1_advantage(batch("multi", 5), estimator)
    finally:
        vc.install()
    assert torch.equal(with_wrapper.batch["advantages"], without.batch["advantages"])
    assert torch.equal(with_wrapper.batch["returns"], without.batch["returns"])


def test_guards(vc):
    data = batch("multi", 7)
    with pytest.raises(ValueError, match="algorithm.adv_estimator: 'gae'"):
        v1_advantage(data, "gae")
    data.batch.pop("values")
    with pytest.raises(ValueError, match=r"critic.enable=True"):
        v1_advantage(data, "steppo")


def test_install_is_idempotent_and_refuses_foreign_patches(vc):
    vc.install()
    assert ray_trainer.compute_advantage.__steppo_original__ is STOCK["compute_advantage"]
    vc.uninstall()
    assert ray_trainer.compute_advantage is STOCK["compute_advantage"]
    assert (
        losses.value_loss is STOCK["value_loss"] and trainer_base.value_loss is STOCK["value_loss"]
    )
    v1_utils.compute_advantage = lambda *a, **k: None  # someone else's patch
    try:
        with pytest.raises(RuntimeError, match=r"v1.utils.compute_advantage: expected verl's"):
            vc.install()
        assert not vc.installed() and losses.value_loss is STOCK["value_loss"]  # nothing done
    finally:
        v1_utils.compute_advantage = STOCK["compute_advantage"]
        vc.install()


def test_logs_one_line(vc, caplog):
    vc.uninstall()
    with caplog.at_level(logging.INFO, logger=MODULE):
        vc.install()
    records = [r for r in caplog.records if r.name == MODULE]
    assert len(records) == 1 and "compute_advantage" in records[0].getMessage()


def test_version_guard(vc, monkeypatch):
    vc.uninstall()
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    monkeypatch.delitem(sys.modules, MODULE)
    try:
        with pytest.raises(ImportError, match=r"verl 0.10.0 is not supported"):
            importlib.import_module(MODULE)
    finally:
        sys.modules[MODULE] = vc
        monkeypatch.undo()
        vc.install()


def test_debug_metrics_gain_per_step_mismatch(vc):
    g = torch.Generator().manual_seed(2)
    mask = random_mask(4, 10, multi_turn=True, generator=g)
    rollout = -torch.rand(4, 10, generator=g)
    old = rollout + 0.01 * torch.randn(4, 10, generator=g)
    data = DataProto.from_dict(
        tensors={
            "rollout_log_probs": rollout,
            "old_log_probs": old,
            "response_mask": mask,
            "responses": torch.ones(4, 10, dtype=torch.long),
        }
    )
    metrics = trainer_base.calculate_debug_metrics(data)
    assert "training/rollout_probs_diff_mean" in metrics  # verl's own metrics stay
    per_step = [
        abs(float((old[r, s:e] - rollout[r, s:e]).mean())) for r, s, e in oracle_steps(mask)
    ]
    assert metrics["actor/steppo_step_logp_mismatch"] == pytest.approx(np.mean(per_step))
    assert metrics["actor/steppo_step_logp_mismatch_max"] == pytest.approx(max(per_step))


def documented_full_overrides():
    """The `key=value` overrides of docs/verl.md's full-StepPO config block."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "verl.md"
    block = doc.read_text().split("test_documented_full_config", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    exports = [line.split()[1] for line in block.splitlines() if line.startswith("export ")]
    lines = [line for line in block.splitlines() if not line.startswith("export ")]
    tokens = " ".join(lines).split()
    return exports, [t for t in tokens if re.fullmatch(r"\+?[a-z_][\w.]*=\S+", t)]


def test_documented_full_config(vc):
    """docs/verl.md's full-StepPO lines compose with verl's ppo_trainer config, enable the
    critic, and resolve to the plugin's loss, estimator and this module."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.utils import need_critic
    from verl.utils.config import omega_conf_to_dataclass

    exports, overrides = documented_full_overrides()
    assert exports == [f"VERL_USE_EXTERNAL_MODULES={MODULE}"]
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=overrides
            + [
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                "critic.ppo_micro_batch_size_per_gpu=1",
            ],
        )
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == MODULE
    assert cfg.trainer.use_v1 and need_critic(cfg)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    algorithm = omega_conf_to_dataclass(cfg.algorithm)
    assert core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode) is (
        sv.compute_policy_loss_steppo
    )
    assert core_algos.get_adv_estimator_fn(algorithm.adv_estimator) is sv.compute_steppo_advantage
    assert (algorithm.gamma, algorithm.lam) == (1.0, 1.0)
    assert cfg.critic.loss_agg_mode == "seq-mean-token-mean" and cfg.critic.optim.lr == 1e-5
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.optim.lr) == (3e-4, 4e-4, 1e-6)


def test_opt_in_only_through_verl_external_modules():
    """Loading the loss plugin leaves verl's functions alone; naming verl_critic installs the
    wrappers on `import verl` and logs one line."""
    import os
    import subprocess

    code = (
        "import verl\n"
        "from verl.trainer.ppo import ray_trainer\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "print(hasattr(ray_trainer.compute_advantage, '__steppo_original__'),"
        " get_adv_estimator_fn('steppo').__name__)\n"
    )
    outputs = {}
    for name in ("steppo_fast.integrations.verl", MODULE):
        env = dict(os.environ, VERL_USE_EXTERNAL_MODULES=name)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outputs[name] = out
    assert outputs["steppo_fast.integrations.verl"].stdout.split() == [
        "False",
        "compute_steppo_advantage",
    ]
    assert outputs[MODULE].stdout.split() == ["True", "compute_steppo_advantage"]
    assert outputs[MODULE].stderr.count(f"{MODULE}: installed on verl") == 1
    assert f"{MODULE}: installed" not in outputs["steppo_fast.integrations.verl"].stderr
