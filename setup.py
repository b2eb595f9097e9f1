"""Build script: the Python package, the Triton kernels in ``kernels/steppo_fast_kernels/``
installed as ``steppo_fast.kernels`` and, when ``csrc/`` has sources and torch is importable, the
C++ CPU extension ``steppo_fast._C``.

``kernels/`` itself has no ``__init__.py`` on purpose: from the repository root (``python -m``,
``torchrun -m``, ``python -m pytest``) the root is on ``sys.path``, and a regular package named
``kernels`` there would shadow Hugging Face's ``kernels`` package, which transformers imports. A
folder without ``__init__.py`` is at most a namespace-package candidate, which loses to any
regular ``kernels`` package later on ``sys.path``.

A rebuild (``pip install --no-build-isolation -e .``) swaps the new ``_C*.so`` in atomically
(csrc/atomic_install.py): running processes keep the library they loaded."""

import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def atomic_build_ext(base):
    """``base`` (a build_ext command) with atomic installs of built libraries."""
    path = os.path.join(HERE, "csrc", "atomic_install.py")
    spec = importlib.util.spec_from_file_location("_steppo_atomic_install", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atomic_build_ext(base)


def cpp_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("STEPPO_NO_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable in the build env: pure-Python install
        return [], {}
    ext = CppExtension(
        name="steppo_fast._C",
        sources=sources,
        extra_compile_args=["-O3", "-g0", "-std=c++17"],
    )
    build_ext = atomic_build_ext(BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = cpp_extensions()

KERNELS_DIR = "kernels/steppo_fast_kernels"
KERNEL_FAMILIES = ("segment", "scan", "logprobs", "step_loss")
KERNEL_PACKAGES = ["steppo_fast.kernels", *(f"steppo_fast.kernels.{f}" for f in KERNEL_FAMILIES)]

setup(
    packages=[
        "steppo_fast",
        "steppo_fast.batch",
        "steppo_fast.cpp",
        "steppo_fast.reference",
        "steppo_fast.ops",
        "steppo_fast.trainer",
        "steppo_fast.envs",
        "steppo_fast.integrations",
        *KERNEL_PACKAGES,
    ],
    package_dir={"steppo_fast": "steppo_fast", "steppo_fast.kernels": KERNELS_DIR},
    package_data={"steppo_fast.envs": ["*.txt", "*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
