"""Reference trainer: rollout records and grammar masks, sampler == training log-probs, packed /
padded forward == per-sequence forward, the update loop of every algorithm, gradient
accumulation, resume == uninterrupted."""

import copy
import math

import pytest
import torch
from _tolerance import assert_close_to_oracle, assert_within, sum_error, unit_roundoff
from _trainer_setup import play, register_one_door, tiny_policy
from _trainer_setup import small_cfg as _small_cfg

from steppo_fast import StepBatch, linear_logprobs
from steppo_fast.envs import default_tokenizer, make_env
from steppo_fast.trainer.algorithms import compute_targets
from steppo_fast.trainer.config import ALGOS, TrainConfig
from steppo_fast.trainer.loop import Trainer
from steppo_fast.trainer.masking import masked_logprobs
from steppo_fast.trainer.policy import Critic, build_policy, hidden_states
from steppo_fast.trainer.update import Models, forward, ppo_update, reference_logprobs

pytest.importorskip("transformers")

ATOL = 1e-5  # fp32 (tests/conftest.py TOL[torch.float32]); KV-cached vs packed forward

# A one-door corridor: random success ~23%, so a few episodes already carry a learning signal.
register_one_door("doors1")


def small_cfg(tmp_path, **kw) -> TrainConfig:
    return _small_cfg(tmp_path, "doors1", **kw)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return tiny_policy(tok)


@pytest.fixture(scope="module")
def policy64(policy):
    """The same policy in fp64: the oracle fp32 log-probs and hidden states are measured against
    (within ORACLE_FACTOR x the training path's own fp32 error, ``assert_close_to_oracle``)."""
    return copy.deepcopy(policy).double()


# ----------------------------------------------------------------------------- rollout


def test_rollout_records_are_merged_token_in_token_out(policy, tok):
    res = play(policy, tok)
    env = make_env("doors")
    a = 0
    for traj in res.trajectories:
        steps = traj["steps"]
        assert traj["group"] in range(3) and isinstance(traj["terminated"], bool)
        for t, step in enumerate(steps):
            assert step["prompt_ids"][-1] == tok.act_id
            words = tok.decode(step["action_ids"]).split()
            assert env.grammar.is_complete(words)
            for i, tid in enumerate(step["action_ids"]):  # each token allowed by its stored mask
                assert res.masks[a, tid]
                allowed = env.grammar.allowed_next(words[:i])
                assert set(res.masks[a].nonzero().flatten().tolist()) == {
                    tok.ids[w] for w in allowed
                }
                a += 1
            if t + 1 < len(steps):  # the next prompt extends prompt + action (merged layout)
                nxt = steps[t + 1]["prompt_ids"]
                ctx = step["prompt_ids"] + step["action_ids"]
                assert nxt[: len(ctx)] == ctx and nxt[len(ctx)] == tok.obs_id
        assert len(steps) <= env.max_steps
    assert a == res.masks.shape[0]
    batch = StepBatch.from_trajectories(res.trajectories).validate()
    assert batch.num_seqs == len(res.trajectories)  # one sequence per episode
    assert torch.all(batch.input_ids[batch.value_index] == tok.act_id)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_sampler_logprobs_equal_training_logprobs_under_the_grammar_mask(
    policy, policy64, tok, mode
):
    res = play(policy, tok, env="quest", n=4)
    batch = StepBatch.from_trajectories(res.trajectories)
    train = reference_logprobs(policy, batch, res.masks, 1.0, mode)
    oracle = reference_logprobs(policy64, batch, res.masks, 1.0, mode)
    assert_close_to_oracle(batch.rollout_logp, oracle, train, msg="sampler log-probs")
    # the mask matters: without it the same tokens have (much) lower log-probs
    hidden = hidden_states(policy, batch, mode)
    head = policy.get_output_embeddings().weight
    unmasked = linear_logprobs(hidden[batch.logit_index], head, batch.action_ids)
    assert (batch.rollout_logp - unmasked).min() > 0.1
    # and it renormalises over the allowed tokens
    z = (hidden[batch.logit_index] @ head.T).masked_fill(~res.masks, float("-inf"))
    # log p_i = z_i - lse(z) errs by <= 2u (|z_i| + |lse z|) each; lse of those is exactly 0
    # up to that (sum_i p_i delta_i) plus its own V-term sum of p_i (magnitude 1) and log
    finite = z.masked_fill(~res.masks, 0.0).abs().amax(-1) + torch.logsumexp(z, -1).abs()
    u = unit_roundoff(torch.float32)
    bound = 2 * u * finite + sum_error(torch.float32, z.shape[-1] + 2, 1.0)
    assert_within(torch.logsumexp(torch.log_softmax(z, -1), -1), torch.zeros(len(z)), bound)


def test_sampler_logprobs_equal_linear_logprobs_without_grammar(policy, policy64, tok):
    res = play(policy, tok, env="doors1", grammar=False, n=4)
    assert res.masks is None
    batch = StepBatch.from_trajectories(res.trajectories)
    logps = []
    for lm in (policy, policy64):
        hidden = hidden_states(lm, batch)
        logps.append(
            linear_logprobs(
                hidden[batch.logit_index], lm.get_output_embeddings().weight, batch.action_ids
            )
        )
    assert_close_to_oracle(batch.rollout_logp, logps[1], logps[0], msg="sampler log-probs")


def test_reference_logprobs_use_the_rollout_mask(policy, tok):
    """Old, current and reference log-probs all come from the stored masks: a different model
    under the same masks matches a per-sequence computation done by hand."""
    torch.manual_seed(9)
    other = build_policy(TrainConfig(hidden_size=32, num_heads=2).resolved(), tok).eval()
    res = play(policy, tok, n=3)
    batch = StepBatch.from_trajectories(res.trajectories)
    got = reference_logprobs(other, batch, res.masks, 0.7, "padded")
    wants = []
    for lm in (other, copy.deepcopy(other).double()):  # by hand in fp32, and the fp64 oracle
        want, a = [], 0
        for traj in res.trajectories:
            last = traj["steps"][-1]
            ids = torch.tensor(last["prompt_ids"] + last["action_ids"])
            logits = lm(input_ids=ids[None]).logits[0] / 0.7
            for step in traj["steps"]:
                for i, tid in enumerate(step["action_ids"]):
                    pos = len(step["prompt_ids"]) + i - 1
                    z = logits[pos].masked_fill(~res.masks[a], float("-inf"))
                    want.append(torch.log_softmax(z, -1)[tid])
                    a += 1
        wants.append(torch.stack(want).detach())
    assert_close_to_oracle(got, wants[1], wants[0], msg="reference log-probs")


def test_masked_logprobs_gradient_and_entropy():
    torch.manual_seed(0)
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 7) < 0.6
    mask[:, 2] = True
    targets = torch.full((5,), 2)
    torch.autograd.gradcheck(
        lambda h, w: masked_logprobs(h, w, targets, mask, temperature=1.3), (h, w)
    )
    logp, ent = masked_logprobs(h, w, targets, mask)
    p = torch.softmax((h @ w.T).masked_fill(~mask, float("-inf")), -1)
    want = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    torch.testing.assert_close(ent, want)
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize(("mode", "bucket"), [("padded", 8192), ("padded", 100), ("packed", 0)])
@pytest.mark.parametrize("layout", ["rows", "merged"])
def test_batch_forward_equals_per_sequence_forward(policy, policy64, tok, mode, bucket, layout):
    """Padded (one bucket, or many small buckets of sorted lengths) and packed forwards compute
    each sequence exactly as alone: nothing leaks between sequences or through the padding."""
    res = play(policy, tok, n=4)
    batch = StepBatch.from_trajectories(res.trajectories, layout=layout)
    got = hidden_states(policy, batch, mode, bucket_tokens=bucket)
    assert got.shape == (batch.num_tokens, policy.config.hidden_size)
    for r in range(batch.num_seqs):
        s, e = int(batch.cu_seqlens[r]), int(batch.cu_seqlens[r + 1])
        alone, oracle = (
            lm.base_model(input_ids=batch.input_ids[None, s:e]).last_hidden_state[0].detach()
            for lm in (policy, policy64)
        )
        assert_close_to_oracle(got[s:e].detach(), oracle, alone, msg=f"sequence {r}")


def test_merged_layout_encodes_fewer_tokens_with_equal_logprobs(policy, policy64, tok):
    res = play(policy, tok, n=6)
    merged = StepBatch.from_trajectories(res.trajectories, layout="auto")
    rows = StepBatch.from_trajectories(res.trajectories, layout="rows")
    assert merged.num_actions == rows.num_actions and merged.num_steps == rows.num_steps
    mean_steps = merged.num_steps / merged.num_trajs
    assert rows.num_tokens > merged.num_tokens * max(1.0, mean_steps / 3)
    lm = reference_logprobs(policy, merged, res.masks, 1.0, "padded")
    lr = reference_logprobs(policy, rows, res.masks, 1.0, "padded")
    oracle = reference_logprobs(policy64, rows, res.masks, 1.0, "padded")
    assert_close_to_oracle(lm, oracle, lr, msg="merged vs rows")


# ----------------------------------------------------------------------------- update


def _update_once(tmp_path, tok, budget, algo):
    cfg = small_cfg(
        tmp_path, algo=algo, epochs=1, minibatches=1, micro_batch_tokens=budget, kl_coef=0.0
    ).resolved()
    torch.manual_seed(5)
    pol = build_policy(cfg, tok).eval()
    critic = Critic(pol, shared=False) if cfg.uses_critic else None
    with torch.no_grad():
        critic.head.weight.normal_()  # non-zero values so the value loss has a gradient
    models = Models(pol, critic, None)
    params = list(pol.parameters()) + ([] if critic is None else list(critic.parameters()))
    opt = torch.optim.SGD(params, lr=0.1)
    res = play(pol, tok, env="doors1", n=8, seed=4)
    batch = StepBatch.from_trajectories(res.trajectories)
    units = "token" if algo == "ppo" else "step"
    with torch.no_grad():
        out = forward(models, batch, res.masks, 1.0, units)
    targets = compute_targets(cfg, batch, out.values)
    assert targets.advantages.abs().sum() > 0
    ppo_update(
        cfg,
        models,
        opt,
        batch,
        res.masks,
        targets,
        out.logp,
        None,
        torch.Generator().manual_seed(0),
    )
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("algo", ["steppo", "ppo"])
def test_microbatch_accumulation_equals_one_piece(tmp_path, tok, algo):
    whole = _update_once(tmp_path, tok, 100_000, algo)
    pieces = _update_once(tmp_path, tok, 40, algo)  # about one trajectory per micro-batch
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_training_loop_each_algorithm(tmp_path, algo):
    cfg = small_cfg(tmp_path, algo=algo, eval_every=2, eval_episodes=4)
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.models.policy.parameters()]
    rows = trainer.train(log=lambda s: None)
    after = list(trainer.models.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert [r["iter"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in (
            "success_rate",
            "mean_return",
            "episode_len",
            "tokens",
            "wall_s",
            "policy_loss",
            "clip_frac",
            "kl",
            "entropy",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert r["logp_diff"] < ATOL  # sampler and training log-probs agree
        assert (r["value_loss"] is not None) == (algo in ("steppo", "ppo"))
    assert "eval_success_rate" in rows[-1]
    for name in ("metrics.jsonl", "config.yaml", "checkpoint.pt", "model/config.json"):
        assert (tmp_path / "run" / name).exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = Trainer(small_cfg(tmp_path / "a", iters=3, algo="steppo"))
    rows_a = straight.train(log=lambda s: None)
    first = Trainer(small_cfg(tmp_path / "b", iters=2, algo="steppo"))
    first.train(log=lambda s: None)
    resumed = Trainer(small_cfg(tmp_path / "b", iters=3, algo="steppo", resume=True))
    rows_b = resumed.train(log=lambda s: None)
    for (name, a), b in zip(
        straight.models.policy.state_dict().items(), resumed.models.policy.state_dict().values()
    ):
        assert torch.equal(a, b), name
    for a, b in zip(straight.models.critic.parameters(), resumed.models.critic.parameters()):
        assert torch.equal(a, b)
    timing = {"wall_s", "iter_s", "rollout_s", "update_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows_b
    ]


@pytest.mark.parametrize(("layout", "forward"), [("rows", "padded"), ("auto", "packed")])
def test_training_with_rows_layout_and_packed_forward(tmp_path, layout, forward):
    trainer = Trainer(small_cfg(tmp_path, iters=1, layout=layout, forward=forward))
    row = trainer.train(log=lambda s: None)[-1]
    steps = row["episode_len"] * 16  # 16 episodes
    assert row["sequences"] == (round(steps) if layout == "rows" else 16)
    assert row["logp_diff"] < ATOL and math.isfinite(row["policy_loss"])


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(small_cfg(tmp_path, iters=1)).train(log=lambda s: None)
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(small_cfg(tmp_path, iters=1)).train(log=lambda s: None)
