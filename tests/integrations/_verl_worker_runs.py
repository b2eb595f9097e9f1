"""Runs verl 0.9's real engine workers in-process on CPU and saves what they produced.

Usage: ``python _verl_worker_runs.py {actor,critic} OUT.pt`` (tests/integrations/
test_verl_workers.py runs it once per test module in a subprocess: the CPU platform, the
environment variables and the gloo process group stay out of the pytest process).

The model is a tiny Qwen2 built from a config and saved to a temp dir (no download). Workers
are verl's own: ``ActorRolloutRefWorker`` (role "actor": ``init_model``, ``compute_log_prob``,
``update_actor``) and the critic ``TrainingWorker`` (``infer_batch``, ``train_mini_batch``)
with the loss the v1 trainer installs through ``set_loss_fn`` (here the plugin's).
Data go in the way verl's trainer sends them (left/right padded -> no-padding TensorDict).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["VERL_PLATFORM"] = "cpu"
os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # verl registers engines for cuda / npu only
os.environ["VERL_USE_EXTERNAL_MODULES"] = (
    "_verl_cpu_platform,steppo_fast.integrations.verl,steppo_fast.integrations.verl_critic"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# verl's Worker reads its rank from the environment (Ray sets these for real workers)
for key, value in dict(
    RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
).items():
    os.environ[key] = value
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

torch.set_num_threads(1)

PROMPT, LENGTH, VOCAB = 3, 10, 48
# response masks: one run per row (rows layout) / several runs per row (multi-turn rows)
MASKS = {
    "rows": [[1] * 4 + [0] * 6, [1] * 7 + [0] * 3, [1] * 2 + [0] * 8, [1] * 10],
    "multi": [
        [1, 1, 1, 0, 0, 1, 1, 0, 1, 1],
        [1, 1, 0, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 1, 1, 0],
        [1, 0, 1, 1, 1, 0, 0, 1, 1, 1],
    ],
}


def build_model_dir(scratch: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(scratch, "qwen2")
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def compose(overrides):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def rows(layout: str):
    """(DataProto tensors dict, response_mask) of a 4-row batch, right-padded after the last
    action token (attention 0 there), prompt of 3 tokens."""
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor(MASKS[layout], dtype=torch.long)
    rows_, length = mask.shape
    last = torch.tensor([int(r.nonzero().max()) + 1 for r in mask])
    attention = torch.ones(rows_, PROMPT + length, dtype=torch.long)
    for r in range(rows_):
        attention[r, PROMPT + int(last[r]) :] = 0
    prompts = torch.randint(1, VOCAB, (rows_, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (rows_, length), generator=g) * attention[:, PROMPT:]
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "response_mask": mask,
    }
    return tensors, mask


def step_advantages(mask):
    """+1 / -1 alternating per step (constant on the step's tokens), 0 off steps."""
    import steppo_fast.integrations._verl_rows as vr

    steps = vr.steps_from_response_mask(mask)
    adv = torch.zeros(mask.numel())
    signs = torch.tensor([1.0 if s % 2 == 0 else -1.0 for s in range(steps.num_steps)])
    lengths = (steps.cu_steps[1:] - steps.cu_steps[:-1]).long()
    adv[steps.token_index] = torch.repeat_interleave(signs, lengths)
    return adv.view(mask.shape)


def to_td(tensors, **meta):
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(DataProto.from_dict(tensors=dict(tensors)).to_tensordict())
    tu.assign_non_tensor(td, temperature=1.0, **meta)
    return td


def padded(td, output, key):
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(tu.get(output, key), td).float()


def scalar_metrics(output):
    from verl.utils import tensordict_utils as tu

    out = {}
    for key, value in tu.get(output, "metrics").items():
        value = value[0] if isinstance(value, list) else value
        value = getattr(value, "value", value)
        out[key] = float(value)
    return out


FP32 = "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"


def run_actor(model_dir: str) -> dict:
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.losses import ppo_loss

    cfg = compose(
        [
            f"actor_rollout_ref.model.path={model_dir}",
            "+actor_rollout_ref.model.load_tokenizer=False",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            "actor_rollout_ref.model.use_remove_padding=True",
            "actor_rollout_ref.actor.strategy=fsdp2",
            FP32,
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.n=1",
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
            "actor_rollout_ref.actor.clip_ratio_low=0.2",
            "actor_rollout_ref.actor.clip_ratio_high=0.2",
            "actor_rollout_ref.actor.use_kl_loss=False",
            "actor_rollout_ref.actor.entropy_coeff=0",
            "actor_rollout_ref.actor.optim.lr=3e-3",
            "actor_rollout_ref.actor.optim.weight_decay=0",
            "actor_rollout_ref.actor.policy_loss.loss_mode=steppo",
        ]
    )
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    actor_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    results = {}
    for layout in ("rows", "multi"):
        tensors, mask = rows(layout)
        adv = step_advantages(mask)
        for loss_mode in ("steppo", "gspo"):
            worker.actor.reset()  # the same initial weights for every run
            cfg.actor_rollout_ref.actor.policy_loss.loss_mode = loss_mode
            config = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
            config.model_config = actor_config.model_config
            worker.set_loss_fn(partial(ppo_loss, config=config))

            def log_probs(tensors=tensors):
                td = to_td(tensors, calculate_entropy=False, compute_loss=False)
                return padded(td, worker.compute_log_prob(td), "log_probs")

            old = log_probs()
            run = {"old": old, "logp": [], "metrics": []}
            for _ in range(2):  # two updates against the same old log-probs (two PPO epochs)
                td = to_td(
                    {**tensors, "old_log_probs": old, "advantages": adv},
                    calculate_entropy=False,
                    global_batch_size=4,
                    mini_batch_size=4,
                    epochs=1,
                    seed=1,
                    dataloader_kwargs={"shuffle": False},
                    compute_loss=True,
                )
                run["metrics"].append(scalar_metrics(worker.update_actor(td)))
                run["logp"].append(log_probs())
            results[(layout, loss_mode)] = run
        results[(layout, "mask")] = mask
        results[(layout, "adv")] = adv
    return results


def _sdpa_value_model(local_path, torch_dtype, model_config, trust_remote_code):
    """verl's load_valuehead_model asks for flash_attention_2 (CUDA only): the same token
    classification head with sdpa, for this CPU test only."""
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        local_path,
        torch_dtype=torch_dtype,
        config=model_config,
        attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
    )


def run_critic(model_dir: str) -> dict:
    from functools import partial

    import verl.utils.model

    verl.utils.model.load_valuehead_model = _sdpa_value_model  # imported by name at call time

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    from steppo_fast.integrations.verl_critic import step_value_loss

    cfg = compose(
        [
            f"actor_rollout_ref.model.path={model_dir}",
            "critic.enable=True",
            "critic.strategy=fsdp2",
            f"critic.model.path={model_dir}",
            "+critic.model.load_tokenizer=False",
            "+critic.model.override_config.attn_implementation=sdpa",
            "critic.model.use_remove_padding=True",
            "+critic.fsdp.mixed_precision.param_dtype=fp32",
            "critic.ppo_mini_batch_size=4",
            "critic.ppo_micro_batch_size_per_gpu=2",
            "critic.loss_agg_mode=seq-mean-token-mean",
            "critic.cliprange_value=100.0",
            "critic.optim.lr=1e-2",
            "critic.optim.weight_decay=0",
        ]
    )
    critic_cfg = omega_conf_to_dataclass(cfg.critic)
    # as verl's v1 trainer (trainer_base.init_workers) sets them
    critic_cfg.engine.infer_max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
    critic_cfg.engine.max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
    worker = TrainingWorker(
        config=TrainingWorkerConfig(
            model_type="value_model",
            model_config=critic_cfg.model,
            engine_config=critic_cfg.engine,
            optimizer_config=critic_cfg.optim,
            checkpoint_config=critic_cfg.checkpoint,
        )
    )
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import value_loss as installed_value_loss

    import steppo_fast.integrations._verl_rows as vr
    import steppo_fast.integrations.verl_critic as vc

    verl_value_loss = vc._saved[("verl.workers.utils.losses", "value_loss")]  # verl's own
    tensors, mask = rows("multi")
    steps = vr.steps_from_response_mask(mask)
    step_returns = 2.0 + torch.arange(steps.num_steps, dtype=torch.float32)  # above the values
    returns = torch.zeros(mask.numel())
    lengths = (steps.cu_steps[1:] - steps.cu_steps[:-1]).long()
    returns[steps.token_index] = torch.repeat_interleave(step_returns, lengths)
    returns = returns.view(mask.shape)
    boundary = torch.zeros(mask.shape, dtype=torch.bool)
    boundary[steps.step_row, steps.step_start] = True
    g = torch.Generator().manual_seed(3)
    scrambled = torch.where(boundary, returns, 100 * torch.randn(mask.shape, generator=g))

    def values():
        td = to_td(tensors, compute_loss=False)
        return padded(td, worker.infer_batch(td), "values")

    def train(loss_fn, targets, micro_batch):
        torch.manual_seed(0)  # the value head is not in the checkpoint: same random init
        worker.reset()  # the same initial weights for every run
        worker.set_loss_fn(partial(loss_fn, config=critic_cfg))
        before = values()
        td = to_td(
            {**tensors, "values": before, "returns": targets},
            global_batch_size=4,
            mini_batch_size=4,
            use_dynamic_bsz=False,  # the critic engine's default packs by tokens (one micro-batch)
            micro_batch_size_per_gpu=micro_batch,
            epochs=1,
            seed=1,
            dataloader_kwargs={"shuffle": False},
        )
        output = worker.train_mini_batch(td)
        micro_batches = len(tu.get(output, "metrics")["critic/vf_clipfrac"])
        metrics = scalar_metrics(output)
        return {"before": before, "after": values(), "metrics": metrics, "micro": micro_batches}

    step_run = train(step_value_loss, returns, 2)
    return {
        "mask": mask,
        "returns": returns,
        "scrambled": scrambled,
        "installed_is_step_loss": installed_value_loss is vc.step_value_loss,
        "step": step_run,
        "step_one_micro_batch": train(step_value_loss, returns, 4),
        "step_scrambled": train(step_value_loss, scrambled, 2),
        "verl_scrambled": train(verl_value_loss, scrambled, 2),
        "pipeline": pipeline(step_run["before"], lambda r: train(step_value_loss, r, 2), mask),
    }


def pipeline(critic_values, train, mask):
    """The full-StepPO critic loop as verl's v1 trainer runs it: the critic worker's values ->
    the v1 compute_advantage path (wrapped: adv_estimator=steppo) -> returns -> the critic
    worker trained on them with the step-boundary loss. ``critic_values``: the worker's values
    at the initial weights, which ``train`` resets to before training."""
    import numpy as np
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    rows_ = mask.shape[0]
    rewards = torch.zeros(mask.shape)
    for r in range(rows_):
        rewards[r, int(mask[r].nonzero().max())] = 1.0 + r  # outcome reward on the last token
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask, "values": critic_values},
        non_tensors={"uid": np.array([f"u{r}" for r in range(rows_)], dtype=object)},
    )
    data = compute_advantage_for_multi_trajectories(
        data,
        batch_keys=[f"u{r}_0_0" for r in range(rows_)],
        adv_estimator="steppo",
        gamma=0.95,
        lam=0.9,
        config=AlgoConfig(gamma=0.95, lam=0.9, adv_estimator="steppo"),
    )
    run = train(data.batch["returns"])
    return {
        "rewards": rewards,
        "values": critic_values,
        "advantages": data.batch["advantages"],
        "returns": data.batch["returns"],
        **run,
    }


def main() -> None:
    import shutil

    import torch.distributed as dist
    import verl  # imports the modules named in VERL_USE_EXTERNAL_MODULES

    which, out = sys.argv[1], sys.argv[2]
    scratch = tempfile.mkdtemp(prefix="steppo_verl_workers_")
    try:
        dist.init_process_group(
            "gloo", rank=0, world_size=1, init_method=f"file://{scratch}/process_group"
        )
        model_dir = build_model_dir(scratch)
        result = run_actor(model_dir) if which == "actor" else run_critic(model_dir)
        result["verl_version"] = verl.__version__
        torch.save(result, out)
        dist.destroy_process_group()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
