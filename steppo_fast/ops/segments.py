"""Public segment ops over a CSR layout: validation + dispatch by ``impl=``.

A CSR layout ``cu_steps`` [S+1] (int32, int64 accepted; ``cu[0] == 0``, non-decreasing,
``cu[-1] == A``) splits an axis of length A (e.g. the action axis) into S contiguous segments
(e.g. steps): segment s = entries ``[cu_steps[s], cu_steps[s+1])``, n_s = its length.

Under ``torch.compile`` the checks reading the offsets' values are skipped (policy in
:mod:`steppo_fast._validate`) and ``segment_broadcast`` needs ``total=`` (its output length).
"""

from __future__ import annotations

import torch

from .._dispatch import resolve
from .._validate import check_float, check_offsets


def _validate_values_offsets(x_name: str, x, cu_steps, *, x_on_segments: bool, total=None):
    """x is a 1-D float tensor on the axis (or, for broadcast, on the segments) of cu_steps;
    for broadcast, the offsets end at ``total`` when it is given."""
    check_float(x_name, x, ndim=1)
    if x_on_segments:
        num_segments = check_offsets("cu_steps", cu_steps, total, device=x.device)
        if x.shape[0] != num_segments:
            raise ValueError(
                f"{x_name}: length {x.shape[0]} != number of segments {num_segments} "
                f"(len(cu_steps) - 1)"
            )
    else:
        check_offsets("cu_steps", cu_steps, x.shape[0], device=x.device)


def segment_sum(x: torch.Tensor, cu_steps: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Sum of each segment: ``out[s] = sum_{i = cu_steps[s]}^{cu_steps[s+1] - 1} x[i]``.

    Args:
        x: [A] fp32/bf16/fp16/fp64 values on the segmented axis.
        cu_steps: [S+1] int32/int64 offsets ending at A.
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [S]: fp32 (bf16/fp16 accumulated in fp32), fp64 for fp64 x. An empty segment sums to 0.
        Differentiable w.r.t. x (the gradient is the output gradient broadcast to the entries).

    Equivalent to::

        torch.stack([x[cu_steps[s]:cu_steps[s + 1]].float().sum() for s in range(S)])
    """
    _validate_values_offsets("x", x, cu_steps, x_on_segments=False)
    return resolve(impl, "segment_sum", x, cu_steps).segment_sum(x, cu_steps)


def segment_mean(x: torch.Tensor, cu_steps: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Mean of each segment: ``out[s] = segment_sum(x)[s] / n_s``, and 0 for an empty segment.

    Args:
        x: [A] fp32/bf16/fp16/fp64 values on the segmented axis.
        cu_steps: [S+1] int32/int64 offsets ending at A (empty segments allowed: mean 0).
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [S]: fp32 (bf16/fp16 accumulated in fp32), fp64 for fp64 x. Differentiable w.r.t. x
        (entry i of segment s receives grad_out[s] / n_s).

    Equivalent to::

        torch.stack([x[cu_steps[s]:cu_steps[s + 1]].float().mean() if n_s > 0 else 0.0 ...])
    """
    _validate_values_offsets("x", x, cu_steps, x_on_segments=False)
    return resolve(impl, "segment_mean", x, cu_steps).segment_mean(x, cu_steps)


def _check_total(total) -> None:
    """``total`` is None or a non-negative int (a SymInt while ``torch.compile`` traces)."""
    if total is None:
        if torch.compiler.is_compiling():
            raise ValueError(
                "total: required under torch.compile (the output length cu_steps[-1] lives in "
                "the offsets' values); pass the number of entries A, e.g. total=logp.shape[0]"
            )
        return
    if isinstance(total, bool) or not isinstance(total, (int, torch.SymInt)):
        raise ValueError(f"total: expected an int or None, got {type(total).__name__}")
    if isinstance(total, int) and total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")


def segment_broadcast(
    y: torch.Tensor,
    cu_steps: torch.Tensor,
    *,
    total: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Copy each segment's value to all its entries: ``out[i] = y[s]`` for i in segment s.

    Args:
        y: [S] fp32/bf16/fp16/fp64, one value per segment (e.g. a step's advantage).
        cu_steps: [S+1] int32/int64 offsets; A = cu_steps[-1].
        total: the output length A, or None to read it from ``cu_steps[-1]`` (a host sync on an
            accelerator). Like ``torch.repeat_interleave``'s ``output_size``: pass it when you
            know it (e.g. ``total=logp.shape[0]``); required under ``torch.compile``. In eager
            it must equal ``cu_steps[-1]`` (checked).
        impl: "auto", "torch", "triton" or "cpp".

    Returns:
        [A]: fp32 for fp32/bf16/fp16 y (exact widening), fp64 for fp64 y. Differentiable w.r.t.
        y (the gradient is the segment sum of the output gradient).

    Equivalent to::

        torch.repeat_interleave(y.float(), cu_steps.diff(), output_size=total)
    """
    _check_total(total)
    _validate_values_offsets("y", y, cu_steps, x_on_segments=True, total=total)
    backend = resolve(impl, "segment_broadcast", y, cu_steps)
    return backend.segment_broadcast(y, cu_steps, total=total)
