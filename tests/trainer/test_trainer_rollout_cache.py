"""The rollout's KV cache uses the cache API of the installed transformers: the forward
keyword the model declares (``cache`` from the release that deprecated ``past_key_values``,
which goes away in 5.40; ``past_key_values`` before), with no deprecation warning, and the
cached log-probs equal the training forward's. Runs in the main environment and in the verl
environment (transformers 5.10: .ci/run)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from _trainer_setup import tiny_policy

from steppo_fast import StepBatch, linear_logprobs  # noqa: E402
from steppo_fast.envs import default_tokenizer, make_env  # noqa: E402
from steppo_fast.trainer.policy import hidden_states  # noqa: E402
from steppo_fast.trainer.rollout import cache_keyword, rollout  # noqa: E402

ATOL = 1e-5  # fp32 (tests/conftest.py TOL[torch.float32]): KV-cached vs packed forward


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return tiny_policy(tok)


def test_rollout_warns_nothing_and_matches_the_training_forward(policy, tok):
    """Every warning is an error during the rollout (the ``past_key_values`` deprecation is
    a FutureWarning), and the sampler's log-probs equal the packed training forward's: a
    cache the model ignored (wrong keyword) would give other log-probs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = rollout(
            policy,
            tok,
            lambda: make_env("doors"),
            [100, 101, 102, 103],
            [0, 0, 1, 1],
            use_grammar=False,
            max_action_tokens=4,
            generator=torch.Generator().manual_seed(0),
        )
    batch = StepBatch.from_trajectories(res.trajectories)
    assert res.forward_calls > len(res.trajectories[0]["steps"])  # decoding used the cache
    hidden = hidden_states(policy, batch)
    head = policy.get_output_embeddings().weight
    logp = linear_logprobs(hidden[batch.logit_index], head, batch.action_ids)
    torch.testing.assert_close(logp, batch.rollout_logp, atol=ATOL, rtol=ATOL)


def test_cache_keyword_is_the_one_the_forward_declares(policy):
    import inspect

    declared = inspect.signature(policy.forward).parameters
    assert cache_keyword(policy) in declared

    class NewApi(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None): ...

    class OldApi(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class KwargsOnly(torch.nn.Module):
        def forward(self, **kwargs): ...

    assert cache_keyword(NewApi()) == "cache"
    assert cache_keyword(OldApi()) == "past_key_values"
    assert cache_keyword(KwargsOnly()) == "past_key_values"
