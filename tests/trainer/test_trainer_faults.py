"""Runs that survive faults, checkpoints that cannot run code.

- a crafted ``checkpoint.pt`` (a pickled ``os.system`` call) is refused by ``steppo eval``,
  ``--resume`` and ``compare``, and nothing in it runs;
- empty, truncated, foreign, corrupted (one flipped byte) and mismatched (other algorithm /
  size / critic / reference) checkpoints give one line naming the file and the cause; a
  corrupted one falls back to ``checkpoint.prev.pt`` and the resumed run equals the
  uninterrupted one;
- a full disk (``ENOSPC``) while writing says so, keeps the previous files, leaves no temporary
  file, and the run can be resumed;
- a run killed (``kill -9``) or crashed before its first checkpoint can be resumed or restarted
  in the same folder; leftovers of a kill during the model export never block later exports;
- ``--resume`` with fewer ``--iters`` than done is an error and leaves config.yaml unchanged.
"""

import dataclasses
import errno
import os
import random
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from _fault_envs import Faulty

from steppo_fast.envs import DoorsEnv, register
from steppo_fast.trainer import checkpoint as ckpt_mod
from steppo_fast.trainer.checkpoint import (
    PREVIOUS,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from steppo_fast.trainer.cli import main
from steppo_fast.trainer.compare import run_compare, run_config
from steppo_fast.trainer.config import TrainConfig
from steppo_fast.trainer.loop import CHECKPOINT, Trainer
from steppo_fast.trainer.runfiles import RunFileError, atomic_write_text

pytest.importorskip("transformers")

register("doors1f", lambda: DoorsEnv(n_doors=1, max_steps=3))
register("crash_late", lambda: Faulty(name="crash_late", end_after=1, **_CRASH))
_CRASH: dict = {}

SMALL = dict(
    env="doors1f",
    groups=2,
    group_size=2,
    hidden_size=16,
    num_heads=2,
    num_layers=1,
    eval_every=0,
    plot=False,
    progress=False,
    checkpoint_every=1,
    micro_batch_tokens=512,
)
# the same as command-line flags (without --env)
ARGS = "--groups 2 --group-size 2 --hidden-size 16 --num-heads 2 --num-layers 1 --eval-every 0"
ARGS = [*ARGS.split(), "--no-plot", "--no-progress", "--checkpoint-every", "1"]

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the helpers' folder


def cfg(out, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), **{**SMALL, "iters": 2, **kw})


def quiet(*a, **k):
    pass


def run(out, **kw) -> Trainer:
    t = Trainer(cfg(out, **kw))
    t.train(log=quiet)
    return t


def same_weights(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.models.policy.state_dict(), b.models.policy.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line(capsys, argv, status=1) -> str:
    capsys.readouterr()  # (what earlier runs of the test printed)
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("steppo: error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 2-iteration run (checkpoint.pt at 2, checkpoint.prev.pt at 1) to copy."""
    out = tmp_path_factory.mktemp("done") / "run"
    t = run(out)
    return out, t


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ checkpoints run no code
class _Payload:
    """Unpickling this calls ``os.system`` (what a crafted checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_nothing(done_run, tmp_path, capsys):
    run_dir = copy_run(done_run[0], tmp_path / "run")
    marker = tmp_path / "PWNED"
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    state["policy"]["x"] = _Payload(marker)  # otherwise a genuine checkpoint
    torch.save(state, run_dir / CHECKPOINT)
    # the test can fail: an unrestricted load runs the payload
    torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert marker.exists()
    marker.unlink()
    err = one_line(capsys, ["eval", str(run_dir), "--episodes", "1"])
    assert f"{run_dir / CHECKPOINT}: refused" in err and "nothing was loaded" in err
    err = one_line(capsys, ["train", "--resume", "--out", str(run_dir), "--iters", "3"])
    assert "refused" in err
    (tmp_path / "cmp").mkdir()
    base = TrainConfig(**{**SMALL, "eval_every": 1}, iters=2)  # compare evaluates held out
    planned = run_config(base, "steppo", 1e-3, 0, str(tmp_path / "cmp"))
    os.replace(run_dir, planned.out)
    planned.save_yaml(os.path.join(planned.out, "config.yaml"))  # passes compare's config check
    with pytest.raises(CheckpointError, match="refused"):
        run_compare(base, ["steppo"], 1, str(tmp_path / "cmp"), lr_grid={"steppo": [1e-3]})
    assert not marker.exists()


def test_a_state_that_would_not_load_back_is_never_written(tmp_path):
    with pytest.raises(TypeError, match="device is not a tensor or plain value"):
        write_checkpoint({"iteration": 1, "where": torch.device("cpu")}, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_no_unrestricted_load_in_the_package():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "steppo_fast")
    assert os.path.isdir(root), root
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                assert "weights_only=False" not in text, name
                assert "pickle.load" not in text, name


# ----------------------------------------------------------------------------- damaged files
def _data_offset(path, member_suffix):
    """Byte offset and size of the largest stored zip member whose name ends with the suffix."""
    with zipfile.ZipFile(path) as z:
        info = max(
            (i for i in z.infolist() if i.filename.endswith(member_suffix)),
            key=lambda i: i.file_size,
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + n + m, info.file_size


def tensor_byte(path) -> int:
    """Offset of a byte in the middle of the first tensor's data (the policy's embedding)."""
    offset, size = _data_offset(path, "/data/0")
    return offset + size // 2


def flip(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: open(p, "wb").close(), "the file is empty"),
        (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "truncated or damaged"),
        (lambda p: open(p, "wb").write(b"not a checkpoint"), "truncated or damaged"),
        (lambda p: flip(p, tensor_byte(p)), "checksum mismatch"),
    ],
    ids=["empty", "truncated", "garbage", "flipped-byte"],
)
def test_damaged_checkpoint_is_named_and_the_previous_one_used(
    done_run, tmp_path, capsys, damage, message
):
    run_dir = copy_run(done_run[0], tmp_path / "run")
    damage(run_dir / CHECKPOINT)
    with pytest.raises(CheckpointError, match=message) as e:
        read_checkpoint(str(run_dir / CHECKPOINT))
    assert str(run_dir / CHECKPOINT) in str(e.value)
    # eval falls back to checkpoint.prev.pt (iteration 1) and says why
    assert main(["eval", str(run_dir), "--episodes", "1", "--show", "0"]) == 0
    cap = capsys.readouterr()
    assert message in cap.err and f"using {run_dir / PREVIOUS} (iteration 1)" in cap.err
    assert "iteration 1," in cap.out
    # the previous checkpoint damaged too: one line naming both files and their causes
    open(run_dir / PREVIOUS, "wb").close()
    err = one_line(capsys, ["eval", str(run_dir)])
    assert str(run_dir / CHECKPOINT) in err and message in err
    assert f"the previous one is unusable too: {run_dir / PREVIOUS}: the file is empty" in err
    # no previous checkpoint: one line naming the file and the cause
    os.unlink(run_dir / PREVIOUS)
    err = one_line(capsys, ["eval", str(run_dir)])
    assert str(run_dir / CHECKPOINT) in err and message in err


def test_every_single_byte_flip_is_detected_or_harmless(done_run, tmp_path):
    """200 random single-bit flips over the whole file: each gives a CheckpointError or loads
    exactly the original content (zip padding / unused header bytes)."""
    path = tmp_path / CHECKPOINT
    original = read_checkpoint(str(done_run[0] / CHECKPOINT))
    data = (done_run[0] / CHECKPOINT).read_bytes()
    rng = random.Random(0)
    detected = 0
    for offset in rng.sample(range(len(data)), 200):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            state = read_checkpoint(str(path))
        except CheckpointError:
            detected += 1
            continue
        assert ckpt_mod.checksum(state) == ckpt_mod.checksum(original), offset
    assert detected > 100  # most bytes are tensor data


def test_corrupt_checkpoint_resume_falls_back_and_equals_the_uninterrupted_run(tmp_path, capsys):
    straight = run(tmp_path / "a", iters=3)
    run(tmp_path / "b", iters=2)
    flip(tmp_path / "b" / CHECKPOINT, tensor_byte(tmp_path / "b" / CHECKPOINT))
    lines = []
    resumed = Trainer(cfg(tmp_path / "b", iters=3, resume=True))
    resumed.train(log=lines.append)
    assert any("checksum mismatch" in x and PREVIOUS in x for x in lines), lines
    assert resumed.iteration == 3 and same_weights(straight, resumed)
    # the damaged file was set aside, not rotated over the good previous checkpoint
    assert (tmp_path / "b" / "checkpoint.damaged.pt").exists()
    assert read_checkpoint(str(tmp_path / "b" / PREVIOUS))["iteration"] == 2


def test_foreign_and_mismatched_checkpoints_are_named(done_run, tmp_path):
    run_dir = copy_run(done_run[0], tmp_path / "run")
    path = run_dir / CHECKPOINT
    torch.save({"model": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a steppo_fast checkpoint"):
        read_checkpoint(str(path))
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a steppo_fast checkpoint"):
        read_checkpoint(str(path))
    os.replace(run_dir / PREVIOUS, path)  # a good checkpoint (iteration 1) again
    for change, message in [
        (dict(algo="grpo"), "with --algo steppo, this run has --algo grpo"),
        (dict(hidden_size=32), "with --hidden-size 16, this run has --hidden-size 32"),
        (dict(critic="shared"), "with --critic separate, this run has --critic shared"),
        (dict(kl_coef=0.0), "holds a reference model but this run has --kl-coef 0.0"),
    ]:
        with pytest.raises(CheckpointError, match=f"{path}: written by a run|{path}: holds") as e:
            Trainer(cfg(run_dir, resume=True, **change)).train(log=quiet)
        assert message in str(e.value)
    # a checkpoint of an earlier steppo_fast (no format tag, no checksum): used, with a warning
    legacy = {
        k: v
        for k, v in read_checkpoint(str(path)).items()
        if k not in ("format", "version", "checksum")
    }
    torch.save(legacy, path)
    with pytest.warns(UserWarning, match="earlier steppo_fast without a checksum"):
        assert read_checkpoint(str(path))["iteration"] == 1
    write_checkpoint(legacy, str(run_dir))
    # weights that do not fit although the config says they should: named, one line
    state = read_checkpoint(str(path))
    state["policy"].pop(next(iter(state["policy"])))
    write_checkpoint(state, str(run_dir))
    with pytest.raises(CheckpointError, match=r"policy weights do not fit this run \(Runtime"):
        Trainer(cfg(run_dir, resume=True)).train(log=quiet)


# ----------------------------------------------------------------------------- full disk
def test_full_disk_while_checkpointing_says_so_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of iteration 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    err = one_line(capsys, ["train", "--out", str(out), "--env", "doors1f", "--iters", "3", *ARGS])
    assert f"{out / CHECKPOINT}: could not be written: the disk is full (ENOSPC)" in err
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert read_checkpoint(str(out / CHECKPOINT))["iteration"] == 1  # the previous one intact
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", "--out", str(out), "--iters", "3"]) == 0
    assert read_checkpoint(str(out / CHECKPOINT))["iteration"] == 3


def test_full_disk_on_any_run_file_names_it(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RunFileError, match=f"{path}: could not be written: the disk is full"):
        atomic_write_text(str(path), "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_real_enospc_from_the_kernel_is_named(done_run, tmp_path, monkeypatch):
    """The checkpoint bytes go to /dev/full (every write fails with ENOSPC, from the kernel, as
    on a full disk): one error naming checkpoint.pt; both earlier checkpoints unchanged."""
    run_dir = copy_run(done_run[0], tmp_path / "run")
    before = {n: (run_dir / n).read_bytes() for n in (CHECKPOINT, PREVIOUS)}
    state = read_checkpoint(str(run_dir / CHECKPOINT))
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(RunFileError, match=f"{run_dir / CHECKPOINT}: .*disk is full") as e:
        write_checkpoint(state, str(run_dir))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert {n: (run_dir / n).read_bytes() for n in before} == before
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


# ----------------------------------------------------------------------------- stopped early
def test_killed_before_the_first_checkpoint_restarts_or_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--env", "killer", "--iters", "5", *ARGS]
    argv[argv.index("--checkpoint-every") + 1] = "10"
    script = (
        "import sys, _fault_envs; from steppo_fast.trainer.cli import main; "
        f"sys.exit(main({argv!r}))"
    )
    # iteration 1 makes at most 4 x 3 env steps and 5 iterations at least 5 x 4: the 15th step
    # is in iteration 2, 3 or 4, after metrics.jsonl was written, before any checkpoint
    env = {**os.environ, "STEPPO_TEST_KILL_AT": "15", "PYTHONPATH": TESTS}
    # cwd: not the repo root, whose kernels/ folder would shadow HF's `kernels` package
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (out / "metrics.jsonl").exists() and not (out / CHECKPOINT).exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    uninterrupted = Trainer(TrainConfig(**{**saved, "out": str(tmp_path / "straight")}))
    uninterrupted.train(log=quiet)
    # --resume: starts again from iteration 0 in the same folder, same result
    lines = []
    resumed = Trainer(dataclasses.replace(uninterrupted.cfg, out=str(out), resume=True))
    resumed.train(log=lines.append)
    assert any("stopped before its first checkpoint" in x for x in lines)
    assert same_weights(uninterrupted, resumed)
    # a crash (env raises) before the first checkpoint: the same command again restarts
    again = tmp_path / "again"
    _CRASH["reward"] = RuntimeError("env down")
    args = ["train", "--out", str(again), "--env", "crash_late", "--no-grammar", *ARGS]
    assert "env down" in one_line(capsys, args)
    _CRASH.clear()
    assert (again / "config.yaml").exists() and not (again / CHECKPOINT).exists()
    assert main(args + ["--iters", "1"]) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().out


def test_leftovers_of_a_killed_export_never_block_later_exports(done_run, tmp_path):
    run_dir = copy_run(done_run[0], tmp_path / "run")
    # killed while removing the old export: model/ and model.old/ both there (blocked before)
    (run_dir / "model.old").mkdir()
    (run_dir / "model.old" / "config.json").write_text("{}")
    (run_dir / ".tmp-123checkpoint.pt").write_bytes(b"partial")
    t = Trainer(cfg(run_dir, iters=3, resume=True))
    lines = []
    t.train(log=lines.append)
    assert sorted(os.listdir(run_dir)) == sorted(
        ["config.yaml", "metrics.jsonl", CHECKPOINT, PREVIOUS, "model"]
    )
    assert any(".tmp-123checkpoint.pt" in x for x in lines)
    # killed between the two renames: model/ gone, model.old/ complete, model.tmp/ partial
    os.replace(run_dir / "model", run_dir / "model.old")
    (run_dir / "model.tmp").mkdir()
    Trainer(cfg(run_dir, iters=4, resume=True)).train(log=quiet)
    assert (run_dir / "model" / "config.json").exists()
    assert not (run_dir / "model.old").exists() and not (run_dir / "model.tmp").exists()


def test_killed_between_the_checkpoint_renames_resumes_from_the_previous(done_run, tmp_path):
    """Only checkpoint.prev.pt left (a kill after ``checkpoint.pt -> checkpoint.prev.pt``):
    --resume uses it and says why."""
    run_dir = copy_run(done_run[0], tmp_path / "run")
    os.unlink(run_dir / CHECKPOINT)
    lines = []
    t = Trainer(cfg(run_dir, iters=3, resume=True))
    t.train(log=lines.append)
    assert any("checkpoint.pt: no such file" in x and "(iteration 1)" in x for x in lines), lines
    assert t.iteration == 3 and [r["iter"] for r in t.rows] == [1, 2, 3]


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = one_line(capsys, ["train", "--out", str(tmp_path / "f"), "--env", "doors1f", *ARGS])
    assert f"--out: {tmp_path / 'f'} is a file, not a run directory" in err


def test_resume_with_fewer_iters_than_done_is_an_error(done_run, tmp_path, capsys):
    run_dir = copy_run(done_run[0], tmp_path / "run")
    before = (run_dir / "config.yaml").read_bytes()
    err = one_line(capsys, ["train", "--resume", "--out", str(run_dir), "--iters", "1"], status=2)
    assert "--iters: 1 is fewer than the 2 iterations" in err
    assert (run_dir / "config.yaml").read_bytes() == before
    # equal: nothing to train, the run is left as it was
    assert main(["train", "--resume", "--out", str(run_dir), "--iters", "2"]) == 0


def test_evaluate_zero_episodes_is_an_error_not_the_default(done_run):
    with pytest.raises(ValueError, match="episodes: must be an integer >= 1, got 0"):
        done_run[1].evaluate(episodes=0)
