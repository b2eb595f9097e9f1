"""Backends agree at the edges of the fp32 range.

- ``whiten`` / ``group_advantages`` of values near the fp32 limit (their sums and squares
  overflow fp32): every backend returns the exact result rounded once to fp32, checked against a
  plain-Python fp64 oracle.
- ``step_policy_loss`` with advantages (or log-probs) so large that a backend's fp32 partial
  sums could overflow: every backend raises the same ``ValueError``; just inside the bound, every
  backend's loss and gradient are finite and match the fp64 reference.

Tolerances come from error analysis: one rounding to fp32 (half an ulp, eps32 / 2 relative) on
top of fp64 statistics whose error is about n * eps64 * max|x| (absolute, before dividing by the
scale); for the loss, K fp32 accumulations of terms bounded by max|L| (see each test).
"""

import math

import pytest
import torch
from _impls import IMPLS

import steppo_fast as sf
from steppo_fast._dispatch import available_impls
from steppo_fast.ops._loss_checks import RHO_MAX

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
FMAX = torch.finfo(torch.float32).max


def _run_or_check_absent(op: str, impl: str, fn):
    """``fn()`` when ``impl`` implements ``op``; else the dispatcher must refuse it by name."""
    if impl in available_impls(op):
        return fn()
    with pytest.raises(ValueError, match=f"impl: '{impl}' is unavailable for {op}"):
        fn()
    return None


def _normalise_oracle(values: list[float], eps: float, scaled: bool) -> tuple[list[float], float]:
    """(x - mean) / (std + eps) (or x - mean) in Python floats (fp64) with exact sums (fsum);
    returns the results and the divisor. A class of one gives the identity divisor 1."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return [v - mean for v in values], 1.0
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    scale = std + eps if scaled and std + eps > 0 else 1.0
    return [(v - mean) / scale for v in values], scale


def _assert_rounded_once(got: torch.Tensor, exact: list[float], max_abs: float, scale: float, n):
    """``got`` (fp32) is ``exact`` (fp64) rounded once: relative error <= eps32 (half an ulp plus
    margin), plus the absolute fp64 error of the mean, 4 n eps64 max|x| / scale, plus the
    smallest subnormal (results that round into the subnormal range)."""
    want = torch.tensor(exact, dtype=torch.float64)
    got64 = got.double()
    inf = torch.isinf(want.float())  # beyond the fp32 range: must round to the same inf
    assert torch.equal(torch.isinf(got64), inf) and torch.equal(
        got64[inf], want[inf].float().double()
    )
    atol = 4 * n * EPS64 * max_abs / scale + 2**-149
    err = (got64 - want)[~inf].abs()
    bound = EPS32 * want[~inf].abs() + atol
    assert (err <= bound).all(), (got, exact, err.max())


WHITEN_CASES = [
    # values, weight (None = all counted)
    ([3e38, -3e38, 3e38, -3e38], None),  # sum 0, squares overflow fp32
    ([3.4e38, 3.4e38, 3.4e38], None),  # equal at the limit: 0 (their sum overflows fp32)
    ([3.4e38, -3.4e38, 1.0, 0.0, 2e38], None),
    ([1e-45, 2e-45, 3e-45, -1e-45], None),  # subnormal
    ([1.0, 2.0, 3.0, 3e38], [1.0, 1.0, 1.0, 0.0]),  # uncounted entry far away: 3e38 / 1
    ([1.0, 1.0 + 2**-23, 3e38], [1.0, 1.0, 0.0]),  # (3e38 - 1) / 8.4e-8 is beyond fp32: inf
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("values, weight", WHITEN_CASES)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_whiten_near_the_fp32_limit_is_the_exact_result_rounded(impl, values, weight, eps):
    x = torch.tensor(values, dtype=torch.float32)
    w = None if weight is None else torch.tensor(weight)
    got = _run_or_check_absent("whiten", impl, lambda: sf.whiten(x, w, eps=eps, impl=impl))
    if got is None:
        return
    exact_x = x.double().tolist()  # the fp32 inputs, exactly
    kept = [v for i, v in enumerate(exact_x) if w is None or w[i] > 0]
    _, scale = _normalise_oracle(kept, eps, scaled=True)
    mean = math.fsum(kept) / len(kept)
    exact = [(v - mean) / scale for v in exact_x]
    assert not torch.isnan(got).any()
    _assert_rounded_once(got, exact, max(map(abs, kept)), scale, len(kept))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_near_the_fp32_limit(impl, mode):
    scores = torch.tensor([3e38, -3e38, 1.0, 2.0, 3.0, 3.4e38, 3.4e38, 3.3e38, -3.3e38, 5.0])
    group = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4])

    def run():
        return sf.group_advantages(scores, group, mode=mode, eps=1e-6, impl=impl)

    got = _run_or_check_absent("group_advantages", impl, run)
    if got is None:
        return
    x = scores.double().tolist()
    for g in group.unique().tolist():
        members = [i for i in range(len(x)) if group[i] == g]
        vals = [x[i] for i in members]
        out, scale = _normalise_oracle(vals, 1e-6, scaled=mode == "grpo")
        n = len(vals)
        if n < 2:
            out = [0.0] * n
        elif mode == "rloo":
            out = [v * n / (n - 1) for v in out]
            scale = scale * (n - 1) / n
        _assert_rounded_once(got[members], out, max(map(abs, vals)), scale, n)


# ------------------------------------------------------------------ step_policy_loss


def loss_case(adv_scale: float, log_ratio: float = 0.3):
    """3 steps of (2, 1, 2) tokens, trajectories steps 0-1 | step 2, advantages of magnitude
    ``adv_scale`` and both signs, log-ratios within +-``log_ratio`` (per token)."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(5, generator=g)
    return dict(
        logp=logp,
        old_logp=logp - log_ratio * (2 * torch.rand(5, generator=g) - 1),
        advantages=adv_scale * torch.tensor([1.0, -0.7, 0.4]),
        cu_steps=torch.tensor([0, 2, 3, 5], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 2, 3], dtype=torch.int32),
    )


OPTIONS = [
    dict(ratio_level="step", agg="step-mean"),
    dict(ratio_level="token", agg="token-mean"),
    dict(ratio_level="trajectory", agg="traj-mean", dual_clip=3.0),
    dict(ratio_level="step", agg="token-mean", step_weight=torch.tensor([2.0, 0.5, 1.0])),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("adv_scale", [1e38, 3e38, 1e30])
def test_loss_refuses_advantages_that_could_overflow_on_every_backend(impl, options, adv_scale):
    """N * max(step_weight) * e^20 * max|A| beyond FLT_MAX / 2: the same error everywhere
    (before: torch and triton returned -inf or NaN-free but infinite losses, the C++ op raised
    a RuntimeError from its fp32 cast)."""
    with pytest.raises(ValueError, match=r"^advantages: \|advantages\| up to .* can overflow"):
        sf.step_policy_loss(**loss_case(adv_scale), **options, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "change, name",
    [
        (dict(logp=torch.full((5,), -1e38)), "logp"),
        (dict(old_logp=torch.full((5,), -5e37)), "old_logp"),
        (dict(ref_logp=torch.full((5,), -1e20), kl_type="k2", kl_coef=0.1), "ref_logp"),
        (dict(ref_logp=torch.zeros(5), kl_coef=1e37), "kl_coef"),
        (dict(step_weight=torch.tensor([1.0, 1e31, 1.0])), "step_weight"),
        (dict(advantages=torch.zeros(3), step_weight=torch.full((3,), 1e31)), "step_weight"),
    ],
)
def test_loss_refuses_inputs_that_could_overflow_on_every_backend(impl, change, name):
    with pytest.raises(ValueError, match=rf"^{name}: .* can overflow"):
        sf.step_policy_loss(**{**loss_case(1.0), **change}, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("log_ratio", [0.3, 60.0])  # 60: every ratio clamped, rho up to e^20
def test_loss_just_inside_the_bound_matches_fp64_on_every_backend(impl, options, log_ratio):
    units = {"step-mean": 3, "token-mean": 5, "traj-mean": 2}[options["agg"]]
    w_max = float(options["step_weight"].max()) if "step_weight" in options else 1.0
    # the largest |A| the bound accepts, less 1%: terms up to ~FMAX / (2 units) each
    a_max = 0.99 * (FMAX / 2) / (units * w_max * RHO_MAX)
    case = loss_case(a_max, log_ratio)
    logp = case.pop("logp").requires_grad_()
    loss, stats = sf.step_policy_loss(logp, **case, **options, impl=impl)
    (grad,) = torch.autograd.grad(loss, logp)
    ref64 = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in {**case, **options}.items()
    }
    logp64 = logp.detach().double().requires_grad_()
    want, want_stats = sf.step_policy_loss(logp64, **ref64, impl="torch")
    (want_grad,) = torch.autograd.grad(want, logp64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # K = 5 tokens of fp32 work per term (log-ratio sum, exp, products) and K terms summed:
    # each term is off by <= 8 K eps32 of max|L| = rho_max |A|_max w_max; the rounding of the
    # log-ratio sum l (|l| <= 5 * 60) moves rho by rho * K eps32 |l|
    k = 5
    term = want_stats["ratio_max"] * a_max * w_max
    slack = 8 * k * EPS32 * (1 + k * log_ratio)
    assert abs(float(loss.detach()) - float(want.detach())) <= slack * term * units, (loss, want)
    assert (grad.double() - want_grad).abs().max() <= slack * want_grad.abs().max() + 2**-149
    assert stats["clip_frac"] == pytest.approx(want_stats["clip_frac"], abs=1e-6)


def test_cpp_raw_op_rounds_an_overflowing_sum_to_inf_instead_of_raising():
    """Past the public bound (only reachable through the raw op) the C++ loss sum is rounded
    like any tensor cast, to +-inf, as an fp32 sum overflows; it used to raise from fill_."""
    if "cpp" not in available_impls("step_policy_loss"):
        pytest.skip("C++ extension not built")
    case = loss_case(3e38)
    out = torch.ops.steppo_fast.step_policy_loss(
        case["logp"],
        case["old_logp"],
        case["advantages"],
        case["cu_steps"],
        None,
        None,
        None,
        "token",
        1.0,
        0.2,
        0.2,
        None,
        "token-mean",
        0.0,
        "k3",
        False,
    )
    loss_sum = out[0]
    assert loss_sum.dtype == torch.float32 and torch.isinf(loss_sum)


# ------------------------------------------------------------------ step_gae, discounted_returns

SCAN_CU = torch.tensor([0, 3, 5], dtype=torch.int32)  # S = 5 steps, T <= 3


def _scan_inputs(m: float):
    """rewards, values, last_values of magnitude ~ m, with both signs."""
    rewards = m * torch.tensor([1.0, 1.0, -1.0, 0.3, 1.0])
    values = m * torch.tensor([1.0, -1.0, 1.0, 0.5, 0.9])
    return rewards, values, m * torch.tensor([0.5, -1.0])


@pytest.mark.parametrize("impl", IMPLS)
def test_scans_refuse_inputs_whose_returns_could_overflow_on_every_backend(impl):
    """(S + 1) * (max|r| + 2 max|V|) beyond FMAX / 2: the same error everywhere (before: NaN from
    torch and triton's fp32 scans, finite or inf values from the C++ scan in double)."""
    rewards, values, last = _scan_inputs(3e38)
    with pytest.raises(ValueError, match=r"^(rewards|values): .* can overflow the returns"):
        sf.step_gae(rewards, values, SCAN_CU, gamma=1.0, lam=0.9, impl=impl)
    with pytest.raises(ValueError, match=r"^rewards: .* can overflow the returns"):
        sf.discounted_returns(rewards, SCAN_CU, gamma=0.5, last_values=last, impl=impl)
    small = torch.ones(5)  # the bootstrap value alone can be too large
    with pytest.raises(ValueError, match=r"^last_values: .* can overflow the returns"):
        sf.step_gae(small, small, SCAN_CU, last_values=last, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_scans_just_inside_the_bound_match_fp64_on_every_backend(impl):
    m = 0.99 * (FMAX / 2) / (6 * 3)  # (S + 1) * (max|r| + 2 max|V|) just below FMAX / 2
    rewards, values, last = _scan_inputs(m)
    got = sf.step_gae(rewards, values, SCAN_CU, gamma=1.0, lam=0.9, last_values=last, impl=impl)
    want = sf.step_gae(
        rewards.double(),
        values.double(),
        SCAN_CU,
        gamma=1.0,
        lam=0.9,
        last_values=last.double(),
        impl="torch",
    )
    ret = sf.discounted_returns(rewards, SCAN_CU, gamma=0.5, last_values=last, impl=impl)
    ret_want = sf.discounted_returns(
        rewards.double(), SCAN_CU, gamma=0.5, last_values=last.double(), impl="torch"
    )
    # each output sums <= T + 1 terms of magnitude <= 3 m, each carrying <= 2 (T + 1) fp32
    # roundings (products of factors, additions): |error| <= 2 (T + 1)^2 eps32 * 3 m, T = 3
    atol = 2 * 16 * EPS32 * 3 * m
    for g, w in zip((*got, ret), (*want, ret_want)):
        assert torch.isfinite(g).all()
        assert (g.double() - w).abs().max() <= atol, (g, w)


# ------------------------------------------------------------------ linear_logprobs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "scale_h, scale_w, temperature, name",
    [(1e21, 1e18, 1.0, "hidden"), (1.0, 1e37, 1.0, "weight"), (1.0, 1.0, 1e-38, "temperature")],
)
def test_logprobs_refuse_logits_that_could_overflow(impl, scale_h, scale_w, temperature, name):
    """Finite inputs whose logits overflow fp32 would give inf - inf = NaN log-probs on every
    backend: refused by name instead."""
    hidden, weight = scale_h * torch.randn(3, 8), scale_w * torch.randn(11, 8)
    targets = torch.tensor([0, 5, 10])

    def run():
        return sf.linear_logprobs(hidden, weight, targets, temperature=temperature, impl=impl)

    if impl not in available_impls("linear_logprobs"):
        pytest.skip(f"{impl} has no linear_logprobs")
    with pytest.raises(ValueError, match=rf"^{name}: .* the logits can overflow"):
        run()


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_just_inside_the_logit_bound_are_finite(impl):
    """Logits up to ~1.7e38 / 8: the log-probs are finite on every backend and match fp64
    (z_t - logsumexp z: one rounding of each logit, |error| <= 4 H eps32 max|z|)."""
    if impl not in available_impls("linear_logprobs"):
        pytest.skip(f"{impl} has no linear_logprobs")
    hidden = torch.tensor([[1.0, -1.0], [0.5, 0.25], [-1.0, -1.0]])
    weight = 0.99 * (FMAX / 2) / 2 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.5, 0.5]])
    targets = torch.tensor([0, 1, 2])
    got = sf.linear_logprobs(hidden, weight, targets, impl=impl)
    want = sf.linear_logprobs(hidden.double(), weight.double(), targets, impl="torch")
    z_max = float((hidden.double() @ weight.double().T).abs().max())
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 4 * 2 * EPS32 * z_max


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["whiten", "group_advantages", "gigpo_advantages"])
def test_normalisations_refuse_fp64_values_whose_squares_overflow(impl, op):
    """fp64 inputs near 1e200: squared deviations overflow even fp64 (NaN or a silently wrong
    0 before, on torch and cpp alike): refused by name; fp32 inputs can never get there."""
    x = 1e200 * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    name = {"whiten": "x", "group_advantages": "scores", "gigpo_advantages": "rewards"}[op]
    cu, group = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([0, 0])
    calls = {
        "whiten": lambda v: sf.whiten(v, impl=impl),
        "group_advantages": lambda v: sf.group_advantages(v, torch.zeros(4, dtype=int), impl=impl),
        "gigpo_advantages": lambda v: sf.gigpo_advantages(
            v, cu, group, torch.tensor([0, 1, 0, 1]), impl=impl
        ),
    }
    with pytest.raises(ValueError, match=rf"^{name}: .* can overflow the fp64 statistics"):
        calls[op](x)
    ok = _run_or_check_absent(op, impl, lambda: calls[op](x / 1e50))  # 1e150: inside
    assert ok is None or torch.isfinite(ok).all()
