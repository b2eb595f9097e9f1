"""Rebuilding the C++ extension while processes use it (csrc/atomic_install.py).

The built library is installed by writing a temporary file and renaming it over the old one:
a process that loaded the old file keeps running it (its inode lives until the process
exits), and a process importing the extension meanwhile sees a complete file, old or new.
Copying into the old file instead (``shutil.copyfile``, ``cp``) rewrites the pages running
processes execute; setuptools' own copy leaves the path missing or partial while it writes.

The full rebuild (``pip install --no-build-isolation -e .`` while a process calls an op in a
loop) takes minutes: it runs only with ``STEPPO_TEST_REBUILD=1``. The other tests run the
same install step on copies of the built library."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest
from _cpp_helpers import requires_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_atomic_install():
    path = os.path.join(ROOT, "csrc", "atomic_install.py")
    spec = importlib.util.spec_from_file_location("atomic_install_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ai():
    return load_atomic_install()


def test_install_replaces_the_file_and_keeps_the_old_inode_readable(ai, tmp_path):
    dst, new = tmp_path / "_C.so", tmp_path / "build" / "_C.so"
    new.parent.mkdir()
    dst.write_bytes(b"A" * 70_000)
    new.write_bytes(b"B" * 50_000)
    os.chmod(new, 0o755)
    with open(dst, "rb") as held:  # as a process that loaded the library holds it
        old_inode = os.fstat(held.fileno()).st_ino
        ai.install_file(str(new), str(dst))
        # the old file is intact (read through the descriptor: a mapping of a file rewritten
        # in place would fault with SIGBUS past its new end, as a loaded library does)
        assert os.pread(held.fileno(), 100_000, 0) == b"A" * 70_000
    assert dst.read_bytes() == b"B" * 50_000
    assert os.stat(dst).st_ino != old_inode
    assert os.stat(dst).st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_C.so", "build"]  # no temp left


def test_failed_install_leaves_the_destination_and_no_temporary(ai, tmp_path):
    dst = tmp_path / "_C.so"
    dst.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        ai.install_file(str(tmp_path / "missing.so"), str(dst))
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["_C.so"]


def test_readers_never_see_a_missing_or_partial_library(ai, tmp_path):
    """A process importing the extension during a rebuild reads the path while it is being
    replaced: it must find a complete file (old or new) every time."""
    size = 4 << 20
    versions = [tmp_path / "v0.so", tmp_path / "v1.so"]
    for i, v in enumerate(versions):
        v.write_bytes(bytes([i]) * size)
    dst = tmp_path / "_C.so"
    dst.write_bytes(bytes([0]) * size)
    bad, stop = [], threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                with open(dst, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                bad.append("missing")
                continue
            if len(data) != size or data[0] != data[-1]:
                bad.append(f"partial ({len(data)} bytes)")

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for k in range(40):
            ai.install_file(str(versions[k % 2]), str(dst))
    finally:
        stop.set()
        reader.join()
    assert not bad, bad[:5]


def test_build_ext_installs_libraries_through_install_file(ai, tmp_path, monkeypatch):
    """setup.py's build_ext copies built libraries into the source tree with install_file
    (other files: the base class's copy)."""
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    calls = []
    monkeypatch.setattr(ai, "install_file", lambda s, d: calls.append((s, d)))
    cmd = ai.atomic_build_ext(build_ext)(Distribution())
    src, stub = tmp_path / "built.so", tmp_path / "stub.py"
    src.write_bytes(b"lib")
    stub.write_text("x = 1\n")
    out = cmd.copy_file(str(src), str(tmp_path / "_C.so"), level=0)
    assert calls == [(str(src), str(tmp_path / "_C.so"))] and out == (str(tmp_path / "_C.so"), True)
    cmd.copy_file(str(stub), str(tmp_path / "copied.py"), level=0)
    assert len(calls) == 1 and (tmp_path / "copied.py").read_text() == "x = 1\n"


HOLDER = r"""
import os, sys, time, torch
torch.ops.load_library(sys.argv[1])          # the extension, loaded from its file
stop, out = sys.argv[2], sys.argv[3]
r, v = torch.randn(20_000), torch.randn(20_000)
cu = torch.tensor([0, 5_000, 20_000])
want = torch.ops.steppo_fast.step_gae(r, v, cu, 0.99, 0.95, None)
calls = 0
open(out, "w").write("ready")
while not os.path.exists(stop):
    got = torch.ops.steppo_fast.step_gae(r, v, cu, 0.99, 0.95, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    calls += 1
open(out, "w").write(str(calls))
"""


def start_holder(library, tmp_path):
    stop, out = tmp_path / "stop", tmp_path / "calls"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(library), str(stop), str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not out.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.05)
    return proc, stop, out


def finish_holder(proc, stop, out):
    stop.touch()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    err = proc.stderr.read()
    assert proc.returncode == 0, f"holder died (returncode {proc.returncode}): {err[-2000:]}"
    return int(out.read_text())


@requires_cpp
@pytest.mark.subprocess
def test_process_using_the_extension_survives_a_swapped_in_build(ai, tmp_path):
    """A process calls an op from the loaded library in a loop while a new build (here: a
    file of the same size whose bytes all differ, so any page read from the new file would
    crash it) is installed over that library many times."""
    import steppo_fast._C as built

    library = tmp_path / "steppo_fast_C.so"
    ai.install_file(built.__file__, str(library))
    size = os.path.getsize(library)
    garbage = tmp_path / "new_build.so"
    garbage.write_bytes(b"\xcc" * size)  # int3 everywhere
    proc, stop, out = start_holder(library, tmp_path)
    for _ in range(20):
        ai.install_file(str(garbage), str(library))
        time.sleep(0.02)
    calls = finish_holder(proc, stop, out)
    assert calls > 0


@requires_cpp
@pytest.mark.skipif(
    os.environ.get("STEPPO_TEST_REBUILD") != "1",
    reason="a full rebuild takes minutes: set STEPPO_TEST_REBUILD=1",
)
def test_process_using_the_extension_survives_pip_install_e(tmp_path):
    """The real thing: `pip install --no-build-isolation -e .` of this checkout while a
    process that loaded the installed extension calls an op in a loop."""
    import steppo_fast._C as built

    proc, stop, out = start_holder(built.__file__, tmp_path)
    inode = os.stat(built.__file__).st_ino
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", ROOT],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert os.stat(built.__file__).st_ino != inode  # a new file was installed
    assert finish_holder(proc, stop, out) > 0
