"""C++ backend (impl="cpp") of segment_sum, segment_mean and segment_broadcast against the
torch reference: one-token and empty segments (leading, inner, trailing), a 130k-entry
segment and 40k short segments spread over several thread-pool chunks, empty axes, every input
dtype, int32/int64 offsets; fp64 gradchecks and multi-chunk gradients."""

import pytest
import torch
from _cpp_helpers import FLOAT_DTYPES, assert_matches, bf16_grad_tol, fp64, requires_cpp
from _csr import LAYOUTS, layout, offsets

import steppo_fast as sf
from steppo_fast import reference as ref

pytestmark = requires_cpp


def segment_inputs(name, dtype, index_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = offsets(layout(name, gen), index_dtype)
    x = torch.randn(int(cu[-1]), generator=gen).to(dtype)
    y = torch.randn(cu.numel() - 1, generator=gen).to(dtype)
    return x, y, cu


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_segment_ops_match_reference(name, dtype, index_dtype):
    x, y, cu = segment_inputs(name, dtype, index_dtype)
    assert_matches(sf.segment_sum(x, cu, impl="cpp"), ref.segment_sum(*fp64(x), cu), dtype)
    assert_matches(sf.segment_mean(x, cu, impl="cpp"), ref.segment_mean(*fp64(x), cu), dtype)
    got = sf.segment_broadcast(y, cu, impl="cpp")
    assert_matches(got, ref.segment_broadcast(*fp64(y), cu), dtype)
    # a copy of y's values: exact, not merely close
    assert torch.equal(got, ref.segment_broadcast(y, cu))


def test_broadcast_every_chunk_boundary_position():
    # segments of every length 1..40 in every order, ~160k entries (3 chunks): the block
    # stores that spill past a segment end must be overwritten by the next segments of the
    # same chunk, and never cross into the next chunk
    gen = torch.Generator().manual_seed(9)
    lengths = torch.randint(1, 41, (8000,), generator=gen)
    for shift in range(3):
        cu = offsets(torch.cat([torch.tensor([1 + shift]), lengths]))
        y = torch.randn(cu.numel() - 1, generator=gen)
        want = torch.repeat_interleave(y, cu[1:] - cu[:-1])
        assert torch.equal(sf.segment_broadcast(y, cu, impl="cpp"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["ragged_with_empty", "long_tokens", "many_short"])
def test_gradients_match_reference(name, dtype):
    x, y, cu = segment_inputs(name, dtype)
    gen = torch.Generator().manual_seed(10)
    g_seg = torch.randn(cu.numel() - 1, generator=gen)
    g_tok = torch.randn(x.numel(), generator=gen)
    for op, inp, g in (
        ("segment_sum", x, g_seg),
        ("segment_mean", x, g_seg),
        ("segment_broadcast", y, g_tok),
    ):
        a = inp.detach().clone().requires_grad_()
        got = torch.autograd.grad(getattr(sf, op)(a, cu, impl="cpp"), a, g)[0]
        b = inp.detach().double().requires_grad_()
        want = torch.autograd.grad(getattr(ref, op)(b, cu), b, g.double())[0]
        assert got.dtype == dtype  # autograd casts the gradient to the input's dtype
        if dtype == torch.bfloat16:  # rounded to bf16 (8 significant bits) at the end
            torch.testing.assert_close(got.double(), want, **bf16_grad_tol(want))
        else:
            assert_matches(got, want, dtype)


def test_auto_uses_cpp_on_cpu():
    from steppo_fast import _dispatch, cpp

    for op in ("segment_sum", "segment_mean", "segment_broadcast"):
        assert _dispatch.resolve("auto", op, torch.zeros(1)) is cpp
