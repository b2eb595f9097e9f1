"""Cheap argument checks shared by every public op.

Every check raises ``ValueError`` naming the argument, (where it applies) the index, and the rule
broken. Nothing is clamped, cast silently or dropped.

Two kinds of checks:

- **metadata checks** (type, ndim, shape, dtype, device, option choices): free, always run;
- **value checks** (offsets start at 0 / non-decreasing / end at the axis length, non-empty
  segments, finiteness, weights >= 0, indices in range): they read tensor values, so they cost
  O(len) work plus one host sync on an accelerator, and cannot be traced by ``torch.compile``
  (a Python branch on a tensor value is data-dependent).

**Compile policy (the one place it is decided):** while ``torch.compile`` traces
(``torch.compiler.is_compiling()``), every value check here returns without reading anything;
metadata checks still run. A compiled graph therefore trusts its inputs' values: validate a
batch once in eager (e.g. ``StepBatch.validate()``, or one eager call of the op) before
compiling a training step that consumes it. Each value check reads its tensor with one reduction
and one host transfer (``aminmax`` for finiteness: NaN and inf propagate into min/max), and
locates the first bad index with ``nonzero()`` only on failure, to name it.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    """``x`` is a tensor with ``ndim`` dims, a dtype in ``dtypes`` and on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(x.dtype).replace('torch.', '')} not in ({names})")
    if device is not None and x.device != torch.device(device):
        raise ValueError(
            f"{name}: on device {x.device}, expected {device} (all inputs on one device)"
        )


def check_float(name: str, x, *, ndim: int | None = 1, length: int | None = None, device=None):
    """A floating tensor (fp32/bf16/fp16/fp64) with optional exact leading length."""
    check_tensor(name, x, ndim=ndim, dtypes=FLOAT_DTYPES, device=device)
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name}: length {x.shape[0]} != expected {length}")


def check_index(name: str, x, *, length: int | None = None, device=None) -> None:
    """A 1-D integer tensor (int32/int64) with optional exact length."""
    check_tensor(name, x, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name}: length {x.shape[0]} != expected {length}")


def values_checked() -> bool:
    """Whether the value checks run now: True in eager mode, False while ``torch.compile``
    traces (see the module docstring: a compiled graph trusts its inputs' values)."""
    return not torch.compiler.is_compiling()


def check_offsets(name: str, cu, length: int | None = None, *, device=None) -> int:
    """CSR offsets: 1-D int32/int64, at least one entry, ``cu[0] == 0``, non-decreasing,
    ``cu[-1] == length`` (when given). Returns the number of segments ``len(cu) - 1``.

    The value rules (start, order, end) are skipped under ``torch.compile``
    (:func:`values_checked`); the metadata rules always hold."""
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu.numel() == 0:
        raise ValueError(f"{name}: offsets need at least one entry (cu[0] == 0)")
    if not values_checked():
        return cu.numel() - 1
    # one host transfer for the common (valid) case: first entry, last entry, smallest step
    # (diff().min() measured 4x faster than a (cu[1:] < cu[:-1]) any/nonzero at 65k entries)
    if cu.numel() == 1:
        first = last = int(cu[0])
        smallest_step = 0
    else:
        first, last, smallest_step = torch.stack([cu[0], cu[-1], cu.diff().min()]).tolist()
    if first != 0:
        raise ValueError(f"{name}: offsets must start at 0, got {name}[0] = {first}")
    if smallest_step < 0:
        i = int((cu[1:] < cu[:-1]).nonzero()[0, 0]) + 1
        raise ValueError(
            f"{name}: offsets must be non-decreasing, but {name}[{i}] = {int(cu[i])} "
            f"< {name}[{i - 1}] = {int(cu[i - 1])}"
        )
    if length is not None and last != length:
        raise ValueError(f"{name}: offsets must end at the axis length {length}, got {last}")
    return cu.numel() - 1


def check_nonempty_segments(name: str, cu) -> None:
    """Every segment of ``cu`` has at least one entry (e.g. every step has an action token).
    A value check: skipped under ``torch.compile``."""
    if cu.numel() > 1 and values_checked() and int(cu.diff().min()) <= 0:
        i = int((cu[1:] <= cu[:-1]).nonzero()[0, 0])
        raise ValueError(f"{name}: segment {i} is empty; every segment needs >= 1 entry")


def _min_max(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``x`` as Python floats in one host transfer; NaN if any entry is NaN."""
    return tuple(torch.stack(torch.aminmax(x.reshape(-1))).double().tolist())


def check_finite(name: str, x: torch.Tensor) -> None:
    """Every entry of float ``x`` is finite (no NaN or inf); names the first bad index.
    A value check: skipped under ``torch.compile``. Cost: one ``aminmax`` + one host transfer
    (``nonzero`` only on failure)."""
    if x.numel() == 0 or not values_checked():
        return
    low, high = _min_max(x)
    if math.isfinite(low) and math.isfinite(high):
        return
    flat = x.reshape(-1)
    i = int((~torch.isfinite(flat)).nonzero()[0, 0])
    raise ValueError(f"{name}: entry {i} is {float(flat[i])}; all must be finite")


def check_weights(name: str, w: torch.Tensor) -> None:
    """Every entry of float weights ``w`` is finite and >= 0; names the first bad index.
    A value check: skipped under ``torch.compile``."""
    if w.numel() == 0 or not values_checked():
        return
    low, high = _min_max(w)
    if math.isfinite(low) and math.isfinite(high) and low >= 0:
        return
    flat = w.reshape(-1)
    i = int((~(torch.isfinite(flat) & (flat >= 0))).nonzero()[0, 0])
    raise ValueError(f"{name}: {name}[{i}] = {float(flat[i])} must be finite and >= 0")


def check_index_range(name: str, x: torch.Tensor, high: int, *, rule: str | None = None) -> None:
    """Every entry of integer ``x`` lies in ``[0, high)``; names the first bad index (``rule``
    describes the range in the message). A value check: skipped under ``torch.compile``."""
    if x.numel() == 0 or not values_checked():
        return
    low_seen, high_seen = torch.stack(torch.aminmax(x)).tolist()
    if low_seen >= 0 and high_seen < high:
        return
    i = int(((x < 0) | (x >= high)).nonzero()[0, 0])
    rule = rule or f"[0, {high})"
    raise ValueError(f"{name}: {name}[{i}] = {int(x[i])} is outside {rule}")


def is_finite_number(value) -> bool:
    """``math.isfinite(value)`` for a real number, written as comparisons so that it also
    traces for the symbolic floats ``torch.compile(dynamic=True)`` passes (which
    ``math.isfinite`` rejects); NaN fails both comparisons."""
    return -math.inf < value < math.inf


def check_number(name: str, value, ok=None, rule: str = "finite") -> float:
    """A finite real number (Python number or 1-element tensor, not bool) for which
    ``ok(value)`` holds (any finite value when ``ok`` is None); returns it as a float, else
    ``ValueError`` "{name}: must be {rule}, got ..." (marked "not finite" for nan/inf). A
    tensor is read on the host, which ``torch.compile`` cannot trace: while compiling it must
    be a Python number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if torch.compiler.is_compiling():
            raise ValueError(
                f"{name}: pass a Python number under torch.compile (a tensor would be read on "
                "the host, a graph break)"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not is_finite_number(value):
        raise ValueError(f"{name}: must be {rule}, got {value!r} (not finite)")
    if ok is not None and not ok(value):
        raise ValueError(f"{name}: must be {rule}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 if any float input is fp64 (the gradcheck path), else fp32 (bf16/fp16 accumulate
    in fp32)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32
