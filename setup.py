"""Build script: the Python package, Triton kernels as ``steppo_fast.kernels`` and, when
``csrc/`` has sources and torch is importable, the C++ CPU extension ``steppo_fast._C``."""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
        extra_compile_args=["-O3", "-fopenmp", "-g0", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    packages=[
        "steppo_fast",
        "steppo_fast.reference",
        "steppo_fast.ops",
        "steppo_fast.trainer",
        "steppo_fast.envs",
        "steppo_fast.integrations",
        "steppo_fast.kernels",
    ],
    package_dir={"steppo_fast": "steppo_fast", "steppo_fast.kernels": "kernels"},
    package_data={"steppo_fast.envs": ["*.txt", "*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
