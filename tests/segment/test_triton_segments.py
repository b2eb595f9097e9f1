"""Triton segment ops (segment_sum / segment_mean / segment_broadcast) under the interpreter,
forward and backward, against the torch reference on random CSR layouts; registered-op checks."""

import pytest
import torch
from _csr import offsets
from _tolerance import assert_within, sum_error, unit_roundoff
from steppo_fast.kernels.segment import ops as segment_ops

from steppo_fast import segment_broadcast, segment_mean, segment_sum

LAYOUTS = {
    "mixed": [3, 1, 0, 70, 5, 1, 129, 2],  # odd sizes, one-token and empty segments
    "one_token": [1] * 37,
    "long": [1500, 3],  # one segment spans many reduce iterations and broadcast programs
    "single": [5],
    "empty_batch": [],
    "all_empty_segments": [0, 0, 0],
}


def segment_bound(fn, inp, cu):
    """Elementwise bound on |triton - torch| for fp32 ``fn`` (both sides fp32 math, different
    summation orders, so twice one evaluation's bound): a segment sum of n_b terms errs by
    <= sum_error(fp32, n_b, sum |x|); the mean divides once more (+ u |mean|); broadcast (and
    the backward of sum) copy exactly, the backward of mean divides once (u |g / n_b|)."""
    f64 = inp.detach().double()
    lengths = (cu[1:] - cu[:-1]).long()
    if fn is segment_broadcast:
        return 2 * unit_roundoff(torch.float32) * segment_broadcast(f64.abs(), cu, impl="torch")
    abs_sums = segment_sum(f64.abs(), cu, impl="torch")
    bound = 2 * sum_error(torch.float32, int(lengths.max()) if lengths.numel() else 1, abs_sums)
    if fn is segment_mean:
        bound = bound / lengths.clamp(min=1) + 2 * unit_roundoff(torch.float32) * (
            abs_sums / lengths.clamp(min=1)
        )
    return bound


def grad_bound(fn, g, cu):
    """Backward of sum / mean: broadcast of g (mean: divided by n_b, one rounding each side);
    of broadcast: a segment sum of g."""
    if fn is segment_broadcast:
        return segment_bound(segment_sum, g, cu)
    lengths = (cu[1:] - cu[:-1]).long().clamp(min=1)
    per_segment = g.double().abs() / (lengths if fn is segment_mean else 1)
    return 2 * unit_roundoff(torch.float32) * segment_broadcast(per_segment, cu, impl="torch")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_forward_backward_match_reference(layout, dtype, index_dtype):
    cu = offsets(LAYOUTS[layout], index_dtype)
    num_entries, num_segments = int(cu[-1]), cu.numel() - 1
    x = torch.randn(num_entries).to(dtype)
    y = torch.randn(num_segments).to(dtype)
    g_seg, g_ent = torch.randn(num_segments), torch.randn(num_entries)
    for fn, inp, g in (
        (segment_sum, x, g_seg),
        (segment_mean, x, g_seg),
        (segment_broadcast, y, g_ent),
    ):
        outs = []
        for impl in ("triton", "torch"):
            leaf = inp.clone().requires_grad_()
            out = fn(leaf, cu, impl=impl)
            (out * g).sum().backward()
            outs.append((out.detach(), leaf.grad))
        (out_t, grad_t), (out_r, grad_r) = outs
        assert out_t.dtype == torch.float32 and out_t.shape == out_r.shape
        assert grad_t.dtype == dtype
        assert_within(out_t, out_r, segment_bound(fn, inp, cu), f"{fn.__name__}")
        # gradients: fp32 math, then one rounding into the input dtype on each side
        bound = grad_bound(fn, g, cu) + 2 * unit_roundoff(dtype) * grad_r.double().abs()
        assert_within(grad_t, grad_r, bound, f"d {fn.__name__}")


def test_registered_ops_pass_opcheck():
    cu = offsets([3, 1, 4])
    x = torch.randn(8, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    for mean in (False, True):
        torch.library.opcheck(segment_ops.segment_reduce_op, (x, cu, mean))
        torch.library.opcheck(segment_ops.segment_expand_op, (y, cu, 8, mean))


def test_registered_ops_trace_fullgraph():
    cu = offsets([3, 1, 4])
    x = torch.randn(8, requires_grad=True)

    def f(t):
        s = segment_ops.segment_reduce_op(t, cu, False)
        return segment_ops.segment_expand_op(s * 2.0, cu, 8, True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.backward()
    want_grad = torch.full((8,), 2.0)  # sum_s n_s * (2 s_s / n_s) = 2 sum_i x_i
    torch.testing.assert_close(got, f(x).detach())
    torch.testing.assert_close(x.grad, want_grad)
