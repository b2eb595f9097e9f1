"""The trainer with a model's own tokenizer (``--model PATH``): plain-text framing, the token
grammar (prefix-free trie of encoded actions), sparse masks and their log-probs (== the dense
reference, gradcheck), rollout log-probs == training log-probs, and an end-to-end run.

Everything is built locally: a byte-level BPE trained on the env texts (small vocabulary, so some
grammar words are several tokens) saved beside a random tiny Qwen2 in ``tmp_path``."""

import copy
import os
import random

import pytest
import torch
from _tolerance import assert_close_to_oracle
from _trainer_setup import play

from steppo_fast import StepBatch, linear_logprobs
from steppo_fast.envs import DoorsEnv, default_tokenizer, make_env, register
from steppo_fast.envs.hf_tokenizer import HFTokenizer
from steppo_fast.envs.tokenizer import WordTokenizer
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.evaluate import evaluate_run
from steppo_fast.trainer.loop import Trainer
from steppo_fast.trainer.masking import (
    SparseMasks,
    TokenGrammar,
    masked_logprobs,
    sample_from_allowed,
)
from steppo_fast.trainer.policy import build_policy, build_tokenizer, hidden_states
from steppo_fast.trainer.update import reference_logprobs

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

register("doors1", lambda: DoorsEnv(n_doors=1, max_steps=3))


def _corpus() -> list[str]:
    """Observation / action lines of random episodes of both envs, framed as the trainer does."""
    rng, lines = random.Random(0), []
    for name in ("doors", "quest"):
        env = make_env(name)
        for seed in range(20):
            lines.append("Observation: " + env.reset(seed) + "\nAction:")
            for _ in range(4):
                action = env.grammar.sample(rng)
                obs, _, term, trunc, _ = env.step(action)
                lines.append(" " + action + "\nObservation: " + obs + "\nAction:")
                if term or trunc:
                    break
    return lines


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the trainer runs (two OpenMP threads on a loaded 2-core machine make
    the tiny model's decode steps about 10x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # 256 bytes + 2 specials + ~40 merges: rare words stay split
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    path = str(tmp_path_factory.mktemp("hfmodel"))
    hf.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(hf),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=hf.pad_token_id,
        eos_token_id=hf.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(model_dir):
    return build_tokenizer(TrainConfig(model=model_dir))


@pytest.fixture(scope="module")
def policy(model_dir, tok):
    return build_policy(TrainConfig(model=model_dir), tok).eval()


@pytest.fixture(scope="module")
def policy64(policy):
    """The same policy in fp64: the oracle of the sampler's fp32 log-probs (within
    ORACLE_FACTOR x the training path's own fp32 error, ``assert_close_to_oracle``)."""
    return copy.deepcopy(policy).double()


# ----------------------------------------------------------------------------- tokenizer


def test_model_dir_gets_its_own_tokenizer_with_plain_text_framing(tok):
    assert isinstance(tok, HFTokenizer)
    assert tok.end_id == tok.encode("\n")[0] and tok.newline_end  # newline ends an action
    assert tok.bos_id is None and tok.pad_id == tok.hf.pad_token_id
    env, rng = make_env("quest"), random.Random(1)
    obs = env.reset(7)
    assert tok.decode(tok.encode(obs)) == obs
    assert tok.decode(tok.prompt_ids(obs)) == f"Observation: {obs}\nAction:"
    for _ in range(3):
        action = env.grammar.sample(rng)
        ids = tok.action_ids(action)
        assert ids[-1] == tok.end_id and tok.action_text(ids) == action
        obs = env.step(action)[0]
        assert tok.decode(tok.observation_ids(obs, ids)) == f"Observation: {obs}\nAction:"
        # an action cut without the end token gets its own line break
        assert tok.decode(tok.observation_ids(obs, ids[:-1])).startswith("\nObservation: ")


def test_end_of_action_falls_back_to_eos_and_errors_without_either():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "open": 2, "red": 3}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "\n" encodes to nothing
    with_eos = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="<eos>")
    assert HFTokenizer(with_eos).end_id == 1
    with pytest.raises(ValueError, match="end-of-action"):
        HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=wl))


# ----------------------------------------------------------------------------- token grammar


def _trie_sequences(grammar: TokenGrammar, prefix=()):
    """Every complete token sequence reachable by following ``allowed`` from ``prefix``."""
    allowed = grammar.allowed(prefix)
    if allowed is None:
        return [prefix]
    return [s for t in allowed.tolist() for s in _trie_sequences(grammar, prefix + (t,))]


@pytest.mark.parametrize("name", ["doors", "quest"])
def test_token_grammar_accepts_exactly_the_grammar_actions(tok, name):
    env = make_env(name)
    grammar = TokenGrammar(env.grammar, tok)
    reached = _trie_sequences(grammar)
    expected = {tuple(tok.action_ids(" ".join(a))) for a in env.grammar.actions()}
    assert len(reached) == len(set(reached)) and set(reached) == expected  # all, and only them
    for seq in reached:  # prefix-free: no complete sequence is a proper prefix of another
        assert not any(o != seq and o[: len(seq)] == seq for o in reached)
        assert env.grammar.is_complete(tok.action_text(seq).split())
    # a grammar word spans several tokens (the small BPE splits it) and still works
    assert any(len(s) > len(tok.action_text(s).split()) + 1 for s in reached)
    with pytest.raises(ValueError, match="start no action"):
        grammar.allowed((tok.end_id,))


def test_sparse_masks_share_sets_select_and_densify():
    a, b = torch.tensor([1, 4]), torch.tensor([0, 2, 5])
    masks = SparseMasks.from_rows([a, b, a, a, b])
    assert len(masks) == 5 and masks.set_ptr.tolist() == [0, 2, 5]  # 2 sets stored once
    dense = masks.to_dense(7)
    assert dense[0].nonzero().flatten().tolist() == [1, 4]
    assert dense[1].nonzero().flatten().tolist() == [0, 2, 5]
    sub = masks[torch.tensor([4, 0])]
    assert torch.equal(sub.to_dense(7), dense[[4, 0]]) and torch.equal(sub.row(0), b)
    assert len(SparseMasks.from_rows([])) == 0


def _random_sparse(m, v, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(v, generator=g)[: 1 + i % 4].sort().values for i in range(m)]
    targets = torch.stack([r[torch.randint(len(r), (1,), generator=g)][0] for r in rows])
    return SparseMasks.from_rows(rows), targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sparse_masked_logprobs_equal_the_dense_reference(temperature):
    m, v, h = 9, 40, 6
    masks, targets = _random_sparse(m, v, 0)
    hidden, weight, bias = torch.randn(m, h), torch.randn(v, h), torch.randn(v)
    got = masked_logprobs(hidden, weight, targets, masks, bias=bias, temperature=temperature)
    want = masked_logprobs(
        hidden, weight, targets, masks.to_dense(v), bias=bias, temperature=temperature
    )
    oracle = masked_logprobs(
        hidden.double(),
        weight.double(),
        targets,
        masks.to_dense(v),
        bias=bias.double(),
        temperature=temperature,
    )
    for g, w, o in zip(got, want, oracle):
        assert g.dtype == torch.float32
        assert_close_to_oracle(g, o, w, msg="sparse vs dense")
    # loop oracle from the maths: z[a] - logsumexp(z[allowed]), in fp32 (torch's own error)
    loop = []
    for i in range(m):
        z = (weight[masks.row(i)] @ hidden[i] + bias[masks.row(i)]) / temperature
        za = (weight[targets[i]] @ hidden[i] + bias[targets[i]]) / temperature
        loop.append(za - torch.logsumexp(z, 0))
    assert_close_to_oracle(got[0], oracle[0], torch.stack(loop), msg="sparse vs loop")
    bad = targets.clone()
    bad[3] = next(t for t in range(v) if t not in masks.row(3).tolist())
    with pytest.raises(ValueError, match=r"targets\[3\]"):
        masked_logprobs(hidden, weight, bad, masks)
    empty = SparseMasks.from_rows([])
    logp, ent = masked_logprobs(torch.zeros(0, h), weight, torch.zeros(0, dtype=torch.long), empty)
    assert logp.shape == ent.shape == (0,)


def test_sparse_masked_logprobs_gradcheck_fp64():
    m, v, h = 5, 12, 3
    masks, targets = _random_sparse(m, v, 1)
    hidden = torch.randn(m, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)

    def f(hh, ww, bb):
        return masked_logprobs(hh, ww, targets, masks, bias=bb, temperature=1.3)

    assert f(hidden, weight, bias)[0].dtype == torch.float64
    torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_sample_from_allowed_draws_only_allowed_tokens():
    logits = torch.randn(3, 20)
    logits[:, 0] = 50.0  # the unconstrained argmax is never allowed
    allowed = [torch.tensor([3, 7]), torch.tensor([1]), torch.tensor([2, 5, 9])]
    g = torch.Generator().manual_seed(0)
    for greedy in (True, False):
        tokens, logp = sample_from_allowed(
            logits, allowed, temperature=1.0, greedy=greedy, generator=g
        )
        for i, row in enumerate(allowed):
            assert int(tokens[i]) in row.tolist()
            want = torch.log_softmax(logits[i, row], 0)[row.tolist().index(int(tokens[i]))]
            torch.testing.assert_close(logp[i], want)
    assert int(tokens[1]) == 1 and float(logp[1]) == 0.0


# ----------------------------------------------------------------------------- rollout


@pytest.mark.parametrize("env", ["doors", "quest"])
def test_rollout_actions_parse_and_logprobs_match_training(policy, policy64, tok, env):
    res = play(policy, tok, env=env, n=4)
    batch = StepBatch.from_trajectories(res.trajectories)
    assert isinstance(res.masks, SparseMasks) and len(res.masks) == batch.num_actions
    assert res.masks.nbytes < batch.num_actions * len(tok)  # << one [V] row per action token
    grammar, a = make_env(env).grammar, 0
    for traj in res.trajectories:
        for step in traj["steps"]:
            assert step["action_ids"][-1] == tok.end_id
            assert grammar.is_complete(tok.action_text(step["action_ids"]).split())
            for tid in step["action_ids"]:
                assert tid in res.masks.row(a).tolist()
                a += 1
    # the critic reads the last token of "\nAction:" before every action
    last = tok.encode("\nAction:")[-1]
    assert torch.all(batch.input_ids[batch.value_index] == last)
    train = reference_logprobs(policy, batch, res.masks, 1.0, "padded")
    oracle = reference_logprobs(policy64, batch, res.masks, 1.0, "padded")
    assert_close_to_oracle(batch.rollout_logp, oracle, train, msg="sampler log-probs")
    # the mask matters: unmasked log-probs of the same tokens are lower
    hidden = hidden_states(policy, batch)
    head = policy.get_output_embeddings().weight
    unmasked = linear_logprobs(hidden[batch.logit_index], head, batch.action_ids, impl="torch")
    assert (batch.rollout_logp - unmasked).min() > 0.01
    # a mini-batch selection of the masks gives the same log-probs
    sel = torch.arange(0, batch.num_actions, 2)
    sub = masked_logprobs(
        hidden[batch.logit_index][sel], head, batch.action_ids[sel], res.masks[sel]
    )
    assert_close_to_oracle(sub[0].detach(), oracle[sel], train[sel], msg="mini-batch masks")


def test_rollout_without_grammar_ends_at_end_token_or_cap(policy, policy64, tok):
    res = play(policy, tok, env="doors1", grammar=False, n=4, max_action_tokens=3)
    assert res.masks is None
    for traj in res.trajectories:
        for step in traj["steps"]:
            ids = step["action_ids"]
            assert len(ids) == 3 or ids[-1] == tok.end_id
            assert tok.end_id not in ids[:-1]
    batch = StepBatch.from_trajectories(res.trajectories)
    logps = []
    for lm in (policy, policy64):
        hidden = hidden_states(lm, batch)
        head = lm.get_output_embeddings().weight
        logps.append(
            linear_logprobs(hidden[batch.logit_index], head, batch.action_ids, impl="torch")
        )
    assert_close_to_oracle(batch.rollout_logp, logps[1].detach(), logps[0].detach(), msg="logp")


# ----------------------------------------------------------------------------- trainer


def test_trainer_runs_end_to_end_with_a_model_directory(tmp_path, model_dir, capsys):
    cfg = TrainConfig(
        model=model_dir,
        out=str(tmp_path / "run"),
        env="doors1",
        iters=2,
        groups=2,
        group_size=4,
        eval_every=0,
        plot=False,
        progress=False,
        micro_batch_tokens=512,
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.tokenizer, HFTokenizer)
    before = [p.detach().clone() for p in trainer.models.policy.parameters()]
    rows = trainer.train(log=lambda *a: None)
    assert [r["iter"] for r in rows] == [1, 2]
    assert all(r["logp_diff"] <= 1e-5 for r in rows)  # old logp == rollout logp
    after = list(trainer.models.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # the exported model carries its tokenizer, so --model <out>/model loads it again
    exported = os.path.join(cfg.out, "model")
    again = build_tokenizer(TrainConfig(model=exported))
    assert isinstance(again, HFTokenizer) and len(again) == len(trainer.tokenizer)
    # steppo eval RUN_DIR rebuilds the same tokenizer and prints the plain-text transcript
    capsys.readouterr()
    stats = evaluate_run(cfg.out, episodes=2, show=1)
    assert 0.0 <= stats["success_rate"] <= 1.0
    out = capsys.readouterr().out
    assert "  Observation: open 1 doors ." in out and "\n  Action: " in out


def test_model_directory_errors_and_word_vocabulary_exports(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    no_tok = tmp_path / "no_tokenizer"  # a real-vocabulary model without tokenizer files
    AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).save_pretrained(no_tok)
    with pytest.raises(ValueError, match="--model: .* has no tokenizer files"):
        build_tokenizer(TrainConfig(model=str(no_tok)))
    with pytest.raises(ValueError, match="--model: .* neither 'tiny' nor"):
        build_tokenizer(TrainConfig(model=str(tmp_path / "missing")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="--model: cannot load the tokenizer"):
        build_tokenizer(TrainConfig(model=str(broken)))
    # a word-vocabulary model as `steppo train` exports it keeps the word tokenizer
    words = default_tokenizer()
    tiny = build_policy(TrainConfig(hidden_size=16, num_heads=2).resolved(), words)
    tiny.save_pretrained(tmp_path / "export")
    assert isinstance(build_tokenizer(TrainConfig(model=str(tmp_path / "export"))), WordTokenizer)
    assert build_tokenizer(TrainConfig()) is words
