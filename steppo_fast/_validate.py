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
(``aminmax`` for finiteness: NaN and inf propagate into min/max), and locates the first bad
index with ``nonzero()`` only on failure, to name it. An op reads everything its value checks
need -- the (min, max) of its float and index tensors, the (first, last, smallest step) of its
offsets -- with :func:`read_values` in **one** host transfer and hands each to its check
(``bounds=`` / ``summary=``): the advantage, loss and log-prob ops make one host sync per
call, whatever the number of inputs.
"""

from __future__ import annotations

import contextlib
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


def check_offsets_metadata(name: str, cu, *, device=None) -> None:
    """The metadata rules of :func:`check_offsets` (1-D int32/int64, at least one entry)."""
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu.numel() == 0:
        raise ValueError(f"{name}: offsets need at least one entry (cu[0] == 0)")


def check_offsets(name: str, cu, length: int | None = None, *, device=None, summary=None) -> int:
    """CSR offsets: 1-D int32/int64, at least one entry, ``cu[0] == 0``, non-decreasing,
    ``cu[-1] == length`` (when given). Returns the number of segments ``len(cu) - 1``.

    ``summary``: ``cu``'s (first, last, smallest step) from :func:`read_values`, when the
    caller read it together with other tensors (else read here, one host transfer).
    The value rules (start, order, end) are skipped under ``torch.compile``
    (:func:`values_checked`); the metadata rules always hold."""
    check_offsets_metadata(name, cu, device=device)
    if not values_checked():
        return cu.numel() - 1
    # one host transfer for the common (valid) case: first entry, last entry, smallest step
    # (diff().min() measured 4x faster than a (cu[1:] < cu[:-1]) any/nonzero at 65k entries)
    if summary is not None:
        first, last, smallest_step = (int(v) for v in summary)
    elif cu.numel() == 1:
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


def check_nonempty_segments(name: str, cu, *, smallest_step: int | None = None) -> None:
    """Every segment of ``cu`` has at least one entry (e.g. every step has an action token).
    ``smallest_step``: ``min(cu.diff())`` when already read (:func:`read_values`).
    A value check: skipped under ``torch.compile``."""
    if cu.numel() <= 1 or not values_checked():
        return
    if smallest_step is None:
        smallest_step = int(cu.diff().min())
    if smallest_step <= 0:
        i = int((cu[1:] <= cu[:-1]).nonzero()[0, 0])
        raise ValueError(f"{name}: segment {i} is empty; every segment needs >= 1 entry")


def _min_max(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``x`` as Python floats in one host transfer; NaN if any entry is NaN."""
    return tuple(torch.stack(torch.aminmax(x.reshape(-1))).double().tolist())


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run CPU reductions on one thread. ``aminmax`` parallelises from 32k entries, and on a
    loaded 2-core machine (loadavg ~8, 2026-12-03) that 2-thread region stalled: 5.7 ms best
    of 30 for 65k fp32 entries against 0.015 ms on one thread (4M entries: 8.1 ms vs 1.9 ms);
    a value check must never cost more than the op it guards. The thread count is restored
    afterwards."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_values(tensors=(), offsets=()):
    """Everything an op's value checks need, in **one** host transfer: the (min, max) of every
    tensor of ``tensors`` (None for None or empty ones; NaN anywhere makes the pair NaN) and
    the (first, last, smallest step) of every offsets tensor of ``offsets`` (None for None;
    smallest step 0 for a single entry; their metadata must be checked first). Read in fp64:
    int64 values below 2**53 and fp64 values are exact (the checks compare, never add).
    Under ``torch.compile`` (values not checked) it reads nothing and returns all None.
    Returns ``(bounds, summaries)``."""
    present = [x for x in tensors if x is not None and x.numel() > 0]
    cus = [cu for cu in offsets if cu is not None]
    if not (present or cus) or not values_checked():
        return [None] * len(tensors), [None] * len(offsets)
    # copied (and converted) into one fp64 buffer: no stack/cat launches, one transfer
    device = (present + cus)[0].device
    buf = torch.empty(2 * len(present) + 3 * len(cus), dtype=torch.float64, device=device)
    with _one_cpu_thread(device):
        for k, x in enumerate(present):
            low, high = torch.aminmax(x.reshape(-1))
            buf[2 * k].copy_(low)
            buf[2 * k + 1].copy_(high)
        base = 2 * len(present)
        for k, cu in enumerate(cus):
            buf[base + 3 * k].copy_(cu[0])
            buf[base + 3 * k + 1].copy_(cu[-1])
            if cu.numel() > 1:
                buf[base + 3 * k + 2].copy_(cu.diff().min())
            else:
                buf[base + 3 * k + 2].zero_()
    flat = buf.tolist()
    pairs = iter(zip(flat[0:base:2], flat[1:base:2]))
    triples = iter(zip(flat[base::3], flat[base + 1 :: 3], flat[base + 2 :: 3]))
    bounds = [next(pairs) if x is not None and x.numel() > 0 else None for x in tensors]
    return bounds, [None if cu is None else next(triples) for cu in offsets]


def min_max_all(*tensors) -> list[tuple[float, float] | None]:
    """The (min, max) pairs of :func:`read_values` for ``tensors`` (one host transfer)."""
    return read_values(tensors)[0]


def _entry(x: torch.Tensor, flat_index: int):
    """Index of flat entry ``flat_index`` as shown in messages: an int for 1-D tensors, a tuple
    (row, column, ...) otherwise."""
    if x.dim() <= 1:
        return flat_index
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), x.shape))


def check_finite(name: str, x: torch.Tensor, *, bounds=None, counted=None, rule="") -> None:
    """Every entry of float ``x`` is finite (no NaN or inf); names the first bad index.

    ``bounds``: ``x``'s (min, max) from :func:`min_max_all`, when the caller read several
    tensors at once (else read here). ``counted``: None (every entry must be finite) or a
    zero-argument callable returning a bool mask shaped like ``x``; then only entries where it
    is True must be finite (e.g. tokens of steps with weight > 0, which alone reach a loss).
    The mask is built only when a non-finite entry exists, so the common case costs one
    ``aminmax``. ``rule`` describes the counted entries in the message.
    A value check: skipped under ``torch.compile``."""
    if x.numel() == 0 or not values_checked():
        return
    low, high = _min_max(x) if bounds is None else bounds
    if math.isfinite(low) and math.isfinite(high):
        return
    bad = ~torch.isfinite(x)
    if counted is not None:
        bad &= counted()
    found = bad.reshape(-1).nonzero()
    if found.numel() == 0:
        return  # non-finite entries only where they never reach a result
    i = int(found[0, 0])
    where = rule or "all must be finite"
    raise ValueError(f"{name}: entry {_entry(x, i)} is {float(x.reshape(-1)[i])}; {where}")


def check_weights(name: str, w: torch.Tensor, *, bounds=None) -> None:
    """Every entry of float weights ``w`` is finite and >= 0; names the first bad index.
    ``bounds`` as in :func:`check_finite`. A value check: skipped under ``torch.compile``."""
    if w.numel() == 0 or not values_checked():
        return
    low, high = _min_max(w) if bounds is None else bounds
    if math.isfinite(low) and math.isfinite(high) and low >= 0:
        return
    flat = w.reshape(-1)
    i = int((~(torch.isfinite(flat) & (flat >= 0))).nonzero()[0, 0])
    raise ValueError(f"{name}: {name}[{i}] = {float(flat[i])} must be finite and >= 0")


def check_index_range(
    name: str, x: torch.Tensor, high: int, *, rule: str | None = None, bounds=None
) -> None:
    """Every entry of integer ``x`` lies in ``[0, high)``; names the first bad index (``rule``
    describes the range in the message). ``bounds`` as in :func:`check_finite` (exact: fp64
    holds every id below 2**53). A value check: skipped under ``torch.compile``."""
    if x.numel() == 0 or not values_checked():
        return
    if bounds is None:
        low_seen, high_seen = torch.stack(torch.aminmax(x)).tolist()
    else:
        low_seen, high_seen = bounds
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
