"""The plugin inside verl's own machinery: the engine workers' actor loss (``ppo_loss``), the
documented config lines composed with verl's ``ppo_trainer`` config, and the documented way of
loading the plugin (``VERL_USE_EXTERNAL_MODULES``). Skipped with a reason where verl is absent."""

import os
import re
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
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from _verl_oracle import oracle_steps, random_mask  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import steppo_fast.integrations.verl as sv  # noqa: E402


def run_ppo_loss(loss_mode, mask, old, new_resp, adv, agg_mode, prompt_len=3):
    """verl's ppo_loss on a batch given as padded [R, L] response tensors: the model output
    is packed like verl's no-padding engines (log-prob of response token t at the position
    before it). Returns (loss, d loss / d new_resp [R, L], metrics)."""
    rows, length = mask.shape
    attention = torch.cat([torch.ones(rows, prompt_len), torch.ones(rows, length)], 1).long()
    new_resp = new_resp.detach().requires_grad_()
    packed = []
    for r in range(rows):
        seq = torch.zeros(prompt_len - 1, dtype=new_resp.dtype)
        packed += [seq, new_resp[r], torch.zeros(1, dtype=new_resp.dtype)]
    data = tu.get_tensordict(
        {
            "prompts": torch.ones(rows, prompt_len, dtype=torch.long),
            "responses": torch.ones(rows, length, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask,
            "old_log_probs": old,
            "advantages": adv,
        },
        {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": rows},
    )
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        use_torch_compile=False,
        loss_agg_mode=agg_mode,
        clip_ratio_low=0.1,
        clip_ratio_high=0.15,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    loss, metrics = ppo_loss(config, {"log_probs": torch.cat(packed)}, data)
    loss.backward()
    return loss.detach(), new_resp.grad, metrics


def random_rows(mask, generator):
    rows, length = mask.shape
    old = -torch.rand(rows, length, generator=generator)
    new = old + 0.2 * torch.randn(rows, length, generator=generator)
    adv = torch.zeros(rows, length)
    for r, s, e in oracle_steps(mask):
        adv[r, s:e] = torch.randn((), generator=generator)
    return old, new, adv


@pytest.mark.parametrize("agg_mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_verl_ppo_loss_with_steppo_equals_gspo(agg_mode):
    """One step per row through verl's actor loss: steppo and gspo agree, value and gradient,
    and the metrics reach verl's Metric aggregation."""
    g = torch.Generator().manual_seed(21)
    mask = random_mask(6, 8, multi_turn=False, generator=g)
    old, new, adv = random_rows(mask, g)
    loss, grad, metrics = run_ppo_loss("steppo", mask, old, new, adv, agg_mode)
    expected, expected_grad, _ = run_ppo_loss("gspo", mask, old, new, adv, agg_mode)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)
    assert {"actor/pg_loss", "actor/pg_clipfrac", "actor/steppo_num_steps"} <= set(metrics)


def test_verl_ppo_loss_multi_turn_rows_equal_one_step_per_row():
    """Multi-turn rows through verl's actor loss (token-mean) equal the same steps one per row."""
    g = torch.Generator().manual_seed(22)
    mask = random_mask(4, 12, multi_turn=True, generator=g)
    old, new, adv = random_rows(mask, g)
    loss, grad, _ = run_ppo_loss("steppo", mask, old, new, adv, "token-mean")
    steps = oracle_steps(mask)
    rows_mask, old_r, new_r, adv_r = (torch.zeros(len(steps), 3) for _ in range(4))
    for k, (r, s, e) in enumerate(steps):
        rows_mask[k, : e - s] = 1
        old_r[k, : e - s], new_r[k, : e - s], adv_r[k, : e - s] = (
            old[r, s:e],
            new[r, s:e],
            adv[r, s:e],
        )
    loss_r, grad_r, _ = run_ppo_loss("steppo", rows_mask, old_r, new_r, adv_r, "token-mean")
    torch.testing.assert_close(loss, loss_r, atol=1e-6, rtol=1e-5)
    for k, (r, s, e) in enumerate(steps):
        torch.testing.assert_close(grad[r, s:e], grad_r[k, : e - s], atol=1e-7, rtol=1e-5)


def documented_overrides():
    """The `key=value` overrides of the tested config block in docs/verl.md."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "verl.md"
    block = doc.read_text().split("test_documented_config_lines", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith("export ")]
    tokens = " ".join(lines).split()
    return [t for t in tokens if re.fullmatch(r"\+?[a-z_][\w.]*=\S+", t)]


def test_documented_config_lines():
    """docs/verl.md's overrides compose with verl's own ppo_trainer config, build verl's config
    dataclasses and resolve to the plugin's loss (with the documented clip range) and estimator."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    overrides = documented_overrides()
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=steppo" in overrides
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=overrides + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"],
        )
    env_vars = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars.VERL_USE_EXTERNAL_MODULES == "steppo_fast.integrations.verl"
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    algorithm = omega_conf_to_dataclass(cfg.algorithm)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (
        3e-4,
        4e-4,
        "seq-mean-token-mean",
    )
    assert actor.use_kl_loss and actor.kl_loss_coef == 1e-3 and actor.kl_loss_type == "low_var_kl"
    assert actor.optim.lr == 1e-6 and algorithm.gamma == 1.0
    loss_fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    assert loss_fn is sv.compute_policy_loss_steppo
    estimator = core_algos.get_adv_estimator_fn(algorithm.adv_estimator)
    assert estimator is sv.compute_steppo_mc_advantage
    # ratios 1.0003 and 1.0005 with A = 1: inside / outside the documented (3e-4, 4e-4) range
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.0003, 1.0003], [1.0005, 1.0005]])).requires_grad_()
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = loss_fn(old, new, torch.ones(2, 2), mask, actor.loss_agg_mode, actor)
    assert metrics["actor/pg_clipfrac"] == 0.5
    assert loss.item() == pytest.approx(-(1.0003 + 1.0004) / 2, rel=1e-6)


def test_loading_through_verl_external_modules_env():
    """The documented loading path: verl imports the plugin itself on `import verl`."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn as adv\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn as loss\n"
        "print(loss('steppo').__module__, adv('steppo_mc').__name__)\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="steppo_fast.integrations.verl")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["steppo_fast.integrations.verl", "compute_steppo_mc_advantage"]
