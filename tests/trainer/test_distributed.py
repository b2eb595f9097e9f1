"""Data-parallel trainer (steppo_fast.trainer.comm, one Trainer): 2 gloo CPU ranks == 1 rank.

One ``torch.multiprocessing.spawn`` of 2 ranks (module fixture) runs, on fixed episodes, one
``ppo_update`` per algorithm (critic + global whitening: steppo, ppo; group baselines: grpo) and
a 1-iteration ``Trainer`` run on the 2 ranks that saves a checkpoint. The tests compare the 2-rank
parameters with the single-process update on the same batch, and resume the 2-rank checkpoint
under 1 rank."""

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from _dist_worker import (  # noqa: E402
    CASES,
    FSDP_CASES,
    flat_params,
    one_update,
    train_cfg,
    worker,
)

from steppo_fast.trainer.comm import LocalComm  # noqa: E402
from steppo_fast.trainer.loop import Trainer  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5  # fp32 (tests/conftest.py TOL[torch.float32])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)  # a 1-rank run whose checkpoint the 2 sharded ranks resume
    Trainer(train_cfg(str(out / "single"), iters=1)).train(log=lambda *a: None)
    single = torch.load(out / "single" / "checkpoint.pt", weights_only=True)
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks, single


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_two_rank_update_equals_one_rank(two_ranks, case):
    _, ranks, _ = two_ranks
    torch.set_num_threads(1)
    single = one_update(*case, LocalComm())
    r0, r1 = ranks[0][case], ranks[1][case]
    # the split is real: each rank held part of the batch, and it needed several micro-batches
    assert 0 < r0["num_trajs"] < single["num_trajs"]
    assert r0["num_trajs"] + r1["num_trajs"] == single["num_trajs"]
    assert single["num_mbs_full"] > 2
    torch.testing.assert_close(r0["init"], single["init"], atol=0, rtol=0)
    moved = (single["params"] - single["init"]).abs().max()
    assert moved > 100 * ATOL  # the update changed the parameters
    torch.testing.assert_close(r0["params"], r1["params"], atol=0, rtol=0)  # replicated
    torch.testing.assert_close(r0["params"], single["params"], atol=ATOL, rtol=RTOL)
    for key, value in single["stats"].items():
        assert r0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("case", FSDP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_two_sharded_ranks_update_equals_one_rank(two_ranks, case):
    """FSDP2: parameters, gradients and AdamW state sharded over 2 ranks; same update."""
    _, ranks, _ = two_ranks
    torch.set_num_threads(1)
    single = one_update(*case, LocalComm())
    r0, r1 = ranks[0][("fsdp", *case)], ranks[1][("fsdp", *case)]
    assert 0 < r0["num_trajs"] < single["num_trajs"]
    torch.testing.assert_close(r0["init"], single["init"], atol=0, rtol=0)
    assert (single["params"] - single["init"]).abs().max() > 100 * ATOL
    torch.testing.assert_close(r0["params"], r1["params"], atol=0, rtol=0)  # same gathered copy
    # each rank holds about half of the parameters and optimizer state, together all of them
    h0, h1 = r0["held"], r1["held"]
    assert h0["params"] + h1["params"] == h0["full"]
    assert max(h0["params"], h1["params"]) < 0.55 * h0["full"]
    n_state = 2 if case[1] == "adamw" else 0  # exp_avg, exp_avg_sq per parameter element
    assert h0["state"] + h1["state"] == n_state * h0["full"]
    torch.testing.assert_close(r0["params"], single["params"], atol=ATOL, rtol=RTOL)
    for key, value in single["stats"].items():
        assert r0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_one_rank_checkpoint_resumes_under_two_sharded_ranks(two_ranks):
    """A single-process checkpoint loads into the shards and reads back bit for bit (model and
    AdamW state), and training continues."""
    _, ranks, single = two_ranks
    # only rank 0 (which writes checkpoints) keeps the gathered optimizer state
    assert ranks[1]["resumed"]["optimizer"] is None
    for r, rank in enumerate(ranks):
        got = rank["resumed"]
        assert got["iteration"] == single["iteration"] == 1
        for name in ("policy", "critic"):
            for key, value in single[name].items():
                torch.testing.assert_close(got[name][key], value, atol=0, rtol=0)
        assert [row["iter"] for row in rank["resumed_rows"]] == [1, 2]
        if r > 0:
            continue
        want, have = single["optimizer"], got["optimizer"]
        assert want["param_groups"] == have["param_groups"]
        assert sorted(want["state"]) == sorted(have["state"])
        for i, st in want["state"].items():
            for key, value in st.items():
                torch.testing.assert_close(have["state"][i][key], value, atol=0, rtol=0)


def test_checkpoint_of_two_ranks_resumes_under_one(two_ranks):
    out, ranks, _ = two_ranks
    assert ranks[0]["sharded"]  # the trainer shards by default under torchrun
    run = str(out / "run")
    assert os.path.isfile(os.path.join(run, "checkpoint.pt"))
    torch.testing.assert_close(ranks[0]["trained"], ranks[1]["trained"], atol=0, rtol=0)
    row = ranks[0]["rows"][0]
    assert row["ranks"] == 2 and row["sequences"] > 0
    torch.set_num_threads(1)
    trainer = Trainer(dataclasses.replace(train_cfg(run, iters=2), resume=True))
    trainer.prepare_run_dir()
    assert trainer.iteration == 1
    torch.testing.assert_close(flat_params(trainer.models), ranks[0]["trained"], atol=0, rtol=0)
    rows = trainer.train(log=lambda *a: None)
    assert [r["iter"] for r in rows] == [1, 2]


def test_a_run_folder_refused_by_rank_0_fails_on_every_rank(two_ranks):
    """Rank 0 refuses to overwrite a run: rank 1 raises too (it would otherwise wait in the
    next collective forever)."""
    _, ranks, _ = two_ranks
    assert "already holds a run; pass --resume" in ranks[0]["refused"]
    assert ranks[1]["refused"].startswith("rank 0 failed: --out: ")


def test_meta_copy_copies_no_data_and_keeps_ties():
    """The FSDP inference copy is built as a meta skeleton (no second full copy at setup)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from steppo_fast.trainer.fsdp import materialize, meta_copy

    config = Qwen2Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    skeleton = meta_copy(model)
    assert all(t.device.type == "meta" for t in (*skeleton.parameters(), *skeleton.buffers()))
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # still tied
    assert all(p.device.type == "cpu" for p in model.parameters())  # the original is untouched
    materialize(skeleton, torch.device("cpu"))
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # to_empty unties
    assert skeleton.lm_head.weight.device.type == "cpu"
    assert len(list(skeleton.parameters())) == len(list(model.parameters()))
    names = [n for n, _ in skeleton.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
    assert meta_copy(None) is None
