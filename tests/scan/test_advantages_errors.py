"""Every ValueError path of the advantage ops (step_gae, discounted_returns, whiten,
group_advantages, gigpo_advantages): each asserts the message names the offending argument
(and the index, for non-finite values)."""

import pytest
import torch
from _csr import offsets
from _impls import impl_or_skip, impls_for

import steppo_fast
from steppo_fast import (
    discounted_returns,
    gigpo_advantages,
    group_advantages,
    step_gae,
    whiten,
)


def _gae_args(**overrides):
    args = dict(
        rewards=torch.randn(5),
        values=torch.randn(5),
        cu_trajs=offsets([2, 3]),
        gamma=0.9,
        lam=0.9,
        last_values=torch.zeros(2),
    )
    args.update(overrides)
    return args


def _call_gae(**overrides):
    a = _gae_args(**overrides)
    kw = {k: a[k] for k in ("gamma", "lam", "last_values")}
    kw.update({k: v for k, v in a.items() if k == "impl"})
    return step_gae(a["rewards"], a["values"], a["cu_trajs"], **kw)


def _nan_at(n, i):
    x = torch.randn(n)
    x[i] = float("nan")
    return x


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(rewards=[1.0, 2.0]), ["rewards", "Tensor"]),
        (dict(rewards=torch.randn(5, 1)), ["rewards", "1-D"]),
        (dict(rewards=torch.arange(5)), ["rewards", "dtype"]),
        (dict(values=torch.randn(4)), ["values", "length"]),
        (dict(values=torch.arange(5)), ["values", "dtype"]),
        (dict(cu_trajs=offsets([2, 2])), ["cu_trajs", "end"]),
        (dict(cu_trajs=torch.tensor([1, 5], dtype=torch.int32)), ["cu_trajs", "start"]),
        (dict(cu_trajs=torch.tensor([0, 3, 2, 5])), ["cu_trajs", "non-decreasing"]),
        (dict(cu_trajs=torch.tensor([0.0, 5.0])), ["cu_trajs", "dtype"]),
        (dict(cu_trajs=torch.zeros(0, dtype=torch.int32)), ["cu_trajs", "at least one"]),
        (dict(last_values=torch.zeros(3)), ["last_values", "length"]),
        (dict(last_values=_nan_at(2, 1)), ["last_values", "entry 1"]),
        (dict(gamma=1.5), ["gamma", "[0.0, 1.0]"]),
        (dict(gamma=-0.1), ["gamma", "[0.0, 1.0]"]),
        (dict(gamma=float("nan")), ["gamma", "finite"]),
        (dict(gamma=True), ["gamma", "real number"]),
        (dict(gamma=None), ["gamma", "real number"]),
        (dict(lam=1.01), ["lam", "[0.0, 1.0]"]),
        (dict(lam=float("inf")), ["lam", "finite"]),
        (dict(rewards=_nan_at(5, 3)), ["rewards", "entry 3"]),
        (dict(values=torch.tensor([0.0, 1.0, float("inf"), 0.0, 0.0])), ["values", "entry 2"]),
        (dict(impl="cuda"), ["impl"]),
    ],
)
@pytest.mark.parametrize("impl", impls_for("step_gae"))
def test_step_gae_value_errors(impl, overrides, names):
    # every backend: the checks run before the backend is chosen (an impl in ``overrides`` wins)
    impl = impl_or_skip("step_gae", impl)
    with pytest.raises(ValueError) as info:
        _call_gae(**{"impl": impl, **overrides})
    for name in names:
        assert name in str(info.value)


def test_discounted_returns_value_errors():
    r, cu = torch.randn(5), offsets([2, 3])
    cases = [
        (lambda: discounted_returns(r[:4], cu), "cu_trajs"),
        (lambda: discounted_returns(r, cu, gamma=2.0), "gamma"),
        (lambda: discounted_returns(r, cu, last_values=torch.zeros(1)), "last_values"),
        (lambda: discounted_returns(_nan_at(5, 0), cu), "rewards: entry 0"),
        (lambda: discounted_returns(r.int(), cu), "rewards"),
        (lambda: discounted_returns(r, cu, impl="nope"), "impl"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_whiten_value_errors():
    x = torch.randn(4)
    cases = [
        (lambda: whiten([1.0, 2.0]), "x"),
        (lambda: whiten(torch.arange(4)), "x: dtype"),
        (lambda: whiten(x, torch.ones(3)), "weight: shape"),
        (lambda: whiten(x, torch.ones(4, dtype=torch.int64)), "weight: dtype"),
        (lambda: whiten(x, _nan_at(4, 2)), "weight: entry 2"),
        (lambda: whiten(_nan_at(4, 1)), "x: entry 1"),
        (lambda: whiten(x, eps=-1.0), "eps"),
        (lambda: whiten(x, eps=float("nan")), "eps"),
        (lambda: whiten(x, impl="bogus"), "impl"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_ops_are_exported_at_top_level():
    for name in (
        "step_gae",
        "discounted_returns",
        "whiten",
        "group_advantages",
        "gigpo_advantages",
    ):
        assert callable(getattr(steppo_fast, name))


def test_group_advantages_value_errors():
    s, g = torch.randn(4), torch.tensor([0, 0, 1, 1])
    cases = [
        (lambda: group_advantages([1.0], g), "scores"),
        (lambda: group_advantages(s.long(), g), "scores: dtype"),
        (lambda: group_advantages(s, g.float()), "group: dtype"),
        (lambda: group_advantages(s, g[:3]), "group: length"),
        (lambda: group_advantages(s, g, mode="ppo"), "mode"),
        (lambda: group_advantages(s, g, eps=-1e-3), "eps"),
        (lambda: group_advantages(_nan_at(4, 2), g), "scores: entry 2"),
        (lambda: group_advantages(s, g, impl="gpu"), "impl"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_gigpo_value_errors():
    r, cu = torch.randn(5), offsets([2, 3])
    g, a = torch.tensor([0, 0]), torch.zeros(5, dtype=torch.int64)
    cases = [
        (lambda: gigpo_advantages(r.long(), cu, g, a), "rewards: dtype"),
        (lambda: gigpo_advantages(r, offsets([2, 2]), g, a), "cu_trajs"),
        (lambda: gigpo_advantages(r, cu, g[:1], a), "group: length"),
        (lambda: gigpo_advantages(r, cu, g.double(), a), "group: dtype"),
        (lambda: gigpo_advantages(r, cu, g, a[:4]), "anchor: length"),
        (lambda: gigpo_advantages(r, cu, g, a.float()), "anchor: dtype"),
        (lambda: gigpo_advantages(r, cu, g, a, mode="grpo"), "mode"),
        (lambda: gigpo_advantages(r, cu, g, a, gamma=1.5), "gamma"),
        (lambda: gigpo_advantages(r, cu, g, a, step_weight=float("nan")), "step_weight"),
        (lambda: gigpo_advantages(r, cu, g, a, step_weight="1"), "step_weight"),
        (lambda: gigpo_advantages(r, cu, g, a, eps=-1.0), "eps"),
        (lambda: gigpo_advantages(_nan_at(5, 4), cu, g, a), "rewards: entry 4"),
        (lambda: gigpo_advantages(r, cu, g, a, impl="x"), "impl"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
