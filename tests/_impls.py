"""The backends (``impl=`` values) a test parametrises over, and the skip when one cannot run
an op here.

Every test of one property of a public op runs once per backend through the public function
(``steppo_fast.<op>(..., impl=impl)``): ``"torch"`` (the reference, the spec), ``"cpp"`` (the
C++ extension, when built) and ``"triton"`` (under the Triton interpreter: tests/conftest.py
sets ``TRITON_INTERPRET=1``; a test parametrised with ``"triton"`` joins the slow ``triton``
group). Parametrise with the plain strings, so the ids read ``[torch]``, ``[cpp]``,
``[triton]`` and ``-k cpp`` selects one backend::

    @pytest.mark.parametrize("impl", IMPLS)
    def test_x(impl):
        impl = impl_or_skip("segment_sum", impl)
"""

from __future__ import annotations

import pytest

IMPLS = ("torch", "cpp", "triton")


def impl_or_skip(op: str, impl: str) -> str:
    """``impl`` when that backend runs ``op`` on CPU tensors here; else skip the test, naming
    why (the C++ extension not built, triton not installed, the op not implemented there)."""
    from steppo_fast._dispatch import available_impls

    if impl not in available_impls(op, "cpu"):
        pytest.skip(f"{impl} cannot run {op} here")
    return impl


def _installed(impl: str) -> bool:
    """Whether the backend's code is here at all (the C++ extension built, triton installed)."""
    import importlib

    name = {"torch": "torch", "cpp": "steppo_fast._C", "triton": "triton"}[impl]
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def impls_for(*ops: str) -> tuple[str, ...]:
    """The backends of ``IMPLS`` that implement every one of ``ops`` (in IMPLS order): the
    parametrisation of a test calling those ops. A backend not installed here is kept (its
    tests then skip, with the reason, in ``impl_or_skip``), so the test ids do not depend on
    the build."""
    from steppo_fast._dispatch import available_impls

    here = set(IMPLS)
    for op in ops:
        here &= set(available_impls(op, "cpu"))
    return tuple(i for i in IMPLS if i in here or not _installed(i))
