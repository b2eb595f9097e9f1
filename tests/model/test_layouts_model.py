"""Both layouts give the same per-step log-probs and values through a real (tiny) transformer,
and packing with position_ids + use_cache=False (or a 4-D block mask) isolates sequences --
while the wrong setups (default use_cache, 2-D all-ones mask) leak, which these checks catch."""

import copy

import numpy as np
import pytest
import torch
from _tolerance import assert_close_pair, assert_close_to_oracle

from steppo_fast.batch import StepBatch
from steppo_fast.trainer.modeling import backbone, block_diagonal_mask, packed_forward

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 128, 64


def tiny_config(kind: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request):
    torch.manual_seed(1)
    lm = transformers.AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    lm.value_head = torch.nn.Linear(HIDDEN, 1)  # a critic head on the same trunk (test only)
    return lm


@pytest.fixture(scope="module")
def model64(model):
    """The same model in fp64: the oracle every fp32 layout is measured against (each within
    ORACLE_FACTOR x the per-sequence fp32 forward's own error, ``assert_close_to_oracle``)."""
    return copy.deepcopy(model).double()


def trajectories(extend_all: bool, seed: int = 0):
    """Prompts grow by action + observation; with extend_all=False one trajectory re-renders
    its prompt (auto then starts a new sequence there)."""
    rng = np.random.default_rng(seed)

    def toks(n):
        return rng.integers(0, VOCAB, n).tolist()

    out = []
    for b, (num_steps, obs) in enumerate([(3, 2), (2, 0), (1, 1), (3, 3)]):
        prompt, steps = toks(3 + b), []
        for t in range(num_steps):
            action = toks(1 + (t + b) % 3)
            steps.append({"prompt_ids": prompt, "action_ids": action, "reward": 1.0})
            if not extend_all and b == 3 and t == 0:
                prompt = toks(6)  # re-rendered state
            else:
                prompt = prompt + action + toks(obs)
        out.append({"steps": steps, "terminated": True, "group": 0})
    return out


def per_sequence_hidden(model, batch):
    """Oracle: one forward per sequence, no packing at all."""
    body = backbone(model)
    outs = [
        body(input_ids=batch.input_ids[int(a) : int(b)][None], use_cache=False).last_hidden_state[0]
        for a, b in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])
    ]
    return torch.cat(outs) if outs else torch.zeros(0, HIDDEN)


def step_outputs(model, batch, hidden):
    """Per action token log-probs of the sampled tokens, per step values."""
    logits = hidden[batch.logit_index] @ model.get_output_embeddings().weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, -1).gather(-1, batch.action_ids[:, None])[:, 0]
    values = model.value_head(hidden[batch.value_index])[:, 0]
    return logp, values


def forward(model, batch, how):
    if how == "per_sequence":
        return per_sequence_hidden(model, batch)
    return packed_forward(model, batch, attention=how)


HOWS = ["per_sequence", "position_ids", "block_mask"]


@pytest.mark.parametrize("how", ["position_ids", "block_mask"])
@pytest.mark.parametrize("layout", ["rows", "auto"])
def test_packed_forward_matches_per_sequence(model, model64, how, layout):
    batch = StepBatch.from_trajectories(trajectories(extend_all=False), layout=layout).validate()
    with torch.no_grad():
        expected = per_sequence_hidden(model, batch)
        oracle = per_sequence_hidden(model64, batch)
        got = packed_forward(model, batch, attention=how)
    assert got.shape == (batch.num_tokens, HIDDEN)
    assert_close_to_oracle(got, oracle, expected, msg="packed hidden")


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("extend_all, other", [(True, "merged"), (False, "auto")])
def test_rows_and_merged_layouts_agree_per_step(model, model64, how, extend_all, other):
    trajs = trajectories(extend_all)
    rows = StepBatch.from_trajectories(trajs, layout="rows").validate()
    packed = StepBatch.from_trajectories(trajs, layout=other).validate()
    assert packed.num_tokens < rows.num_tokens  # the merged layout really is shorter
    assert torch.equal(rows.action_ids, packed.action_ids)
    with torch.no_grad():
        logp_rows, v_rows = step_outputs(model, rows, forward(model, rows, how))
        logp_packed, v_packed = step_outputs(model, packed, forward(model, packed, how))
        logp_ref, v_ref = step_outputs(model, rows, per_sequence_hidden(model, rows))
        logp_o, v_o = step_outputs(model64, rows, per_sequence_hidden(model64, rows))
    assert logp_rows.shape == (rows.num_actions,) and v_rows.shape == (rows.num_steps,)
    for got_logp, got_v in ((logp_rows, v_rows), (logp_packed, v_packed)):
        assert_close_to_oracle(got_logp, logp_o, logp_ref, msg="logp")
        assert_close_to_oracle(got_v, v_o, v_ref, msg="values")


def test_layouts_give_the_same_gradients(model, model64):
    trajs = trajectories(extend_all=True)
    grads = []
    for lm, layout in ((model, "rows"), (model, "merged"), (model64, "rows")):
        batch = StepBatch.from_trajectories(trajs, layout=layout)
        lm.zero_grad()
        logp, values = step_outputs(lm, batch, packed_forward(lm, batch))
        (logp.sum() + values.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
        lm.zero_grad()
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and len(grads[0]) > 0
    for name in grads[0]:  # merged vs the fp64 oracle, against the rows layout's fp32 error
        assert_close_to_oracle(grads[1][name], grads[2][name], grads[0][name], msg=name)


@pytest.mark.parametrize("wrong", ["default_use_cache", "mask_2d_ones"])
def test_wrong_packing_setup_leaks_and_is_caught(model, model64, wrong):
    """With the default use_cache, or with a 2-D all-ones attention mask, the
    packed sequences attend to each other silently. The per-step comparison must flag it."""
    trajs = trajectories(extend_all=False)
    batch = StepBatch.from_trajectories(trajs, layout="rows")
    body = backbone(model)
    ids, pos = batch.input_ids[None], batch.position_ids[None]
    with torch.no_grad():
        if wrong == "default_use_cache":
            hidden = body(input_ids=ids, position_ids=pos).last_hidden_state[0]
        else:
            hidden = body(
                input_ids=ids,
                position_ids=pos,
                attention_mask=torch.ones_like(ids),
                use_cache=False,
            ).last_hidden_state[0]
        logp_leak, v_leak = step_outputs(model, batch, hidden)
        logp_ok, v_ok = step_outputs(model, batch, per_sequence_hidden(model, batch))
        logp_o, v_o = step_outputs(model64, batch, per_sequence_hidden(model64, batch))
    # the first sequence sees nothing before it, so it is unaffected; later ones leak
    first = int(batch.cu_steps[1])
    assert_close_to_oracle(logp_leak[:first], logp_o[:first], logp_ok[:first], msg="first")
    # the leak is far beyond fp32 rounding: 100 x torch's own fp32 error
    assert (logp_leak - logp_o).abs().max() > 100 * (logp_ok - logp_o).abs().max()
    assert (v_leak - v_o).abs().max() > 100 * (v_ok - v_o).abs().max()
    with pytest.raises(AssertionError):
        assert_close_to_oracle(logp_leak, logp_o, logp_ok)


def test_block_diagonal_mask_matches_definition():
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    mask = block_diagonal_mask(cu, dtype=torch.float32)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.float32
    seq = [0, 0, 1, 2, 2, 2]
    low = torch.finfo(torch.float32).min
    for q in range(6):
        for k in range(6):
            allowed = seq[q] == seq[k] and k <= q
            assert mask[0, 0, q, k].item() == (0.0 if allowed else low), (q, k)
    half = block_diagonal_mask(cu, dtype=torch.bfloat16)
    assert (
        half.dtype == torch.bfloat16 and half[0, 0, 0, 1].item() == torch.finfo(torch.bfloat16).min
    )
    assert block_diagonal_mask(torch.tensor([0], dtype=torch.int32)).shape == (1, 1, 0, 0)


def test_packed_forward_empty_batch_and_bad_mode(model):
    empty = StepBatch.from_trajectories([])
    out = packed_forward(model, empty)
    assert out.shape == (0, HIDDEN) and out.dtype == torch.float32
    batch = StepBatch.from_trajectories(trajectories(True))
    with pytest.raises(ValueError, match="attention: 'causal' is not one of"):
        packed_forward(model, batch, attention="causal")


def test_design_pipeline_with_linear_logprobs(model, model64):
    """docs/design.md §3 trainer path: packed hidden -> linear_logprobs(hidden[logit_index], W,
    action_ids) gives the same per-token log-probs in both layouts (and as log_softmax)."""
    from steppo_fast import linear_logprobs

    trajs = trajectories(extend_all=True)
    weight = model.get_output_embeddings().weight
    out = {}
    with torch.no_grad():
        for layout in ("rows", "merged"):
            batch = StepBatch.from_trajectories(trajs, layout=layout)
            hidden = packed_forward(model, batch)
            out[layout] = linear_logprobs(
                hidden[batch.logit_index], weight, batch.action_ids, impl="torch"
            )
            plain, _ = step_outputs(model, batch, hidden)
            # same hidden, two fp32 log-prob paths: H-term logits, V-term log-sum-exp
            assert_close_pair(out[layout], plain, HIDDEN + VOCAB, msg=layout)
        rows = StepBatch.from_trajectories(trajs, layout="rows")
        oracle, _ = step_outputs(model64, rows, per_sequence_hidden(model64, rows))
    assert_close_to_oracle(out["merged"], oracle, out["rows"], msg="merged vs rows")
