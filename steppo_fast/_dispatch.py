"""Backend selection for the public ops (the ``impl=`` keyword).

A backend is a module exposing functions named like the public ops, with the same keyword
arguments minus ``impl`` and taking already-validated inputs:

- ``"torch"``  -> :mod:`steppo_fast.reference` (pure PyTorch; the spec; every device)
- ``"triton"`` -> :mod:`steppo_fast.kernels` (CUDA tensors; CPU tensors only when the Triton
  interpreter is on, i.e. ``TRITON_INTERPRET=1`` was set before triton was imported)
- ``"cpp"``    -> :mod:`steppo_fast.cpu` (C++ extension ``steppo_fast._C``, CPU tensors)

``impl="auto"`` picks Triton for CUDA tensors, C++ for CPU tensors when it is built (else the
reference, with a one-time warning), and falls back to the reference for an op a backend lacks.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

IMPLS = ("auto", "torch", "triton", "cpp")
_MODULES = {
    "torch": "steppo_fast.reference",
    "triton": "steppo_fast.kernels",
    "cpp": "steppo_fast.cpu",
}


@functools.cache
def _module(backend: str):
    """The backend's module, or the reason it cannot be imported (a str)."""
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton is a Linux x86-64 dependency
            return f"triton is not installed ({e})"
    if backend == "cpp":
        try:
            importlib.import_module("steppo_fast._C")
        except ImportError as e:
            return f"the C++ extension steppo_fast._C is not built ({e})"
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError as e:
        return f"{_MODULES[backend]} failed to import ({e})"


def device_type_of(tensors) -> str:
    """Device type of the first tensor among ``tensors`` ("cpu" when there is none)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def _unavailable_reason(backend: str, op: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``op`` on ``device_type`` tensors, else why not."""
    mod = _module(backend)
    if isinstance(mod, str):
        return mod
    if not hasattr(mod, op):
        return f"{backend} has no implementation of {op}"
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
    if backend == "cpp" and device_type != "cpu":
        return f"cpp runs on CPU tensors only, got {device_type} tensors"
    return None


def available_impls(op: str, device_type: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on tensors of ``device_type`` here."""
    return [
        b for b in ("torch", "triton", "cpp") if _unavailable_reason(b, op, device_type) is None
    ]


@functools.cache
def _warn_no_cpp_once(reason: str) -> None:
    warnings.warn(
        f"steppo_fast: {reason}; impl='auto' uses the PyTorch reference on CPU "
        "(reinstall with `pip install --no-build-isolation -e .` to build it)",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(impl: str, op: str, *tensors):
    """Return the backend module that runs ``op`` for ``tensors`` under ``impl``.

    Raises ``ValueError`` for an unknown ``impl`` or an unavailable backend, naming the ones
    that are available for this op and device.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    device_type = device_type_of(tensors)
    if impl == "auto":
        preferred = ("triton", "torch") if device_type == "cuda" else ("cpp", "torch")
        for backend in preferred:
            reason = _unavailable_reason(backend, op, device_type)
            if reason is None:
                return _module(backend)
            if backend == "cpp" and isinstance(_module("cpp"), str):
                _warn_no_cpp_once(_module("cpp"))
        raise AssertionError("the torch reference is always available")  # pragma: no cover
    reason = _unavailable_reason(impl, op, device_type)
    if reason is not None:
        avail = ", ".join(available_impls(op, device_type)) or "none"
        raise ValueError(f"impl: {impl!r} is unavailable for {op} ({reason}); available: {avail}")
    return _module(impl)
