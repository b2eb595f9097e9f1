"""``"steppo_varlen"`` attention: a packed forward equals per-sequence forwards (values and
gradients, rows and merged layouts, grouped-query heads), builds no [N, N] mask, and leaves every
non-packed call (padded rows, KV-cache decoding) exactly as sdpa computes it."""

import numpy as np
import pytest
import torch

from steppo_fast.batch import StepBatch
from steppo_fast.trainer.modeling import backbone, packed_forward
from steppo_fast.trainer.varlen_attention import NAME, enable_varlen_attention, varlen_sdpa

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 128, 64
# fp32 hidden states after 2 layers of O(1) activations: a few ulps of fp32 per reduction of
# length K = HIDDEN (or the sequence length <= 32) -> 16 * eps * sqrt(K) ~ 1.5e-5 bounds them
TOL = 16 * torch.finfo(torch.float32).eps * HIDDEN**0.5


def tiny_model(kind: str, kv_heads: int):
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[kind]
    config = cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(1)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=[("qwen2", 2), ("llama", 4)], ids=["qwen2-gqa", "llama-mha"])
def model(request):
    return tiny_model(*request.param)


def trajectories(seed: int = 0):
    """Merged-able trajectories of uneven lengths (one re-renders its prompt once)."""
    rng = np.random.default_rng(seed)

    def toks(n):
        return rng.integers(0, VOCAB, n).tolist()

    out = []
    for b, (num_steps, obs) in enumerate([(3, 2), (2, 0), (1, 1), (4, 3)]):
        prompt, steps = toks(3 + 2 * b), []
        for t in range(num_steps):
            action = toks(1 + (t + b) % 3)
            steps.append({"prompt_ids": prompt, "action_ids": action, "reward": 1.0})
            prompt = toks(5) if (b == 3 and t == 1) else prompt + action + toks(obs)
        out.append({"steps": steps, "terminated": True, "group": 0})
    return out


def per_sequence(model, batch):
    body = backbone(model)
    return torch.cat(
        [
            body(input_ids=batch.input_ids[a:b][None], use_cache=False).last_hidden_state[0]
            for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())
        ]
    )


@pytest.mark.parametrize("layout", ["rows", "auto"])
def test_varlen_matches_per_sequence_forward_and_gradients(model, layout):
    batch = StepBatch.from_trajectories(trajectories(), layout=layout).validate()
    assert batch.num_seqs > 1
    weight = torch.randn(batch.num_tokens, HIDDEN, generator=torch.Generator().manual_seed(2))

    def run(fn):
        model.zero_grad()
        hidden = fn(model, batch)
        (hidden * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads

    expected, g_expected = run(per_sequence)
    got, g_got = run(packed_forward)  # default attention="varlen"
    assert model.config._attn_implementation == NAME
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    assert g_got.keys() == g_expected.keys() and len(g_expected) > 10
    for name, g in g_expected.items():
        scale = float(g.abs().max()) + 1.0
        torch.testing.assert_close(g_got[name], g, atol=TOL * scale, rtol=TOL, msg=name)


def test_varlen_builds_no_mask_and_sdpa_calls_are_unchanged(model, monkeypatch):
    """No mask builder runs in a packed forward; padded and cached calls still build (and
    need) their sdpa masks and give sdpa's results bit for bit."""
    import transformers.masking_utils as mu

    batch = StepBatch.from_trajectories(trajectories(), layout="rows")
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    body = backbone(model)
    with torch.no_grad():
        before = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        calls = []
        real = mu.sdpa_mask
        monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
        packed_forward(model, batch)
        assert calls == []  # the packed forward asked for no mask
        after = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        assert calls  # a padded call still builds its padding mask
    assert model.config._attn_implementation == NAME
    assert torch.equal(before, after)
    # KV-cache decoding (what rollouts do): prefill then one token, equal to a fresh full forward
    with torch.no_grad():
        out = model(input_ids=ids[:1, :6], use_cache=True)
        step = model(input_ids=ids[:1, 6:], cache=out.past_key_values, use_cache=True)
        full = model(input_ids=ids[:1], use_cache=False).logits
    torch.testing.assert_close(step.logits[0, -1], full[0, -1], atol=TOL, rtol=TOL)


def test_varlen_sdpa_is_causal_within_each_sequence_only():
    """Perturbing one sequence changes no other sequence; the first token of each sequence
    attends to itself only (its output equals its value vector)."""
    gen = torch.Generator().manual_seed(0)
    cu = [0, 3, 3, 8, 9]  # an empty sequence and a one-token one included
    q, k, v = (torch.randn(1, 4, 9, 8, generator=gen) for _ in range(3))
    out = varlen_sdpa(q, k, v, cu, None)
    for a in (0, 3, 8):
        torch.testing.assert_close(out[0, :, a], v[0, :, a])
    v2 = v.clone()
    v2[0, :, 4] += 1.0  # second non-empty sequence, its 2nd token
    out2 = varlen_sdpa(q, k, v2, cu, None)
    changed = (out2 - out).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [False] * 4 + [True] * 4 + [False]
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_sdpa(q, k, v, [0, 5, 3, 9], None)


def test_varlen_rejects_models_it_cannot_serve():
    model = tiny_model("llama", 4)
    model.config._attn_implementation = "flex_attention"
    assert not enable_varlen_attention(model)
    batch = StepBatch.from_trajectories(trajectories())
    with pytest.raises(ValueError, match="attention: 'varlen' needs"):
        packed_forward(model, batch)
