"""Backend selection for the public ops (the ``impl=`` keyword): the one place that decides
which backend runs a call.

A backend is a module exposing functions named like the public ops, taking already-validated
inputs (the public signatures minus ``impl``; ``step_policy_loss`` takes its tensors and one
:class:`steppo_fast._defs.StepLossOptions`). Backends never fall back on their own: every
fallback is a rule below.

Backends (module named after the ``impl`` value):

- ``"torch"``  -> :mod:`steppo_fast.reference` (pure PyTorch; the spec; every device)
- ``"triton"`` -> :mod:`steppo_fast.kernels` (kernels/steppo_fast_kernels on disk; CUDA tensors,
  CPU tensors only when the Triton interpreter is on, i.e. ``TRITON_INTERPRET=1`` was set
  before triton was imported)
- ``"cpp"``    -> :mod:`steppo_fast.cpp` (the C++ extension ``steppo_fast._C`` and the tuned CPU
  ``linear_logprobs``; CPU tensors)

Choice, in order:

1. ``impl="auto"``: the first available of ``AUTO_ORDER[device type]`` that has the op (Triton
   on CUDA, C++ on CPU, else the reference; a missing C++ build warns once). An explicit
   ``impl`` must be available for the op and device, else ``ValueError`` naming the ones that
   are.
2. ``RULES``: (op, backend, condition) -> backend, reason. The first matching rule redirects
   the call (the target is always the reference, which runs everything).

The condition reads only :class:`Facts` (device type, dtypes, ``requires_grad``, grad mode), all
constants while ``torch.compile`` traces: under compilation the choice is made eagerly at trace
time (``torch.compiler.assume_constant_result`` yields the module's name, a guardable
constant; ``importlib`` and ``functools.cache`` are not traceable) and the module is reached by
plain ``import`` statements. A later call with other facts re-traces through Dynamo's guards.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

IMPLS = ("auto", "torch", "triton", "cpp")
MODULES = {
    "torch": "steppo_fast.reference",
    "triton": "steppo_fast.kernels",
    "cpp": "steppo_fast.cpp",
}
# impl="auto": backends tried in order per device type (any other device: the reference)
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class Facts:
    """What the rules may read about one call."""

    device_type: str  # of the first tensor ("cpu" when there is none)
    fp64: bool  # some input is an fp64 tensor
    grad_after_first: bool  # grad mode is on and an input other than the first requires grad


def _facts_of(tensors) -> tuple[str, bool, bool]:
    """The fields of :class:`Facts` for a call's tensors, as plain values (Dynamo traces this
    without constructing a dataclass)."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    device_type = present[0].device.type if present else "cpu"
    fp64 = any(t.dtype == torch.float64 for t in present)
    grad_after_first = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors[1:]
    )
    return device_type, fp64, grad_after_first


@dataclass(frozen=True)
class Rule:
    """A fallback: ``op`` ("*" = every op) chosen on ``backend`` goes to ``to`` when ``when``."""

    op: str
    backend: str
    when: Callable[[Facts], bool]
    to: str
    reason: str


RULES = (
    Rule(
        "*",
        "triton",
        lambda f: f.fp64,
        "torch",
        "fp64 inputs: the Triton kernels compute in fp32, and fp64 is the gradcheck path",
    ),
    Rule(
        "step_policy_loss",
        "cpp",
        lambda f: f.grad_after_first,
        "torch",
        "a float input other than logp requires grad: the C++ loss produces d loss / d logp only",
    ),
)


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
        return importlib.import_module(MODULES[backend])
    except ImportError as e:
        return f"{MODULES[backend]} failed to import ({e})"


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
    return [b for b in MODULES if _unavailable_reason(b, op, device_type) is None]


@functools.cache
def _warn_no_cpp_once(reason: str) -> None:
    warnings.warn(
        f"steppo_fast: {reason}; impl='auto' uses the PyTorch reference on CPU "
        "(reinstall with `pip install --no-build-isolation -e .` to build it)",
        RuntimeWarning,
        stacklevel=5,
    )


def choose(impl: str, op: str, facts: Facts) -> tuple[str, str]:
    """(backend, why) for ``op`` under ``impl`` with ``facts``: step 1 then ``RULES``.

    Raises ``ValueError`` for an unknown ``impl`` or an unavailable explicit backend, naming the
    ones that are available for this op and device.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    device_type = facts.device_type
    if impl == "auto":
        for backend in AUTO_ORDER.get(device_type, ("torch",)):
            if _unavailable_reason(backend, op, device_type) is None:
                why = f"impl='auto' on {device_type} tensors"
                break
            if backend == "cpp" and isinstance(_module("cpp"), str):
                _warn_no_cpp_once(_module("cpp"))
    else:
        reason = _unavailable_reason(impl, op, device_type)
        if reason is not None:
            avail = ", ".join(available_impls(op, device_type)) or "none"
            raise ValueError(
                f"impl: {impl!r} is unavailable for {op} ({reason}); available: {avail}"
            )
        backend, why = impl, f"impl={impl!r}"
    for rule in RULES:
        if rule.backend == backend and rule.op in ("*", op) and rule.when(facts):
            return rule.to, rule.reason
    return backend, why


def _resolve_eager(impl: str, op: str, facts: Facts):
    return _module(choose(impl, op, facts)[0])


@torch.compiler.assume_constant_result
def _backend_name(impl: str, op: str, device_type: str, fp64: bool, grad_after_first: bool) -> str:
    """Name of the backend module (runs eagerly at trace time; a constant in the graph)."""
    return _resolve_eager(impl, op, Facts(device_type, fp64, grad_after_first)).__name__


def _traceable_import(name: str):
    """The backend module called ``name`` (already imported by ``_backend_name``), through
    ``import`` statements, which Dynamo traces (``importlib.import_module`` it does not)."""
    if name == "steppo_fast.cpp":
        from . import cpp as module
    elif name == "steppo_fast.kernels":
        from . import kernels as module
    else:
        from . import reference as module
    return module


def resolve(impl: str, op: str, *tensors):
    """The backend module running ``op`` for ``tensors`` (every tensor input of the call, the
    differentiable one first; None entries allowed) under ``impl`` (see :func:`choose`)."""
    facts = _facts_of(tensors)
    if not torch.compiler.is_compiling():
        return _resolve_eager(impl, op, Facts(*facts))
    return _traceable_import(_backend_name(impl, op, *facts))
