"""Shared helpers for the C++ backend tests (tests/*/test_cpp_*.py): the skip marker when the
extension is not built and comparison against the torch reference evaluated in float64.

Comparing against the reference on the same input values upcast to fp64 measures the kernel's
error against the exact result of the spec's math. The C++ kernels accumulate in double and
round each result once into the output dtype, so the tolerance is that one rounding plus the
fp64 accumulation error (``tests/_tolerance.py``), never widened to pass."""

from __future__ import annotations

import importlib

import pytest
import torch
from _tolerance import rounded_once_tol, unit_roundoff

# Upper bound on the terms behind any one result in these tests (the largest layouts hold
# ~1.3e5 entries), for the fp64 accumulation part of the bound.
MAX_TERMS = 2**20


def bf16_grad_tol(want_fp64: torch.Tensor) -> dict:
    """(atol, rtol) for gradients of bf16 inputs: computed in double, stored in fp32 by the
    kernel, then cast to bf16 by autograd: two roundings (u32 + u_bf16 relative), plus the fp64
    accumulation error of ``assert_matches`` absolute (results that cancel to ~0)."""
    scale = MAX_TERMS * max(want_fp64.abs().max().item(), 1.0) if want_fp64.numel() else 0.0
    atol, _ = rounded_once_tol(torch.bfloat16, MAX_TERMS, 2 * scale)
    rtol = unit_roundoff(torch.float32) + unit_roundoff(torch.bfloat16) * (1 + 2**-23)
    return dict(atol=atol, rtol=rtol)


def _cpp_built() -> bool:
    try:
        importlib.import_module("steppo_fast._C")
    except ImportError:
        return False
    return True


CPP_BUILT = _cpp_built()
requires_cpp = pytest.mark.skipif(
    not CPP_BUILT, reason="steppo_fast._C is not built (pip install --no-build-isolation -e .)"
)

# Input dtypes the kernels read directly (fp16 shares the bf16 path: upcast per element).
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp64(*tensors):
    """Upcast float tensors to fp64 (exact for every input dtype); None passes through."""
    return tuple(None if t is None else t.detach().double() for t in tensors)


def assert_matches(got: torch.Tensor, want_fp64: torch.Tensor, input_dtype: torch.dtype):
    """``got`` (the kernel's result for inputs of ``input_dtype``) has the result dtype and
    equals the fp64 reference within that input dtype's tolerance."""
    expected_dtype = result_dtype(input_dtype)
    assert got.dtype == expected_dtype, (got.dtype, expected_dtype)
    assert got.shape == want_fp64.shape
    # fp64 sums of <= MAX_TERMS terms, each at most the largest result in size (+ one rounding
    # into the result dtype; the fp64 oracle's own error is of the accumulation's size)
    scale = MAX_TERMS * max(want_fp64.abs().max().item(), 1.0) if want_fp64.numel() else 0.0
    atol, rtol = rounded_once_tol(expected_dtype, MAX_TERMS, 2 * scale)
    torch.testing.assert_close(got.double(), want_fp64, atol=atol, rtol=rtol)
