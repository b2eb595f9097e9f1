"""linear_logprobs: every bad argument is a ValueError naming the argument and the rule."""

import pytest
import torch
from test_logprobs import F64, make

from steppo_fast import linear_logprobs


def _bad(**overrides):
    hidden, weight, targets, bias = make()
    args = dict(hidden=hidden, weight=weight, targets=targets, bias=bias)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets")}
    return lambda: linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden=[[1.0]]), "hidden: expected a torch.Tensor"),
        (dict(hidden=torch.randn(29)), "hidden: expected 2-D"),
        (dict(hidden=torch.ones(29, 24, dtype=torch.int64)), "hidden: dtype int64"),
        (dict(weight=torch.randn(77)), "weight: expected 2-D"),
        (dict(weight=torch.randn(77, 23)), r"weight: shape \(77, 23\) must be \[V, H\]"),
        (dict(weight=torch.randn(0, 24)), "weight: needs at least one row"),
        (dict(weight=torch.randn(77, 24, device="meta")), "weight: on device meta"),
        (dict(weight=torch.randn(77, 24, dtype=F64)), "weight: dtype float64 does not match"),
        (dict(bias=torch.randn(76)), "bias: length 76 != expected 77"),
        (dict(bias=torch.randn(77, 1)), "bias: expected 1-D"),
        (dict(bias=torch.randn(77, dtype=F64)), "bias: dtype float64 does not match"),
        (dict(targets=torch.zeros(28, dtype=torch.long)), "targets: length 28 != expected 29"),
        (dict(targets=torch.zeros(29)), "targets: dtype float32"),
        (dict(targets=torch.full((29,), 77)), r"targets: targets\[0\] = 77 is outside \[0, V\)"),
        (dict(targets=torch.tensor([0] * 5 + [-1] + [0] * 23)), r"targets\[5\] = -1"),
        (dict(temperature=0.0), "temperature: must be finite and > 0"),
        (dict(temperature=-1.0), "temperature: must be finite and > 0"),
        (dict(temperature=float("nan")), "temperature: must be finite and > 0"),
        (dict(temperature=float("inf")), "temperature: must be finite and > 0"),
        (dict(temperature="1"), "temperature: expected a real number"),
        (dict(temperature=True), "temperature: expected a real number"),
        (dict(return_entropy=1), "return_entropy: expected a bool"),
        (dict(chunk_size=0), "chunk_size: must be > 0"),
        (dict(chunk_size=-3), "chunk_size: must be > 0"),
        (dict(chunk_size=2.5), "chunk_size: expected an int or None"),
        (dict(chunk_size=True), "chunk_size: expected an int or None"),
        (dict(impl="cuda"), "impl: 'cuda' is not one of"),
    ],
)
def test_value_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad(**overrides)()
