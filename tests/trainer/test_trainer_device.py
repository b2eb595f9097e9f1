"""The trainer is device-clean by construction (``--device``), checked without a GPU:

- ``--device`` parsing and resolution (auto / cpu / cuda / cuda:N, torchrun's cuda:LOCAL_RANK,
  NCCL on CUDA), with ``torch.cuda`` faked where CUDA itself is needed;
- a static scan: every tensor factory call in ``steppo_fast/trainer/*.py`` passes ``device=``
  or carries a ``# host:`` comment saying why it is a deliberate CPU tensor;
- a dynamic check (tests/_device_taint.py): a whole training iteration, evaluation and a
  rollout with sparse masks run under a mode that tags tensors "device" / "host" and fails on
  any op mixing them, and that counts device -> host reads (one per decode step, not per
  token or per row);
- resuming a checkpoint whose sampling generator was saved on another device type.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib

import pytest
import torch
from _device_taint import DEV, HOST, DeviceTaint, tag_of
from _device_taint import FACTORIES as TAINT_FACTORIES
from test_trainer_hf import model_dir  # noqa: F401 (fixture: a tiny BPE model directory)

from steppo_fast.envs import default_tokenizer, make_env
from steppo_fast.trainer import comm as distributed
from steppo_fast.trainer.checkpoint import write_checkpoint
from steppo_fast.trainer.config import TrainConfig, resolve_device
from steppo_fast.trainer.loop import CHECKPOINT, Trainer
from steppo_fast.trainer.rollout import rollout

pytest.importorskip("transformers")

TRAINER_DIR = pathlib.Path(__file__).resolve().parents[2] / "steppo_fast" / "trainer"
# calls that make a tensor (or generator) on a device of their own choosing: the taint mode's
# factories minus the ``*_like`` ones and ``from_numpy`` (those follow their input), plus Generator
FACTORIES = {f for f in TAINT_FACTORIES if not f.endswith("_like") and f != "from_numpy"}
FACTORIES |= {"Generator"}


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "run"),
        env="doors",
        iters=1,
        groups=2,
        group_size=2,
        hidden_size=32,
        num_heads=2,
        num_layers=1,
        epochs=1,
        eval_every=0,
        eval_episodes=3,
        plot=False,
        progress=False,
        micro_batch_tokens=256,
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- --device


def test_device_flag_values_and_errors_name_the_flag():
    assert TrainConfig().device == "auto"
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        TrainConfig(device=ok).validate_choices()
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps", ""):
        with pytest.raises(ValueError, match="--device"):
            TrainConfig(device=bad).validate_choices()
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for spec in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="--device: 'cuda.*needs CUDA"):
                resolve_device(spec)


class _FakeCuda:
    """``torch.cuda`` as seen on a machine with ``count`` GPUs (current device 0)."""

    def __init__(self, count: int):
        self.count, self.current = count, 0

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def set_device(self, device):
        self.current = torch.device(device).index


def test_resolve_device_with_cuda_present(monkeypatch):
    _FakeCuda(2).install(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device: cuda:2 does not exist"):
        resolve_device("cuda:2")
    # torchrun: one GPU per rank, cuda:LOCAL_RANK
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device: 'cuda:0' under torchrun"):
        resolve_device("cuda:0", local_rank=1)
    with pytest.raises(ValueError, match="cuda:3 does not exist"):
        resolve_device("cuda", local_rank=3)


@pytest.mark.parametrize(
    ("spec", "backend", "device"),
    [("auto", "nccl", "cuda:1"), ("cuda", "nccl", "cuda:1"), ("cpu", "gloo", "cpu")],
)
def test_torchrun_rank_gets_cuda_local_rank_and_nccl(monkeypatch, spec, backend, device):
    fake = _FakeCuda(2)
    fake.install(monkeypatch)
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b: calls.append(b))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    comm = distributed.init_from_env(spec)
    assert calls == [backend]
    assert comm == distributed.Comm(1, 2, torch.device(device))
    assert fake.current == (1 if backend == "nccl" else 0)  # the rank's GPU is current


def test_single_process_ignores_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group", _no_process_group)
    # no process group: a LocalComm on the resolved device, the one a 1-process Trainer uses
    assert distributed.init_from_env("cpu") == distributed.LocalComm(torch.device("cpu"))
    assert distributed.init_from_env("auto").device == resolve_device("auto")


def _no_process_group(*args, **kwargs):
    raise AssertionError("a single process must not start a process group")


def test_trainer_device_explicit_cpu_and_default(tmp_path):
    for spec in ("cpu", "auto"):
        trainer = Trainer(tiny_cfg(tmp_path / spec, device=spec))
        expected = resolve_device("auto") if spec == "auto" else torch.device("cpu")
        assert trainer.device == expected
        m = trainer.models
        for module in (m.policy, m.critic, m.reference):
            assert {p.device for p in module.parameters()} == {expected}
        assert trainer.sample_gen.device == expected
        assert trainer.shuffle_gen.device == torch.device("cpu")  # host, by design
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device: 'cuda' needs CUDA"):
            Trainer(tiny_cfg(tmp_path / "cuda", device="cuda"))


# ----------------------------------------------------------------------------- static scan


def _factory_calls(path: pathlib.Path):
    """(line, name, has device=, has a '# host:' comment on its lines) of every torch.<factory>
    call in ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        if not (isinstance(f.value, ast.Name) and f.value.id == "torch" and f.attr in FACTORIES):
            continue
        has_device = any(k.arg == "device" for k in node.keywords)
        span = lines[node.lineno - 1 : node.end_lineno]
        host = any("# host:" in line and line.split("# host:")[1].strip() for line in span)
        yield node.lineno, f.attr, has_device, host


def test_every_tensor_factory_in_the_trainer_names_its_device():
    files = sorted(TRAINER_DIR.glob("*.py"))
    assert len(files) > 10
    missing, seen = [], 0
    for path in files:
        for line, name, has_device, host in _factory_calls(path):
            seen += 1
            if not (has_device or host):
                missing.append(f"{path.name}:{line} torch.{name}(...) without device=")
    assert seen > 20  # the scan really finds the calls
    assert not missing, "\n".join(missing)


def test_static_scan_flags_a_factory_without_device(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "a = torch.zeros(3)\n"
        "b = torch.arange(\n    4, device=d)\n"
        "c = torch.tensor([1])  # host: a reason\n"
        "e = torch.tensor([1])  # host:\n"
        "g = torch.Generator()\n"
    )
    found = {(line, name): (dev or host) for line, name, dev, host in _factory_calls(bad)}
    assert found == {
        (2, "zeros"): False,
        (3, "arange"): True,
        (5, "tensor"): True,
        (6, "tensor"): False,  # a host marker needs a reason
        (7, "Generator"): False,
    }


# ----------------------------------------------------------------------------- taint mode


def test_taint_mode_flags_mixing_and_counts_reads():
    w = torch.randn(4, 3)
    with DeviceTaint(own_code=(__file__,)) as mode:  # this file's factories count
        mode.mark(w)
        ok = w + torch.ones(3, device=w.device)  # explicit device
        ok = ok * torch.tensor(2.0)  # 0-dim host scalar: legal on CUDA too
        ok = ok[torch.arange(2, device=w.device)]
        moved = torch.arange(3).to(w.device) + w
        assert not mode.violations and tag_of(ok) == DEV and tag_of(moved) == DEV
        host = torch.arange(3)
        assert tag_of(host) == HOST and tag_of(w.cpu()) == HOST
        _ = w + host  # forgotten device=
        _ = torch.cat([w, torch.zeros(1, 3)])
        _ = w[torch.tensor([0, 1])]  # host index into a device tensor
        int(w[0, 0]), float(w.sum()), w.tolist()
        host.tolist()  # a host read is free
    assert [v[0] for v in mode.violations] == ["add", "cat", "__getitem__"]
    assert [r[0] for r in mode.reads] == ["cpu", "__int__", "__float__", "tolist"]
    assert [r[2] for r in mode.reads] == [False] * 4  # made by this test, not the package


def _models(trainer):
    m = trainer.models if hasattr(trainer, "models") else trainer.inference
    return m.policy, m.critic, m.reference


@pytest.mark.parametrize(
    ("algo", "grammar", "critic"),
    [("steppo", True, "separate"), ("ppo", False, "shared"), ("gigpo", True, "separate")],
)
def test_iteration_keeps_every_model_input_on_the_model_device(tmp_path, algo, grammar, critic):
    trainer = Trainer(tiny_cfg(tmp_path, algo=algo, grammar=grammar, critic=critic))
    trainer.prepare_run_dir()
    with DeviceTaint(*_models(trainer)) as mode:
        row = trainer.step()
        trainer.evaluate(episodes=3)
        trainer.save_checkpoint()
    assert row["tokens"] > 0
    assert not mode.violations, mode.report()


def test_iteration_with_a_model_tokenizer_keeps_sparse_masks_on_the_device(tmp_path, model_dir):  # noqa: F811
    trainer = Trainer(tiny_cfg(tmp_path, model=model_dir, kl_coef=0.0))
    trainer.prepare_run_dir()
    with DeviceTaint(*_models(trainer)) as mode:
        res = trainer.collect([0, 1], [0, 1], greedy=False, generator=trainer.sample_gen, desc="")
        assert all(tag_of(t) == DEV for t in (res.masks.set_index, res.masks.set_ids))
        assert len([r for r in mode.reads if r[2]]) == res.forward_calls  # one per decode step
        row = trainer.step()
    assert row["tokens"] > 0 and row["logp_diff"] < 1e-5
    assert not mode.violations, mode.report()


def test_data_parallel_iteration_keeps_collectives_on_the_device(tmp_path, monkeypatch):
    """The replicated data-parallel path (one rank, torch.distributed faked): global whitening,
    the summed gradient all-reduce and the metric sums; NCCL needs every collective's tensor on
    the rank's device."""
    collective_tags = []

    def fake_collective(t, *args, **kwargs):
        collective_tags.append(tag_of(t))

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(distributed.dist, name, fake_collective)
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a, **k: None)
    comm = distributed.Comm(0, 1, torch.device("cpu"))
    trainer = Trainer(tiny_cfg(tmp_path, shard="none"), comm)
    collective_tags.clear()  # the broadcast of the initial parameters ran before tagging
    with DeviceTaint(*_models(trainer)) as mode:
        row = trainer.step()
    assert row["ranks"] == 1 and row["grad_norm"] is not None  # an optimizer step ran
    assert not mode.violations, mode.report()
    assert len(collective_tags) > 5 and set(collective_tags) == {DEV}


def test_sharded_iteration_and_dummy_microbatch_stay_on_the_device(tmp_path):
    """FSDP2 on a one-rank gloo group in this process: the sharded update, the inference-copy
    refresh and a lock-step dummy micro-batch run clean under the taint mode."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        comm = distributed.Comm(0, 1, torch.device("cpu"))
        with DeviceTaint() as mode:  # built inside: the models' .to(device) tags them
            trainer = Trainer(tiny_cfg(tmp_path, shard="fsdp"), comm)
            row = trainer.step()
            trainer.sharded.dummy_backward(1.0, "step")
        assert row["tokens"] > 0
        assert not mode.violations, mode.report()
    finally:
        dist.destroy_process_group()


def test_rollout_reads_sampled_tokens_once_per_decode_step(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path))
    tok = default_tokenizer()
    for n, grammar in ((8, True), (8, False), (2, True)):
        with DeviceTaint(trainer.models.policy) as mode:
            gen = torch.Generator(device=trainer.device).manual_seed(0)
            res = rollout(
                trainer.models.policy,
                tok,
                lambda: make_env("doors1"),  # one door, 3 steps: episodes end at different steps
                list(range(n)),
                list(range(n)),
                use_grammar=grammar,
                generator=gen,
            )
            if grammar:
                assert tag_of(res.masks) == DEV  # the stacked masks stay on the device
        if n == 8 and grammar:  # finished episodes left the KV cache while others went on
            assert len({len(t["steps"]) for t in res.trajectories}) > 1
        assert not mode.violations, mode.report()
        # ours: one read (tokens + log-probs together) per forward = per decode step, for any n
        ours = [(name, where) for name, where, direct in mode.reads if direct]
        assert len(ours) == res.forward_calls, ours[:10]
        assert {where for _, where in ours} == {ours[0][1]}
        # transformers reads a 2-D padding mask once per forward (to decide whether the mask
        # can be dropped): per forward too, never per row or token
        assert len(mode.reads) <= 2 * res.forward_calls, mode.reads[:10]


def test_critic_is_built_on_the_policy_device():
    """A second device without a GPU: the meta device (module construction needs no values)."""
    from steppo_fast.trainer.policy import Critic, build_policy

    cfg = TrainConfig(hidden_size=32, num_heads=2, num_layers=1).resolved()
    policy = build_policy(cfg, default_tokenizer()).to("meta")
    for shared in (True, False):
        critic = Critic(policy, shared=shared)
        assert {p.device.type for p in critic.parameters()} == {"meta"}


def test_sparse_masks_live_on_the_device_of_their_sets():
    from steppo_fast.trainer.masking import SparseMasks

    a, b = torch.tensor([1, 4]), torch.tensor([2])
    with DeviceTaint(own_code=(__file__, str(TRAINER_DIR))) as mode:
        mode.mark(a, b)
        masks = SparseMasks.from_rows([a, b, a])
        sub = masks[torch.tensor([0, 2]).to(a.device)]
        u, allowed = sub.union_and_membership()
        dense = masks.to_dense(6)
    assert not mode.violations, mode.report()
    assert all(tag_of(t) == DEV for t in (masks.set_index, masks.set_ptr, masks.set_ids, u))
    assert tag_of(allowed) == DEV and tag_of(dense) == DEV
    assert dense.tolist()[1] == [False, False, True, False, False, False]
    assert SparseMasks.from_rows([]).device == torch.device("cpu")


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("per_rank", [True, False], ids=["per-rank-streams", "rank-0-only"])
def test_resume_with_a_generator_state_from_another_device(tmp_path, per_rank):
    cfg = tiny_cfg(tmp_path, iters=1, checkpoint_every=1)
    Trainer(cfg).train(log=lambda *a: None)
    path = os.path.join(cfg.out, CHECKPOINT)
    state = torch.load(path, weights_only=True)
    assert state["sample_gen_device"] == "cpu" and state["sample_gen_rank_devices"] == ["cpu"]
    assert torch.equal(state["sample_gen_ranks"][0], state["sample_gen"])  # rank 0's stream
    # a checkpoint written on a GPU: CUDA generator states are 16 bytes (seed, offset); with
    # every rank's stream, or (a checkpoint of an earlier version) rank 0's alone
    state["sample_gen_device"] = "cuda"
    state["sample_gen"] = torch.zeros(16, dtype=torch.uint8)
    if per_rank:
        state["sample_gen_rank_devices"] = ["cuda"]
        state["sample_gen_ranks"] = [state["sample_gen"]]
    else:
        del state["sample_gen_rank_devices"], state["sample_gen_ranks"]
    write_checkpoint(state, cfg.out)  # (a new checksum)
    runs = []
    for _ in range(2):  # deterministic: two resumes of the same checkpoint agree
        resumed = Trainer(dataclasses.replace(cfg, iters=2, resume=True))
        with pytest.warns(UserWarning, match="saved on cuda.*reseeded"):
            rows = resumed.train(log=lambda *a: None)
        assert [r["iter"] for r in rows] == [1, 2]
        runs.append({k: v for k, v in rows[-1].items() if not k.endswith("_s")})
        write_checkpoint(state, cfg.out)  # the same checkpoint again for the second resume
    assert runs[0] == runs[1]
