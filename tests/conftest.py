"""Test configuration. The Triton interpreter must be switched on before triton decorates any
kernel, so it is set here, before steppo_fast (or triton) is imported by a test module."""

import os
import sys
from fnmatch import fnmatch
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _tolerance import pair_tol  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TESTS = Path(__file__).resolve().parent

# A few test modules import helpers from test modules of other folders (the GPU-config tests
# reuse the Triton tests' oracles and bounds). pytest's default "prepend" import mode puts only
# a test file's own folder on sys.path, so every test folder goes on it here (appended: nothing
# installed is shadowed); test basenames are unique across folders (tests/repo/test_markers.py).
for _folder in sorted(TESTS.iterdir()):
    if _folder.is_dir() and not _folder.name.startswith(("_", ".")):
        if str(_folder) not in sys.path:
            sys.path.append(str(_folder))


def rel_path(item) -> str:
    """The test file of ``item`` relative to tests/, posix (e.g. ``segment/test_segments.py``)."""
    path = Path(str(item.fspath)).resolve()
    try:
        return path.relative_to(TESTS).as_posix()
    except ValueError:  # a test file outside tests/ (given by path on the command line)
        return path.name


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the tests/-relative ``path`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch(path, pattern) for pattern in patterns)


# Files that run (tiny) transformers models: one torch thread. Small models are fastest on one
# thread, and two threads on a loaded 2-vCPU machine made them up to ~10x slower; the kernel and
# C++ tests keep the default thread count (their threaded paths are what they test). The count is
# restored after each test, so the result does not depend on test order (Trainer sets it too).
ONE_THREAD_FILES = (
    "trainer/test_trainer*",
    "trainer/test_distributed.py",
    "model/test_layouts_model.py",
)


@pytest.fixture(autouse=True)
def _threads(request):
    if not matches(rel_path(request.node), ONE_THREAD_FILES):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# (atol, rtol) per dtype for results of magnitude <= ~1 built from at most TOL_ROUNDINGS
# roundings (short sums, elementwise chains), compared between two evaluations in the
# computation dtype: pair_tol (tests/_tolerance.py) = 2 * LAMBDA * sqrt(n) * u. bf16 inputs are
# compared with an fp32 reference fed the same (rounded) bf16 values and computed in fp32: the
# fp32 tolerance. Longer reductions or larger magnitudes use tests/_tolerance.py directly.
TOL_ROUNDINGS = 400
TOL = {
    torch.float64: pair_tol(torch.float64, TOL_ROUNDINGS),
    torch.float32: pair_tol(torch.float32, TOL_ROUNDINGS),
    torch.bfloat16: pair_tol(torch.float32, TOL_ROUNDINGS),
}


# Slow groups, by test file (fnmatch patterns on the path relative to tests/). Each test of a
# group gets the group's marker and `slow`, so `pytest -m "not slow"` is the fast subset and
# `-m triton` one group. A test of any file parametrised with the value "triton" (an `impl`,
# tests/_impls.py) joins the triton group too, and a test marked with a group's marker by hand
# (``@pytest.mark.subprocess``: it starts a fresh Python, ~2-7 s of imports) gets `slow`; so
# does a test parametrised with a large layout (LARGE_CASES: the `large` group). The
# markers are registered in pyproject.toml (--strict-markers rejects unknown ones);
# tests/repo/test_markers.py checks every pattern matches a file.
SLOW_GROUPS = {
    "trainer": (
        "trainer/test_trainer*",
        "trainer/test_distributed.py",
        "model/test_layouts_model.py",
    ),
    "triton": ("*/test_triton_*", "ops/test_compile.py"),
    "gpu_compile": ("gpu_compile/test_triton_gpu_compile.py",),
    "subprocess": (),  # marked by hand
    "large": (),  # by parametrisation: LARGE_CASES
}
# Named input layouts of 5k-130k entries (tests/_csr.py LAYOUTS, step_loss/test_cpp_loss.py
# EDGE_CASES): the C++ kernels over several thread-pool chunks, checked against the fp64
# reference. A test parametrised with one of these names is in the `large` group.
LARGE_CASES = ("long_5000", "long_tokens", "many_short", "long_5000_steps", "many_trajectories")


def group_markers(path: str, params: dict, marked: tuple[str, ...] = ()) -> list[str]:
    """The slow-group markers of a test in the tests/-relative file ``path`` with
    parametrisation ``params`` and the markers ``marked`` it carries by hand."""
    groups = [g for g, patterns in SLOW_GROUPS.items() if matches(path, patterns) or g in marked]
    if "gpu_compile" in groups and "triton" in groups:
        groups.remove("triton")  # test_triton_gpu_compile: ptxas, not the interpreter
    if "triton" not in groups and any(
        isinstance(v, str) and v == "triton" for v in params.values()
    ):
        groups.append("triton")
    if "large" not in groups and any(
        isinstance(v, str) and v in LARGE_CASES for v in params.values()
    ):
        groups.append("large")
    return [*groups, "slow"] if groups else []


def _add_group_markers(items):
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        marked = tuple(m.name for m in item.iter_markers() if m.name in SLOW_GROUPS)
        for name in group_markers(rel_path(item), params, marked):
            if name not in marked and item.get_closest_marker(name) is None:
                item.add_marker(name)


# Test modules whose floating-point results depend on the CPU code path (torch's ATen kernels,
# MKL / oneDNN GEMMs, numpy's matmul and exp under the Triton interpreter) and are compared
# with a tolerance: CI runs them a second time under another code path (scripts/test.sh), so a
# tolerance that holds on one CPU's kernels only fails there first. ``-m numerics`` selects
# them. Left out to keep that pass short: the C++ tests (compiled with fixed flags: these
# variables do not change their arithmetic; their bound is one rounding from double), the
# scans (adds and multiplies in a fixed order: exact IEEE operations, the same bits on any
# path), fp64-dominated modules (test_loss, test_loss_grad, test_advantages), the GPU-tile
# repeats of the same kernels (test_triton_gpu_configs) and torch.compile (slow).
NUMERIC_FILES = (
    "model/test_layouts_model.py",
    "logprobs/test_logprobs.py",
    "logprobs/test_triton_logprobs.py",
    "segment/test_segments.py",
    "segment/test_triton_segments.py",
    "step_loss/test_triton_step_loss.py",
    "step_loss/test_triton_step_loss_grads.py",
)
# Within them, tests that check registration, tracing or argument errors only.
NOT_NUMERIC = ("opcheck", "fullgraph", "value_error", "raises", "gradcheck")


def pytest_collection_modifyitems(config, items):
    _add_group_markers(items)
    numerics = pytest.mark.numerics
    for item in items:
        if matches(rel_path(item), NUMERIC_FILES) and not any(w in item.name for w in NOT_NUMERIC):
            item.add_marker(numerics)
