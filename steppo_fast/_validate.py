"""Cheap argument checks shared by every public op.

Every check raises ``ValueError`` naming the argument, (where it applies) the index, and the rule
broken. Nothing is clamped, cast silently or dropped. Checks that read tensor values (offsets)
cost O(len) and one host sync on an accelerator.
"""

from __future__ import annotations

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


def check_offsets(name: str, cu, length: int | None = None, *, device=None) -> int:
    """CSR offsets: 1-D int32/int64, at least one entry, ``cu[0] == 0``, non-decreasing,
    ``cu[-1] == length`` (when given). Returns the number of segments ``len(cu) - 1``."""
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu.numel() == 0:
        raise ValueError(f"{name}: offsets need at least one entry (cu[0] == 0)")
    first = int(cu[0])
    if first != 0:
        raise ValueError(f"{name}: offsets must start at 0, got {name}[0] = {first}")
    if cu.numel() > 1:
        bad = (cu[1:] < cu[:-1]).nonzero()
        if bad.numel():
            i = int(bad[0, 0]) + 1
            raise ValueError(
                f"{name}: offsets must be non-decreasing, but {name}[{i}] = {int(cu[i])} "
                f"< {name}[{i - 1}] = {int(cu[i - 1])}"
            )
    if length is not None and int(cu[-1]) != length:
        raise ValueError(f"{name}: offsets must end at the axis length {length}, got {int(cu[-1])}")
    return cu.numel() - 1


def check_nonempty_segments(name: str, cu) -> None:
    """Every segment of ``cu`` has at least one entry (e.g. every step has an action token)."""
    if cu.numel() > 1:
        empty = ((cu[1:] - cu[:-1]) <= 0).nonzero()
        if empty.numel():
            i = int(empty[0, 0])
            raise ValueError(f"{name}: segment {i} is empty; every segment needs >= 1 entry")


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
