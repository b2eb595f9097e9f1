"""Critic diagnostics of the reference trainer: the ``critic/*`` metrics (explained variance,
advantage spread) against hand cases and numpy, their presence in ``metrics.jsonl`` and the
progress line, and ``--critic-warmup`` (only the critic learns during the warm-up)."""

import json
import math

import numpy as np
import pytest
import torch
from _trainer_setup import register_one_door
from _trainer_setup import small_cfg as _small_cfg

from steppo_fast.trainer.cli import main
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.critic_metrics import KEYS, critic_fields, critic_sums
from steppo_fast.trainer.fields import ConfigError
from steppo_fast.trainer.loop import Trainer
from steppo_fast.trainer.rows import summary_line

pytest.importorskip("transformers")

# one door, random success ~23%: iteration 1 already has unequal returns
register_one_door("doors1cm")


def fields_of(r, v, a) -> dict:
    t = [torch.tensor(x, dtype=torch.float32) for x in (r, v, a)]
    return critic_fields(critic_sums(*t))


def test_explained_var_hand_cases():
    r = [1.0, 0.0, 1.0, 0.0]  # Var(R) = 1/4
    # V = mean(R): E = R - 1/2, Var(E) = Var(R) -> 0
    assert fields_of(r, [0.5] * 4, [0.0] * 4)["critic/explained_var"] == 0.0
    # V exact -> 1
    assert fields_of(r, r, [0.0] * 4)["critic/explained_var"] == 1.0
    # E = (0, 0, 1/2, -1/2): Var(E) = 1/8 -> 1 - (1/8)/(1/4) = 1/2
    got = fields_of(r, [1.0, 0.0, 0.5, 0.5], [0.0] * 4)
    assert got["critic/explained_var"] == 0.5
    assert got["critic/value_mean"] == 0.5 and got["critic/return_mean"] == 0.5
    # V = 1 - R: E = 2R - 1, Var(E) = 1 -> 1 - 4 = -3 (worse than the mean)
    assert fields_of(r, [0.0, 1.0, 0.0, 1.0], [0.0] * 4)["critic/explained_var"] == -3.0
    # adv_std: population std of (1, -1, 3, -3) = sqrt(5)
    assert fields_of(r, r, [1.0, -1.0, 3.0, -3.0])["critic/adv_std"] == math.sqrt(5.0)


def test_explained_var_matches_numpy():
    g = np.random.default_rng(0)
    r = g.normal(size=1000).astype(np.float32)
    v = (0.7 * r + 0.3 * g.normal(size=1000)).astype(np.float32)
    a = g.normal(scale=2.0, size=1000).astype(np.float32)
    got = fields_of(r, v, a)
    r64, v64, a64 = (x.astype(np.float64) for x in (r, v, a))
    want = 1.0 - np.var(r64 - v64) / np.var(r64)
    # fp64 sums of 1000 O(1) terms: error ~ eps64 * K * (relative cancellation <= 10) << 1e-10
    assert abs(got["critic/explained_var"] - want) < 1e-10
    assert abs(got["critic/adv_std"] - np.std(a64)) < 1e-10


def test_undefined_and_bad_input():
    # every return equal (no episode succeeded): undefined, not 0 and not a division by zero
    assert fields_of([0.0] * 3, [0.1, 0.2, 0.3], [0.0] * 3)["critic/explained_var"] is None
    empty = torch.zeros(0)
    assert critic_fields(critic_sums(empty, empty, empty)) == dict.fromkeys(KEYS)
    with pytest.raises(ValueError, match="values"):
        critic_sums(torch.zeros(3), torch.zeros(4), torch.zeros(3))


def small_cfg(tmp_path, **kw) -> TrainConfig:
    return _small_cfg(tmp_path, "doors1cm", **kw)


@pytest.mark.parametrize("algo", ["steppo", "ppo"])
def test_metrics_jsonl_has_critic_keys(tmp_path, algo):
    lines = []
    Trainer(small_cfg(tmp_path, algo=algo)).train(log=lines.append)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iter"] for r in rows] == [1, 2]
    for row in rows:
        assert set(KEYS) <= set(row) and row["value_loss"] is not None
        assert row["critic/adv_std"] > 0
    # iteration 1 reads the zero-initialised value head: V = 0, so explained_var = 0
    # (or undefined when all returns are equal), i.e. the values are the pre-update ones
    assert rows[0]["critic/value_mean"] == 0.0
    assert rows[0]["critic/explained_var"] in (0.0, None)
    if algo == "steppo":  # (ppo's lam is 0.95: its advantages are not the returns)
        # with V = 0 and gamma = lam = 1 the raw advantages are the returns-to-go, 0 or 1 in
        # doors (reward 1 on success only): Var = m (1 - m), m their mean; whitened give 1
        m = rows[0]["critic/return_mean"]
        assert abs(rows[0]["critic/adv_std"] ** 2 - m * (1 - m)) < 1e-9
    assert rows[1]["critic/value_mean"] != 0.0  # the critic learned in iteration 1
    assert " ev " in lines[-1] and " astd " in lines[-1]


def test_critic_free_rows_have_no_critic_keys(tmp_path):
    Trainer(small_cfg(tmp_path, algo="grpo", iters=1)).train(log=lambda *_: None)
    (row,) = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert not set(KEYS) & set(row)
    assert " ev " not in summary_line(row, 1)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("warmup", [0, 1])
def test_critic_warmup_freezes_policy(tmp_path, warmup):
    tr = Trainer(small_cfg(tmp_path, iters=1, critic_warmup=warmup))
    pol, cri = params(tr.models.policy), params(tr.models.critic)
    tr.train(log=lambda *_: None)
    pol_same = all(torch.equal(a, b) for a, b in zip(pol, tr.models.policy.parameters()))
    cri_same = all(torch.equal(a, b) for a, b in zip(cri, tr.models.critic.parameters()))
    assert not cri_same
    assert pol_same == (warmup == 1)


def test_critic_warmup_flag_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--env", "doors1cm", "--iters", "1", "--groups", "2"]
    args += ["--hidden-size", "16", "--num-heads", "2", "--eval-every", "0", "--no-plot"]
    assert main([*args, "--critic-warmup", "1", "--no-progress"]) == 0
    assert "critic_warmup: 1" in open(out / "config.yaml").read()
    with pytest.raises(ConfigError, match="--critic-warmup.*grpo"):
        small_cfg(tmp_path, algo="grpo", critic_warmup=2).resolved()
    with pytest.raises(ConfigError, match="--critic-warmup"):
        small_cfg(tmp_path, critic_warmup=-1).resolved()


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One iteration of a 2-rank data-parallel run (replicas); saves this rank's row and the
    local critic statistics it contributed."""
    import os

    import torch.distributed as dist

    import steppo_fast.trainer.comm as C
    import steppo_fast.trainer.loop as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = []
    D.critic_sums = lambda *a, f=D.critic_sums: local.append(f(*a)) or local[-1]
    cfg = small_cfg(tmp_path=None, iters=1, shard="none", out=os.path.join(out_dir, "run"))
    trainer = D.Trainer(cfg, C.Comm(rank, world))
    trainer.train(log=lambda *_: None)
    torch.save({"row": trainer.rows[-1], "local": local}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_report_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(2))
    (s0,), (s1,) = r0["local"], r1["local"]
    assert s0[0] > 0 and s1[0] > 0  # each rank held part of the batch
    want = critic_fields([a + b for a, b in zip(s0, s1)])
    for key in KEYS:
        assert r0["row"][key] == r1["row"][key]
        # float64 all-reduce of 2 terms: exact up to one rounding of each sum
        if want[key] is None:
            assert r0["row"][key] is None
        else:
            assert r0["row"][key] == pytest.approx(want[key], rel=1e-12, abs=1e-12)
