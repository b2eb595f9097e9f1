"""tests/_impls.py and tests/_csr.py, the shared test helpers: the impl parametrisation covers
every backend that runs an op here (a backend dropped from it would silently leave its tests),
and the CSR helpers build the layouts they promise."""

import pytest
import torch
from _csr import LAYOUTS, layout, offsets, random_layout
from _impls import IMPLS, impl_or_skip, impls_for

from steppo_fast._dispatch import available_impls

OPS = (
    "segment_sum",
    "segment_mean",
    "segment_broadcast",
    "step_gae",
    "discounted_returns",
    "whiten",
    "group_advantages",
    "gigpo_advantages",
    "step_policy_loss",
    "linear_logprobs",
)


@pytest.mark.parametrize("op", OPS)
def test_impls_for_covers_every_backend_that_runs_the_op(op):
    here = available_impls(op, "cpu")
    assert "torch" in impls_for(op)
    assert set(here) <= set(impls_for(op)) <= set(IMPLS)
    for impl in here:
        assert impl_or_skip(op, impl) == impl


def test_impl_or_skip_skips_a_backend_without_the_op():
    missing = [i for i in IMPLS if i not in available_impls("gigpo_advantages", "cpu")]
    assert missing  # gigpo_advantages has the reference only
    with pytest.raises(pytest.skip.Exception, match="cannot run gigpo_advantages"):
        impl_or_skip("gigpo_advantages", missing[0])


def test_offsets():
    assert offsets([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert offsets([]).tolist() == [0]
    assert offsets(torch.tensor([1, 1]), torch.int64).dtype == torch.int64
    assert offsets([1]).dtype == torch.int32


@pytest.mark.parametrize("name", LAYOUTS)
def test_named_layouts(name):
    lengths = layout(name, torch.Generator().manual_seed(0))
    assert lengths.dtype == torch.int64 and (lengths >= 0).all()
    if name in ("ragged_with_empty", "all_empty"):
        assert (lengths == 0).any()
    if name == "ragged_with_empty":
        assert lengths[0] == 0 and lengths[-1] == 0 and (lengths[2:-3] > 0).any()
    if name in ("long_tokens", "many_short"):
        assert int(lengths.sum()) > 2**16  # several C++ thread-pool chunks


def test_random_layout():
    cu_steps, cu_trajs = random_layout(torch.Generator().manual_seed(1), 5, 3, 4)
    steps, tokens = cu_trajs.diff(), cu_steps.diff()
    assert cu_trajs.dtype == cu_steps.dtype == torch.int32
    assert len(steps) == 5 and ((1 <= steps) & (steps <= 3)).all()
    assert int(cu_trajs[-1]) == len(tokens) and ((1 <= tokens) & (tokens <= 4)).all()
