"""A device-discipline checker for a CPU-only machine (used by
tests/trainer/test_trainer_device.py).

With no GPU every tensor is on the CPU, so a tensor the trainer forgets to put on the model's
device cannot fail here. :class:`DeviceTaint` (a ``TorchFunctionMode``) simulates two devices
by *tagging* tensors instead:

- ``DEV`` ("on the model's device"): the parameters and buffers of the given modules, factory
  calls with an explicit ``device=`` (``torch.zeros(..., device=d)``), ``.to(<device>)`` /
  ``.cuda()``, and every result of an op with a ``DEV`` input;
- ``HOST``: factory calls from this package's code (libraries such as torch's FSDP or
  transformers choose their own devices: their factories stay untagged) without ``device=``
  (``torch.tensor(list)``, ``torch.arange(n)``, ``torch.from_numpy``, which is wrapped while
  the mode is active since modes do not see it) or with the string
  ``device="cpu"`` (a deliberate host tensor), ``.cpu()``, and results of ops whose inputs
  are ``HOST`` (and none ``DEV``);
- untagged: tensors made before the mode started or by C++ internals (autograd's ``.grad``).

An op that receives a ``DEV`` tensor and a ``HOST`` tensor of dimension >= 1 is recorded as a
violation: on a GPU it is a "tensors on different devices" error (or, for an index, a hidden
host-to-device copy). 0-dim host tensors mix with CUDA tensors legally and are exempt; so is
``copy_`` (a cross-device copy is explicit). Reads of ``DEV`` tensors into Python
(``int()``, ``float()``, ``bool()``, ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``)
are counted as device -> host syncs, with the source line that asked for them. A move that
returns its own (tagged) input on the CPU (``x.cpu()``, ``x.to(cpu)``) returns an alias
instead, so the source keeps its tag, as it would keep its device on a GPU; an untagged input
(e.g. a parameter moved by ``module.to(device)``) is tagged in place.

The tag lives in a Python attribute of the tensor object, stamped with the mode that set it
(a later mode ignores an earlier mode's tags: tensors cached across tests start untagged);
views and in-place results that return the same object keep it. This is a model of CUDA's
rules, not CUDA: it catches forgotten ``device=`` arguments and per-token host reads, not
kernel-level problems.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

DEV, HOST = "dev", "host"
_ATTR = "_steppo_device_tag"
FACTORIES = {
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "randperm",
    "linspace",
    "eye",
    "from_numpy",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand_like",
    "randn_like",
}
READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu"}
MOVES = {"to", "cpu", "cuda"}
EXEMPT = {"copy_", "__get__", "__set__", "size", "dim", "numel", "stride"}
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


OWN_CODE = (os.path.join(PACKAGE, "steppo_fast") + os.sep,)


# torch's thin Python wrappers of tensor functions (not subsystems such as FSDP or optim)
TORCH_WRAPPERS = tuple(
    os.path.join(TORCH_DIR, *p)
    for p in (("functional.py",), ("_tensor.py",), ("overrides.py",), ("utils", "_device.py"))
)


def _called_from(own_code: tuple[str, ...]) -> bool:
    """Whether the code that called the factory (skipping torch's thin wrappers and this
    module) is in one of the ``own_code`` paths (default: steppo_fast/). Factories inside
    libraries (transformers, FSDP, optimizers) choose their own devices and stay untagged."""
    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here and path not in TORCH_WRAPPERS:
            return path.startswith(own_code)
        frame = frame.f_back
    return False


def tag_of(t: torch.Tensor, run: object | None = None) -> str | None:
    """The tag given by the latest mode (or by the mode ``run``; another mode's tag: None)."""
    owner, tag = getattr(t, _ATTR, (None, None))
    return tag if run is None or owner is run else None


def _set_tag(t, tag: str | None, run: object) -> None:
    if tag is not None and isinstance(t, torch.Tensor):
        try:
            setattr(t, _ATTR, (run, tag))
        except (AttributeError, RuntimeError):  # e.g. some C++-owned tensors
            pass


def _in_package(frame) -> bool:
    """Whether the frame's file is this repository's code: under the checkout, not under its
    tests/ or .venv* (judged on the path relative to the checkout, which may itself sit in a
    folder called tests)."""
    path = os.path.abspath(frame.filename)
    if not path.startswith(PACKAGE + os.sep):
        return False
    top = os.path.relpath(path, PACKAGE).split(os.sep)[0]
    return top != "tests" and not top.startswith(".venv")


def _where() -> tuple[str, bool]:
    """(the innermost source line of this repository, not tests/, on the call stack; whether
    that line made the call itself rather than through a library such as transformers)."""
    frames = traceback.extract_stack()[:-2]  # drop _where and __torch_function__
    for depth, frame in enumerate(reversed(frames)):
        if _in_package(frame):
            path = os.path.relpath(os.path.abspath(frame.filename), PACKAGE)
            return f"{path}:{frame.lineno}", depth == 0
    return "<outside the package>", False


class DeviceTaint(TorchFunctionMode):
    """Tag tensors DEV / HOST (module docstring), record mixes and device -> host reads.

    Attributes after the ``with`` block: ``violations`` [(op name, where, shapes)],
    ``reads`` [(op name, where, direct)] of DEV tensors (``direct``: the package line itself
    read, not a library it called)."""

    def __init__(self, *modules: torch.nn.Module | None, own_code: tuple[str, ...] = OWN_CODE):
        super().__init__()
        self.own_code = tuple(own_code)
        self.run = object()  # stamps this mode's tags
        self.violations: list[tuple[str, str, str]] = []
        self.reads: list[tuple[str, str, bool]] = []
        for module in modules:
            if module is None:
                continue
            for t in list(module.parameters()) + list(module.buffers()):
                _set_tag(t, DEV, self.run)

    def __enter__(self):
        # torch.from_numpy is not routed through torch-function modes: wrap it while the mode
        # is active so the numpy-built CPU tensors of this package (StepBatch) are HOST
        self._from_numpy = torch.from_numpy

        def from_numpy(array):
            out = self._from_numpy(array)
            if _called_from(self.own_code):
                _set_tag(out, HOST, self.run)
            return out

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def mark(self, *tensors: torch.Tensor) -> None:
        """Declare ``tensors`` to be on the model's device."""
        for t in tensors:
            _set_tag(t, DEV, self.run)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        tags = [tag_of(x, self.run) for x in inputs]
        if name in READS and DEV in tags[:1]:
            self.reads.append((name, *_where()))
        if name not in EXEMPT and DEV in tags:
            mixed = [x for x, tag in zip(inputs, tags) if tag == HOST and x.dim() >= 1]
            if mixed:
                shapes = ", ".join(str(tuple(x.shape)) for x in mixed)
                self.violations.append((name, _where()[0], shapes))
        out = func(*args, **kwargs)
        tag = self._out_tag(name, args, kwargs, tags, self.run)
        if tag is None and name in FACTORIES and _called_from(self.own_code):
            tag = HOST
        if name in MOVES and out is args[0] and tags[0] is not None and tag != tags[0]:
            # on the CPU a move to the CPU returns the tensor itself; on a GPU it is a copy on
            # the other device: return an alias so the source keeps its own tag
            out = out.view_as(out)
        for t in tree_flatten(out)[0]:
            _set_tag(t, tag, self.run)
        return out

    @staticmethod
    def _out_tag(name, args, kwargs, tags, run) -> str | None:
        if name in FACTORIES and kwargs.get("device") is not None:
            return HOST if kwargs["device"] == "cpu" else DEV  # the string "cpu": deliberate
        if name == "to":
            target = list(args[1:]) + [kwargs.get("device")]
            if any(isinstance(a, (str, torch.device)) for a in target if a is not None):
                return DEV
            if any(isinstance(a, torch.Tensor) for a in args[1:]):  # .to(other): its device
                return tag_of(args[1], run) or (DEV if DEV in tags else None)
        if name == "cuda":
            return DEV
        if name == "cpu":
            return HOST
        if DEV in tags:
            return DEV
        if HOST in tags:
            return HOST
        return None

    def report(self) -> str:
        lines = [f"{n} at {w} with host tensors {s}" for n, w, s in self.violations[:20]]
        return "\n".join(lines)
