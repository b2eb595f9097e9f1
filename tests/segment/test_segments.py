"""segment_sum / segment_mean / segment_broadcast through the public API on every backend
(tests/_impls.py): loop oracles, hand cases, dtypes, empty segments and batches, gradcheck,
errors; hypothesis layouts on the torch reference. Each backend against the fp64 reference on
large layouts: test_cpp_segments.py, test_triton_segments.py."""

import pytest
import torch
from _csr import offsets
from _impls import IMPLS, impl_or_skip
from _tolerance import assert_within, sum_error, unit_roundoff
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo_fast import segment_broadcast, segment_mean, segment_sum


def loop_sum(x, cu):
    cu = [int(c) for c in cu]
    return [sum(float(x[i]) for i in range(cu[s], cu[s + 1])) for s in range(len(cu) - 1)]


def loop_mean(x, cu):
    cu = [int(c) for c in cu]
    sums = loop_sum(x, cu)
    return [sums[s] / (cu[s + 1] - cu[s]) if cu[s + 1] > cu[s] else 0.0 for s in range(len(sums))]


def loop_broadcast(y, cu):
    cu = [int(c) for c in cu]
    return [float(y[s]) for s in range(len(cu) - 1) for _ in range(cu[s], cu[s + 1])]


def check_close(got, expected, dtype):
    atol, rtol = TOL[dtype]
    expected = torch.tensor(expected, dtype=torch.float64)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", IMPLS)
def test_against_loops_with_empty_and_one_token_segments(impl, index_dtype, dtype):
    impl = impl_or_skip("segment_sum", impl)
    cu = offsets([3, 0, 1, 5, 0, 1, 7]).to(index_dtype)
    x = torch.randn(int(cu[-1]), dtype=dtype)
    y = torch.randn(cu.numel() - 1, dtype=dtype)
    s, m = segment_sum(x, cu, impl=impl), segment_mean(x, cu, impl=impl)
    b = segment_broadcast(y, cu, impl=impl)
    assert s.dtype == m.dtype == b.dtype == dtype
    check_close(s, loop_sum(x, cu), dtype)
    check_close(m, loop_mean(x, cu), dtype)
    check_close(b, loop_broadcast(y, cu), dtype)
    assert m[1] == 0 and m[4] == 0  # empty segments: mean 0, never NaN


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_cases(impl):
    impl = impl_or_skip("segment_sum", impl)
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert segment_sum(x, cu, impl=impl).tolist() == [3.0, 0.0, 12.0]
    assert segment_mean(x, cu, impl=impl).tolist() == [1.5, 0.0, 4.0]  # empty segment: 0
    y = torch.tensor([7.0, 8.0, 9.0])
    assert segment_broadcast(y, cu, impl=impl).tolist() == [7.0, 7.0, 9.0, 9.0, 9.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)
    assert segment_sum(x, cu, impl=impl).tolist() == [6.0, 0.0, 4.0, 11.0]
    assert segment_mean(x, cu, impl=impl).tolist() == [2.0, 0.0, 4.0, 5.5]
    y = torch.tensor([7.0, 8.0, 9.0, 10.0])
    assert segment_broadcast(y, cu, impl=impl).tolist() == [7.0, 7.0, 7.0, 9.0, 10.0, 10.0]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=0, max_size=12),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_random_csr(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = offsets(lengths)
    x = torch.randn(int(cu[-1]), generator=gen)
    y = torch.randn(len(lengths), generator=gen)
    check_close(segment_sum(x, cu, impl="torch"), loop_sum(x, cu), torch.float32)
    check_close(segment_mean(x, cu, impl="torch"), loop_mean(x, cu), torch.float32)
    check_close(segment_broadcast(y, cu, impl="torch"), loop_broadcast(y, cu), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    impl = impl_or_skip("segment_sum", impl)
    cu = torch.zeros(1, dtype=torch.int32)
    x = torch.zeros(0, requires_grad=True)
    for op in (segment_sum, segment_mean):
        out = op(x, cu, impl=impl)
        assert out.shape == (0,)
        out.sum().backward()
        assert x.grad.shape == (0,)
    out = segment_broadcast(torch.zeros(0), cu, impl=impl)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_accumulates_in_fp32(impl, low):
    impl = impl_or_skip("segment_sum", impl)
    # 3000 ones: a bf16 running sum stalls at 256 and an fp16 one at 2048; fp32 is exact.
    cu = torch.tensor([0, 3000, 3003], dtype=torch.int32)
    x = torch.ones(3003, dtype=low)
    s = segment_sum(x, cu, impl=impl)
    assert s.dtype == torch.float32 and s.tolist() == [3000.0, 3.0]
    assert segment_mean(x, cu, impl=impl).tolist() == [1.0, 1.0]
    # random values: equal to the fp32 op on the same rounded values
    xr = torch.randn(3003).to(low)
    # fp32 sums of up to 3000 terms on both sides: twice sum_error per segment
    abs_sums = segment_sum(xr.double().abs(), cu, impl="torch")
    assert_within(
        segment_sum(xr, cu, impl=impl),
        segment_sum(xr.float(), cu, impl="torch"),
        2 * sum_error(torch.float32, 3000, abs_sums),
        "segment_sum",
    )
    y = torch.randn(2).to(low)
    b = segment_broadcast(y, cu, impl=impl)
    assert b.dtype == torch.float32 and torch.equal(b[:3000], y[0].float().expand(3000))


@pytest.mark.parametrize("lengths", [[2, 1, 0, 4, 3], [2, 0, 3, 1, 1], [2, 1, 3]])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_float64_gradcheck(impl, lengths):
    # fp64 on triton: the reference runs (the kernels compute in fp32)
    impl = impl_or_skip("segment_sum", impl)
    cu = offsets(lengths)
    x = torch.randn(int(cu[-1]), dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(lengths), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: segment_sum(t, cu, impl=impl), (x,))
    assert torch.autograd.gradcheck(lambda t: segment_mean(t, cu, impl=impl), (x,))
    assert torch.autograd.gradcheck(lambda t: segment_broadcast(t, cu, impl=impl), (y,))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_values(impl):
    impl = impl_or_skip("segment_sum", impl)
    cu = offsets([2, 3])
    x = torch.randn(5, requires_grad=True)
    segment_mean(x, cu, impl=impl).mul(torch.tensor([2.0, 3.0])).sum().backward()
    # g / n_b times n_b: two fp32 roundings
    two = 2 * unit_roundoff(torch.float32)
    assert x.grad.tolist() == pytest.approx([1.0] * 5, rel=two, abs=0)
    y = torch.randn(2, requires_grad=True)
    segment_broadcast(y, cu, impl=impl).sum().backward()
    assert y.grad.tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    "x, cu, needle",
    [
        (torch.ones(3, dtype=torch.int64), torch.tensor([0, 3]), "x: dtype"),
        (torch.ones(3, 1), torch.tensor([0, 3]), "x: expected 1-D"),
        ([1.0, 2.0], torch.tensor([0, 2]), "x: expected a torch.Tensor"),
        (torch.ones(3), torch.tensor([0, 2]), "cu_steps: offsets must end at the axis length 3"),
        (torch.ones(3), torch.tensor([1, 3]), "cu_steps: offsets must start at 0"),
        (torch.ones(3), torch.tensor([0, 2, 1, 3]), "cu_steps[2] = 1 < cu_steps[1] = 2"),
        (torch.ones(3), torch.tensor([0.0, 3.0]), "cu_steps: dtype float32"),
        (torch.ones(3), torch.tensor([], dtype=torch.int64), "cu_steps: offsets need at least"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_sum_and_mean_errors(impl, x, cu, needle):
    impl = impl_or_skip("segment_sum", impl)
    for op in (segment_sum, segment_mean):
        with pytest.raises(ValueError) as err:
            op(x, cu, impl=impl)
        assert needle in str(err.value)


def test_broadcast_errors_and_impl():
    with pytest.raises(ValueError, match=r"y: length 3 != number of segments 2"):
        segment_broadcast(torch.ones(3), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"impl: 'numpy' is not one of"):
        segment_sum(torch.ones(2), torch.tensor([0, 2]), impl="numpy")


@pytest.mark.parametrize("impl", IMPLS)
def test_broadcast_total(impl):
    impl = impl_or_skip("segment_broadcast", impl)
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    y = torch.tensor([7.0, 8.0, 9.0])
    out = segment_broadcast(y, cu, total=5, impl=impl)
    assert out.tolist() == [7.0, 7.0, 9.0, 9.0, 9.0]
    empty = segment_broadcast(torch.zeros(0), torch.zeros(1, dtype=torch.int32), total=0, impl=impl)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match=r"cu_steps: offsets must end at the axis length 6"):
        segment_broadcast(y, cu, total=6, impl=impl)
    with pytest.raises(ValueError, match=r"total: expected an int or None, got float"):
        segment_broadcast(y, cu, total=5.0, impl=impl)
    with pytest.raises(ValueError, match=r"total: expected an int or None, got bool"):
        segment_broadcast(y, cu, total=True, impl=impl)
    with pytest.raises(ValueError, match=r"total: must be >= 0"):
        segment_broadcast(y, cu, total=-1, impl=impl)
