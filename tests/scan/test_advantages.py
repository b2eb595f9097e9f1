"""step_gae, discounted_returns and whiten: loop oracles written from the math (plain Python
floats over lists), hand-worked cases, random CSR layouts, edge cases and gradients (long
trajectories, token-level GAE, dtypes and StepPO parity: test_advantages_long.py). Hand cases,
edge cases and gradchecks run on every backend that has the op (tests/_impls.py); the others through
``impl="auto"``. Each backend against the fp64 reference on large layouts:
test_cpp_advantages.py, test_triton_scan.py.

Group-relative ops (group_advantages, gigpo_advantages) are in test_advantages_group.py and
every ValueError path in test_advantages_errors.py."""

import math

import pytest
import torch
from _csr import offsets
from _impls import impl_or_skip, impls_for
from conftest import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo_fast import discounted_returns, step_gae, whiten

FP32_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- loop oracles
def gae_oracle(rewards, values, cu, gamma, lam, last_values=None):
    """Backward loop per trajectory over plain Python floats (float64 arithmetic)."""
    adv, ret = [0.0] * len(rewards), [0.0] * len(rewards)
    for b in range(len(cu) - 1):
        next_value = 0.0 if last_values is None else last_values[b]
        running = 0.0
        for t in reversed(range(cu[b], cu[b + 1])):
            delta = rewards[t] + gamma * next_value - values[t]
            running = delta + gamma * lam * running
            adv[t] = running
            ret[t] = running + values[t]
            next_value = values[t]
    return adv, ret


def returns_oracle(rewards, cu, gamma, last_values=None):
    out = [0.0] * len(rewards)
    for b in range(len(cu) - 1):
        g = 0.0 if last_values is None else last_values[b]
        for t in reversed(range(cu[b], cu[b + 1])):
            g = rewards[t] + gamma * g
            out[t] = g
    return out


def whiten_oracle(x, weight, eps):
    kept = [xi for i, xi in enumerate(x) if weight is None or weight[i] > 0]
    mean = sum(kept) / len(kept) if kept else 0.0
    if len(kept) < 2:
        return [xi - mean for xi in x]
    std = math.sqrt(sum((k - mean) ** 2 for k in kept) / (len(kept) - 1))
    return [(xi - mean) / (std + eps) for xi in x]


def abs_scan_oracle(x, cu, decay):
    """sum_{j >= t in t's trajectory} decay^(j-t) |x_j|: the magnitude that bounds rounding."""
    return returns_oracle([abs(v) for v in x], cu, decay)


# ----------------------------------------------------------------------------- helpers


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


layouts = st.lists(st.integers(min_value=0, max_value=7), min_size=0, max_size=9)
unit = st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0])


# ----------------------------------------------------------------------------- hand-worked
@pytest.mark.parametrize("impl", impls_for("step_gae"))
def test_step_gae_three_steps_worked_by_hand(impl):
    impl = impl_or_skip("step_gae", impl)
    # r = [1, 0, 2], V = [0.5, 0.2, 0.1], gamma = 0.9, lam = 0.95 (gamma*lam = 0.855), V_3 = 0:
    # delta_2 = 2 + 0.9*0   - 0.1 = 1.9          A_2 = 1.9
    # delta_1 = 0 + 0.9*0.1 - 0.2 = -0.11        A_1 = -0.11 + 0.855*1.9    = 1.5145
    # delta_0 = 1 + 0.9*0.2 - 0.5 = 0.68         A_0 = 0.68  + 0.855*1.5145 = 1.9748975
    # R = A + V = [2.4748975, 1.7145, 2.0]
    # A second trajectory, one step, truncated with last value 2: delta = 3 + 0.9*2 - 0.4 = 4.4.
    for dtype in (torch.float64, torch.float32):
        r = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=dtype)
        v = torch.tensor([0.5, 0.2, 0.1, 0.4], dtype=dtype)
        last = torch.tensor([0.0, 2.0], dtype=dtype)
        adv, ret = step_gae(r, v, offsets([3, 1]), gamma=0.9, lam=0.95, last_values=last, impl=impl)
        close(adv, [1.9748975, 1.5145, 1.9, 4.4], dtype)
        close(ret, [2.4748975, 1.7145, 2.0, 4.8], dtype)
    # one trajectory [r=1, 0, 2], V = [0.5, 1, 0], bootstrap 3, gamma 0.5, lam 1:
    # returns G_2 = 2 + 0.5*3 = 3.5, G_1 = 0 + 1.75, G_0 = 1 + 0.875; A = G - V
    r, v = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.0])
    cu = torch.tensor([0, 3], dtype=torch.int32)
    adv, ret = step_gae(r, v, cu, gamma=0.5, lam=1.0, last_values=torch.tensor([3.0]), impl=impl)
    torch.testing.assert_close(ret, torch.tensor([1.875, 1.75, 3.5]))
    torch.testing.assert_close(adv, torch.tensor([1.375, 0.75, 3.5]))
    # two trajectories, gamma = lam = 0.5: every intermediate is a short dyadic number, so every
    # evaluation order gives the exact values
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    r = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([0.5, 1.0, 2.0])
    last = torch.tensor([10.0, 4.0])
    g = discounted_returns(r, cu, gamma=0.5, last_values=last, impl=impl)
    assert g.tolist() == [1.0 + 0.5 * (2.0 + 0.5 * 10.0), 2.0 + 0.5 * 10.0, 3.0 + 0.5 * 4.0]
    adv, ret = step_gae(r, v, cu, gamma=0.5, lam=0.5, last_values=last, impl=impl)
    d1 = 2.0 + 0.5 * 10.0 - 1.0  # delta of step 1 (bootstraps from last_values[0])
    d0 = 1.0 + 0.5 * 1.0 - 0.5
    assert adv.tolist() == [d0 + 0.25 * d1, d1, 3.0 + 0.5 * 4.0 - 2.0]
    assert ret.tolist() == [a + b for a, b in zip(adv.tolist(), v.tolist())]


@pytest.mark.parametrize("impl", impls_for("discounted_returns"))
def test_discounted_returns_worked_by_hand(impl):
    impl = impl_or_skip("discounted_returns", impl)
    # gamma = 0.5: G_2 = 2 + 0.5*4 (bootstrap 4) = 4, G_1 = 0 + 0.5*4 = 2, G_0 = 1 + 0.5*2 = 2;
    # second trajectory (no bootstrap on a zero last value): G = 3.
    r = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    last = r.new_tensor([4.0, 0.0])
    out = discounted_returns(r, offsets([3, 1]), gamma=0.5, last_values=last, impl=impl)
    close(out, [2.0, 2.0, 4.0, 3.0], torch.float64)


@pytest.mark.parametrize("impl", impls_for("whiten"))
def test_whiten_worked_by_hand(impl):
    impl = impl_or_skip("whiten", impl)
    # x = [1, 2, 3, 10] with the last entry masked out: mean 2, unbiased std 1 -> every entry
    # (also the masked one) becomes (x - 2) / (1 + eps).
    x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    out = whiten(x, torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=torch.float64), eps=0.0, impl=impl)
    close(out, [-1.0, 0.0, 1.0, 8.0], torch.float64)


# ----------------------------------------------------------------------------- random layouts
@settings(max_examples=60, deadline=None)
@given(lengths=layouts, gamma=unit, lam=unit, bootstrap=st.booleans(), seed=st.integers(0, 2**16))
def test_step_gae_matches_oracle(lengths, gamma, lam, bootstrap, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    last = torch.randn(len(lengths), generator=gen, dtype=torch.float64) if bootstrap else None
    cu = offsets(lengths, torch.int64 if seed % 2 else torch.int32)
    adv, ret = step_gae(r, v, cu, gamma=gamma, lam=lam, last_values=last, impl="torch")
    exp_adv, exp_ret = gae_oracle(
        r.tolist(), v.tolist(), cu.tolist(), gamma, lam, None if last is None else last.tolist()
    )
    assert adv.shape == ret.shape == (n,)
    close(adv, exp_adv, torch.float64)
    close(ret, exp_ret, torch.float64)
    # lam = 1 telescopes: the GAE return is the bootstrapped discounted return.
    adv1, ret1 = step_gae(r, v, cu, gamma=gamma, lam=1.0, last_values=last)
    close(ret1, discounted_returns(r, cu, gamma=gamma, last_values=last).tolist(), torch.float64)


@settings(max_examples=60, deadline=None)
@given(lengths=layouts, gamma=unit, bootstrap=st.booleans(), seed=st.integers(0, 2**16))
def test_discounted_returns_matches_oracle(lengths, gamma, bootstrap, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(sum(lengths), generator=gen, dtype=torch.float64)
    last = torch.randn(len(lengths), generator=gen, dtype=torch.float64) if bootstrap else None
    cu = offsets(lengths)
    out = discounted_returns(r, cu, gamma=gamma, last_values=last, impl="torch")
    expected = returns_oracle(
        r.tolist(), cu.tolist(), gamma, None if last is None else last.tolist()
    )
    close(out, expected, torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12),
    masked=st.sampled_from(["none", "float", "bool"]),
    eps=st.sampled_from([0.0, 1e-8, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_whiten_matches_oracle(n, masked, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1
    weight = None
    if masked != "none":
        weight = torch.rand(n, generator=gen, dtype=torch.float64) - 0.4  # some <= 0
        weight = weight > 0 if masked == "bool" else weight
    out = whiten(x, weight, eps=eps, impl="torch")
    close(out, whiten_oracle(x.tolist(), None if weight is None else weight.tolist(), eps), x.dtype)


def test_whiten_without_weight_is_torch_std_normalisation():
    x = torch.randn(37, dtype=torch.float64)
    close(whiten(x), ((x - x.mean()) / (x.std() + 1e-8)).tolist(), torch.float64)
    # a 2-D input is whitened as a whole, with a 2-D mask
    x2 = torch.randn(4, 5, dtype=torch.float64)
    m2 = torch.rand(4, 5) > 0.3
    close(whiten(x2, m2).flatten(), whiten(x2.flatten(), m2.flatten()).tolist(), torch.float64)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("n_trajs", [0, 3])
@pytest.mark.parametrize("impl", impls_for("step_gae", "discounted_returns"))
def test_empty_batch(impl, n_trajs):
    impl = impl_or_skip("step_gae", impl)
    empty = torch.zeros(0)
    cu = torch.zeros(n_trajs + 1, dtype=torch.int32)
    last = torch.ones(n_trajs) if n_trajs else None
    adv, ret = step_gae(empty, empty, cu, last_values=last, impl=impl)
    assert adv.shape == ret.shape == (0,) and adv.dtype == torch.float32
    assert discounted_returns(empty, cu, last_values=last, impl=impl).shape == (0,)


@pytest.mark.parametrize("impl", impls_for("whiten"))
def test_whiten_empty(impl):
    impl = impl_or_skip("whiten", impl)
    assert whiten(torch.zeros(0), impl=impl).shape == (0,)


@pytest.mark.parametrize("impl", impls_for("step_gae"))
def test_empty_trajectories_between_nonempty_ones(impl):
    impl = impl_or_skip("step_gae", impl)
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    v = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    cu = offsets([0, 2, 0, 0, 1, 0])
    last = torch.arange(6, dtype=torch.float64)  # the empty trajectories' values are unused
    adv, _ = step_gae(r, v, cu, gamma=0.9, lam=0.8, last_values=last, impl=impl)
    close(adv, gae_oracle(r.tolist(), v.tolist(), cu.tolist(), 0.9, 0.8, last.tolist())[0], r.dtype)


@pytest.mark.parametrize("impl", impls_for("step_gae"))
def test_extreme_gamma_zero_cuts_every_link(impl):
    impl = impl_or_skip("step_gae", impl)
    cu = offsets([4, 3])
    r, v = torch.randn(7), torch.randn(7)
    adv, _ = step_gae(r, v, cu, gamma=0.0, lam=0.0, impl=impl)
    torch.testing.assert_close(adv, r - v)


@pytest.mark.parametrize("impl", impls_for("whiten"))
def test_whiten_degenerate_counts_never_nan(impl):
    impl = impl_or_skip("whiten", impl)
    x = torch.tensor([3.0, -1.0, 5.0])
    # no counted entry: mean 0, scale 1 -> x unchanged (a new tensor)
    out = whiten(x, torch.zeros(3), impl=impl)
    torch.testing.assert_close(out, x)
    assert out.data_ptr() != x.data_ptr()
    # one counted entry: it becomes 0, the others are shifted by it
    torch.testing.assert_close(whiten(x, torch.tensor([0.0, 1.0, 0.0]), impl=impl), x + 1.0)
    torch.testing.assert_close(whiten(x[:1], impl=impl), torch.zeros(1))
    # all counted entries equal: zero std -> counted entries 0, others (x - mean) / eps
    same = torch.tensor([2.0, 2.0, 2.0, 2.0 + 2**-20], dtype=torch.float64)
    out = whiten(same, torch.tensor([1.0, 1.0, 1.0, 0.0]), eps=2**-20, impl=impl)
    close(out, [0.0, 0.0, 0.0, 1.0], torch.float64)


@pytest.mark.parametrize("impl", impls_for("whiten"))
def test_whiten_is_differentiable_and_finite_at_zero_std(impl):
    impl = impl_or_skip("whiten", impl)
    x = torch.randn(9, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: whiten(t, w, eps=1e-3, impl=impl), (x,))
    flat = torch.full((4,), 0.7, dtype=torch.float64, requires_grad=True)
    whiten(flat, impl=impl).pow(2).sum().backward()
    assert torch.isfinite(flat.grad).all()


@pytest.mark.parametrize(
    "lengths, gamma", [([4, 1, 4], 0.9), ([2, 0, 3, 1], 0.8)], ids=["ragged", "with_empty"]
)
@pytest.mark.parametrize("impl", impls_for("discounted_returns"))
def test_discounted_returns_gradcheck(impl, lengths, gamma):
    impl = impl_or_skip("discounted_returns", impl)
    cu = offsets(lengths)
    r = torch.randn(int(cu[-1]), dtype=torch.float64, requires_grad=True)
    last = torch.randn(len(lengths), dtype=torch.float64, requires_grad=True)
    fn = lambda rr, ll: discounted_returns(rr, cu, gamma=gamma, last_values=ll, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (r, last))


@pytest.mark.parametrize("impl", impls_for("step_gae"))
def test_step_gae_outputs_are_detached(impl):
    impl = impl_or_skip("step_gae", impl)
    r = torch.randn(5, requires_grad=True)
    v = torch.randn(5, requires_grad=True)
    adv, ret = step_gae(r, v, offsets([2, 3]), gamma=0.9, lam=0.9, impl=impl)
    assert not adv.requires_grad and not ret.requires_grad and adv.grad_fn is None
