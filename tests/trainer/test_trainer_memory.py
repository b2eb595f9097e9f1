"""The trainer's memory levers: ``--grad-checkpointing`` (gradients equal the run without it, the
layers really are recomputed), ``--dtype bf16`` (autocast compute with fp32 master weights and
optimizer state; one update agrees with fp32 within a derived bf16 tolerance; no NaN), and
old/reference log-probs under ``torch.inference_mode()`` through the action-only path (the LM
head never produces logits for all tokens)."""

import copy
import math

import pytest
import torch
from _trainer_setup import register_one_door
from _trainer_setup import small_cfg as _small_cfg

from steppo_fast import StepBatch
from steppo_fast.envs import default_tokenizer, make_env
from steppo_fast.trainer import update as update_mod
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.loop import Trainer
from steppo_fast.trainer.memory import compute_dtype, enable_grad_checkpointing
from steppo_fast.trainer.modeling import decoder_layers
from steppo_fast.trainer.policy import Critic, build_policy
from steppo_fast.trainer.rollout import rollout
from steppo_fast.trainer.update import Models, forward

pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps
EPS16 = torch.finfo(torch.bfloat16).eps  # 2^-7: twice bf16's unit roundoff

register_one_door("doors1m")


def small_cfg(tmp_path, **kw) -> TrainConfig:
    return _small_cfg(tmp_path, "doors1m", **kw)


@pytest.fixture(scope="module")
def setup():
    """A tiny policy + separate critic (non-zero head) and one rollout batch of doors."""
    tok = default_tokenizer()
    torch.manual_seed(3)
    cfg = TrainConfig(hidden_size=32, num_heads=2).resolved()
    policy = build_policy(cfg, tok).eval()
    critic = Critic(policy, shared=False).eval()
    with torch.no_grad():
        critic.head.weight.normal_()
    res = rollout(
        policy,
        tok,
        lambda: make_env("doors"),
        list(range(200, 208)),
        [i // 2 for i in range(8)],
        use_grammar=True,
        generator=torch.Generator().manual_seed(0),
    )
    return policy, critic, res


def loss_and_grads(policy, critic, res, mode, dtype="fp32"):
    """A loss touching every parameter (log-probs and step values), its gradients."""
    batch = StepBatch.from_trajectories(res.trajectories)
    models = Models(policy, critic, None, forward_mode=mode)
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    with compute_dtype(dtype, "cpu"):
        out = forward(models, batch, res.masks, 1.0, "step")
    weights = torch.linspace(-1, 1, out.logp.numel())
    loss = (out.logp * weights).sum() + out.values.square().sum()
    loss.backward()
    params = [*policy.named_parameters(), *critic.named_parameters()]
    return out, {n: p.grad.clone() for n, p in params if p.grad is not None}


def count_mlp_calls(model):
    """Forward calls of each decoder layer's MLP (pre-hooks fire in the recompute too; a
    post-hook would not: the recompute stops as soon as the last saved tensor is rebuilt)."""
    calls = []
    handles = [
        layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        for layer in decoder_layers(model)
    ]
    return calls, handles


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_grad_checkpointing_gives_the_same_gradients(setup, mode):
    policy, critic, res = setup
    _, expected = loss_and_grads(policy, critic, res, mode)
    pol2, crit2 = copy.deepcopy(policy), copy.deepcopy(critic)
    assert enable_grad_checkpointing(pol2) == 2 and enable_grad_checkpointing(crit2.backbone) == 2
    calls, handles = count_mlp_calls(pol2)
    _, got = loss_and_grads(pol2, crit2, res, mode)
    for h in handles:
        h.remove()
    # recomputed: each of the 2 layers ran forward twice (once more in backward), per bucket
    assert len(calls) >= 4 and len(calls) % 4 == 0
    assert got.keys() == expected.keys() and len(expected) > 20
    for name, g in expected.items():
        # the recompute runs the same kernels on the same inputs: equal up to a few fp32 ulps
        tol = 4 * EPS32 * (float(g.abs().max()) + 1e-30)
        torch.testing.assert_close(got[name], g, atol=tol, rtol=0, msg=name)


def test_grad_checkpointing_is_off_without_autograd_and_survives_copies(setup):
    policy, _, _ = setup
    pol2 = copy.deepcopy(policy)
    enable_grad_checkpointing(pol2)
    assert enable_grad_checkpointing(pol2) == 2  # idempotent
    calls, handles = count_mlp_calls(pol2)
    ids = torch.randint(0, 20, (1, 9))
    with torch.no_grad():
        a = pol2(input_ids=ids, use_cache=False).logits
    assert len(calls) == 2  # no checkpoint (nothing to recompute) without autograd
    for h in handles:
        h.remove()
    # a deep copy (the reference policy, FSDP's inference copy) runs its own weights
    pol3 = copy.deepcopy(pol2)
    with torch.no_grad():
        for p in pol3.parameters():
            p.mul_(0.5)
        b = pol3(input_ids=ids, use_cache=False).logits
    layer = decoder_layers(pol3)[0]
    assert layer.forward.__self__ is layer
    assert not torch.allclose(a, b)


def test_trainer_grad_checkpointing_flag(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, iters=1, grad_checkpointing=True, kl_coef=1e-3))
    m = trainer.models
    assert all(getattr(x, "_steppo_checkpointed", False) for x in decoder_layers(m.policy))
    assert all(getattr(x, "_steppo_checkpointed", False) for x in decoder_layers(m.critic.backbone))
    # the frozen reference never runs with autograd: not wrapped
    assert not any(getattr(x, "_steppo_checkpointed", False) for x in decoder_layers(m.reference))
    rows = trainer.train(log=lambda s: None)
    assert math.isfinite(rows[-1]["policy_loss"])


# ----------------------------------------------------------------------------- bf16


def test_bf16_autocast_compute_fp32_logprobs_and_gradients(setup):
    """bf16 vs fp32 on the same weights and batch. Error model: autocast rounds both operands
    of every matmul to bf16 (relative error <= EPS16 / 2 each, accumulation in fp32), so each
    matmul output carries a relative error ~ EPS16; the gradient of a parameter passes through
    up to K = 3 * 2 layers * 4 matmul levels (forward, and twice in backward) = 24 such roundings,
    which add in quadrature (independent rounding): rel. error ~ EPS16 * sqrt(K). Bound with a
    factor 4: 4 * EPS16 * sqrt(24) = 0.15 on the gradient's relative norm, and for log-probs
    (K = 8 forward levels, plus the bf16 LM head) 4 * EPS16 * sqrt(9) * |logit scale|."""
    policy, critic, res = setup
    seen = []
    hook = decoder_layers(policy)[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out32, g32 = loss_and_grads(policy, critic, res, "padded", "fp32")
    out16, g16 = loss_and_grads(policy, critic, res, "padded", "bf16")
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # autocast really ran the body in bf16
    assert out16.logp.dtype == torch.float32 and out16.values.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all(g.dtype == torch.float32 for g in g16.values())
    logit_scale = 1.0 + float(out32.logp.abs().max())
    lp_tol = 4 * EPS16 * math.sqrt(9) * logit_scale
    assert (out16.logp - out32.logp).abs().max() <= lp_tol
    assert (out16.logp - out32.logp).abs().max() > 0  # and it is not the fp32 computation
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    rel = float((flat16 - flat32).norm() / flat32.norm())
    # measured here: logp 3e-4, gradient 3e-3 (the bounds are worst-case-style)
    assert 0 < rel <= 4 * EPS16 * math.sqrt(24), rel


@pytest.mark.parametrize("grammar", [True, False])
def test_logprob_ops_accumulate_in_fp32_under_autocast(setup, grammar):
    """Under an enclosing bf16 autocast, the action log-probs of bf16 hidden states are what fp32
    arithmetic gives on the same bf16 values (hidden states and the bf16 LM head): the matmul
    is not itself autocast to a bf16 result. fp32 tolerance: logits are sums of H = 32
    products: 8 * eps32 * sqrt(H) * (1 + |logp|max)."""
    from steppo_fast import linear_logprobs
    from steppo_fast.trainer.masking import masked_logprobs
    from steppo_fast.trainer.policy import hidden_states

    policy, _, res = setup
    batch = StepBatch.from_trajectories(res.trajectories)
    masks = res.masks if grammar else None
    with torch.no_grad():
        hidden = hidden_states(policy, batch, "padded").to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = update_mod.action_logprobs(policy, hidden, batch, masks, 1.0)[0]
        h = hidden[batch.logit_index].float()
        w = policy.get_output_embeddings().weight.to(torch.bfloat16).float()
        if grammar:
            ref = masked_logprobs(h, w, batch.action_ids, masks)[0]
        else:
            ref = linear_logprobs(h, w, batch.action_ids, impl="torch")
    assert got.dtype == torch.float32
    tol = 8 * EPS32 * math.sqrt(32) * (1 + float(ref.abs().max()))
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def test_bf16_training_runs_without_nan_and_keeps_fp32_state(tmp_path):
    trainer = Trainer(small_cfg(tmp_path, iters=3, dtype="bf16", algo="steppo"))
    rows = trainer.train(log=lambda s: None)
    for row in rows:
        for key in ("policy_loss", "value_loss", "kl", "entropy", "grad_norm"):
            assert row[key] is None or math.isfinite(row[key]), (key, row)
    params = [*trainer.models.policy.parameters(), *trainer.models.critic.parameters()]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
        assert state["exp_avg_sq"].dtype == torch.float32


def test_dtype_flag_is_validated(tmp_path):
    with pytest.raises(
        ValueError, match="--dtype: must be one of fp32, bf16, got the string 'fp16'"
    ):
        small_cfg(tmp_path, dtype="fp16").resolved()


# ----------------------------------------------------------------------------- no [N, V]


@pytest.mark.parametrize("forward_mode", ["padded", "packed"])
def test_no_full_vocabulary_logits_anywhere_in_an_iteration(tmp_path, monkeypatch, forward_mode):
    """One full iteration (rollout, old/reference log-probs, values, update): the LM head module
    is called only by the sampler, for at most one position per live episode; scoring and
    training read the head's weight for the action tokens only (exactly A rows); old and
    reference log-probs run under inference mode."""
    trainer = Trainer(small_cfg(tmp_path, iters=1, kl_coef=1e-3, forward=forward_mode))
    heads = {
        "policy": trainer.models.policy.get_output_embeddings(),
        "reference": trainer.models.reference.get_output_embeddings(),
    }
    phase = {"name": "rollout"}
    calls = []
    for name, head in heads.items():
        head.register_forward_hook(
            lambda m, i, o, name=name: calls.append((phase["name"], name, tuple(o.shape)))
        )
    rows_seen = []
    real = update_mod.action_logprobs

    def spy(model, hidden, batch, *a, **k):
        rows_seen.append((hidden.shape[0], batch.num_tokens, batch.num_actions))
        rows_seen[-1] += (torch.is_inference_mode_enabled(),)
        return real(model, hidden, batch, *a, **k)

    monkeypatch.setattr(update_mod, "action_logprobs", spy)
    real_score = trainer.score

    def score(batch, masks):
        phase["name"] = "score"
        try:
            return real_score(batch, masks)
        finally:
            phase["name"] = "update"

    trainer.score = score
    widths = []
    trainer.models.policy.register_forward_pre_hook(
        lambda m, a, k: widths.append(k["input_ids"].shape[1]), with_kwargs=True
    )
    trainer.step()
    live = trainer.cfg.groups * trainer.cfg.group_size
    rollout_calls = [c for c in calls if c[0] == "rollout"]
    assert rollout_calls and all(c[1] == "policy" for c in rollout_calls)
    for _, _, shape in rollout_calls:
        rows, cols, _ = shape
        assert rows <= live and cols <= rows  # <= one column per live episode
    # the first prefill feeds every episode's whole first prompt, all of one length in doors:
    # logits for its last column only, not for each of its tokens
    assert widths[0] > 1 and rollout_calls[0][2][:2] == (live, 1)
    assert [c for c in calls if c[0] != "rollout"] == []  # score + update: never the head
    # every log-prob computation saw all tokens' hidden states but used action rows only
    assert rows_seen and all(n_hidden == n_tok for n_hidden, n_tok, _, _ in rows_seen)
    scored = [r for r in rows_seen[:2]]  # policy (old) then reference: inference mode
    assert all(r[3] for r in scored) and not any(r[3] for r in rows_seen[2:])


def test_grad_checkpointing_under_fsdp2_gives_the_same_update(tmp_path):
    """FSDP2 on a one-rank gloo group, packed (varlen) forward: the checkpointed layers are
    ``fully_shard`` units (their parameters are gathered again for the recompute); one
    iteration with and without checkpointing ends with the same parameters, and the layers
    really were recomputed."""
    import torch.distributed as dist

    from steppo_fast.trainer import comm as distributed

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        comm = distributed.Comm(0, 1, torch.device("cpu"))
        params, counts = {}, {}
        for ckpt in (False, True):
            cfg = small_cfg(
                tmp_path / str(ckpt),
                iters=1,
                shard="fsdp",
                grad_checkpointing=ckpt,
                forward="packed",
            )
            trainer = Trainer(cfg, comm)
            calls, _ = count_mlp_calls(trainer.sharded.root.policy)
            trainer.step()
            counts[ckpt] = len(calls)
            state = trainer.inference_models().policy.state_dict()
            params[ckpt] = {k: v.detach().clone() for k, v in state.items()}
        assert counts[True] > counts[False] > 0  # recomputed in backward
        for name, expected in params[False].items():
            tol = 4 * EPS32 * (float(expected.abs().max()) + 1e-30)
            torch.testing.assert_close(params[True][name], expected, atol=tol, rtol=0, msg=name)
    finally:
        dist.destroy_process_group()
