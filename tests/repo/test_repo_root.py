"""Running from the repository root: the top-level ``kernels/`` folder (the Triton code, installed
as ``steppo_fast.kernels``) must never shadow Hugging Face's ``kernels`` package, which
transformers imports. ``python -m``, ``python -c``, ``torchrun -m`` and ``python -m pytest`` put
the current directory first on ``sys.path``; a regular ``kernels`` package there would win.

Also: a wheel built from the tracked files installs every kernel module as
``steppo_fast.kernels.*`` and no top-level ``kernels``."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"


def _run(args, cwd=ROOT, env=None, timeout=600):
    """``python *args`` in ``cwd`` (the repo root by default), with no inherited PYTHONPATH."""
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert KERNELS.is_dir()
    assert not (KERNELS / "__init__.py").exists(), (
        "an __init__.py in kernels/ makes the repo root shadow Hugging Face's `kernels` package"
    )
    assert (KERNELS / "steppo_fast_kernels" / "__init__.py").exists()


def test_import_kernels_from_repo_root_finds_a_regular_package_later_on_the_path(tmp_path):
    """A regular ``kernels`` package anywhere later on ``sys.path`` (here a temporary site dir,
    standing for Hugging Face's) wins over the repo root's ``kernels/`` folder."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'third-party'\n")
    code = "import kernels; print(kernels.__file__); from kernels import CUDAProperties"
    out = _run(["-c", code], env={"PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == fake / "__init__.py"


def test_installed_hf_kernels_resolves_from_repo_root():
    """When Hugging Face's ``kernels`` is installed, ``import kernels`` from the repo root is it."""
    from importlib import metadata

    try:
        dist = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    out = _run(["-c", "import kernels; print(kernels.__file__)"])
    assert out.returncode == 0, out.stderr
    where = Path(out.stdout.strip()).resolve()
    assert where.is_relative_to(Path(dist.locate_file("")).resolve()), where


@pytest.mark.trainer
@pytest.mark.slow
def test_python_m_trainer_from_repo_root(tmp_path):
    pytest.importorskip("transformers")
    args = ["-m", "steppo_fast.trainer", "train", "--iters", "1", "--out", str(tmp_path / "run")]
    small = ["--groups", "2", "--group-size", "2", "--hidden-size", "16", "--num-heads", "2"]
    quiet = ["--eval-every", "0", "--no-progress", "--no-plot"]
    out = _run([*args, *small, *quiet])
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0


@pytest.mark.slow
def test_wheel_installs_every_kernel_module_under_the_package(tmp_path):
    """A pure-Python wheel (``STEPPO_NO_CPP=1``) of the tracked files: every
    ``kernels/steppo_fast_kernels/**.py`` is in it as ``steppo_fast/kernels/**.py`` and every
    ``steppo_fast/**.py`` as itself (setup.py's package list cannot silently miss a family
    folder or a subpackage), and nothing is installed as a top-level ``kernels``."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        if name.startswith(("bench/results/", "docs/")) and not name.endswith(".md"):
            continue  # large binary results are not part of the package
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = _run(
        ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=src,
        env={"STEPPO_NO_CPP": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (src / "dist").glob("steppo_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_src = ROOT / "kernels" / "steppo_fast_kernels"
    want = {
        "steppo_fast/kernels/" + p.relative_to(kernel_src).as_posix()
        for p in kernel_src.rglob("*.py")
        if str(p.relative_to(ROOT)) in files
    }
    assert want and want <= names, sorted(want - names)
    assert not [n for n in names if n.startswith("kernels/")]
    assert "steppo_fast/trainer/loop.py" in names
    # every subpackage of steppo_fast/ is listed in setup.py (e.g. steppo_fast/batch/)
    package = {n for n in files if n.startswith("steppo_fast/") and n.endswith(".py")}
    assert package and package <= names, sorted(package - names)
