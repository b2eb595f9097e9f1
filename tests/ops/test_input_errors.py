"""Bad op inputs are named, on every backend: NaN/inf in the loss ops' float inputs (padding
excepted), the normalizer, eps = 0 on equal entries (0, never NaN); the value checks cost one
host transfer per call (malformed records: test_record_errors.py)."""

import pytest
import torch
from _impls import IMPLS, impl_or_skip, impls_for

import steppo_fast as sf
from steppo_fast._dispatch import available_impls

NAN, INF = float("nan"), float("inf")


def loss_case():
    # 3 steps of (2, 1, 2) tokens; trajectories: steps 0-1 | step 2
    return dict(
        logp=-torch.rand(5),
        old_logp=-torch.rand(5),
        advantages=torch.randn(3),
        cu_steps=torch.tensor([0, 2, 3, 5], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 2, 3], dtype=torch.int32),
    )


def _with(x: torch.Tensor, i: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[i] = value
    return x


# ------------------------------------------------------------------ loss ops: NaN / inf


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, index, value",
    [("logp", 3, NAN), ("old_logp", 0, -INF), ("advantages", 2, INF), ("ref_logp", 4, NAN)],
)
def test_step_policy_loss_names_non_finite_input(impl, name, index, value):
    case = loss_case()
    case["ref_logp"] = -torch.rand(5)
    case[name] = _with(case[name], index, value)
    with pytest.raises(ValueError, match=rf"^{name}: entry {index} is {value}; all must be finite"):
        sf.step_policy_loss(**case, kl_coef=0.1, impl=impl_or_skip("step_policy_loss", impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_step_policy_loss_accepts_garbage_where_it_is_never_read(impl):
    impl = impl_or_skip("step_policy_loss", impl)
    case = loss_case()
    expected, _ = sf.step_policy_loss(**case, step_weight=torch.tensor([1.0, 0.0, 1.0]), impl=impl)
    # step 1 (token 2) has weight 0: its advantage and tokens may hold anything
    case["logp"] = _with(case["logp"], 2, NAN)
    case["old_logp"] = _with(case["old_logp"], 2, INF)
    case["advantages"] = _with(case["advantages"], 1, -INF)
    ref = _with(-torch.rand(5), 0, NAN)  # ref_logp is not read without a KL term
    loss, stats = sf.step_policy_loss(
        **case, step_weight=torch.tensor([1.0, 0.0, 1.0]), ref_logp=ref, impl=impl
    )
    assert torch.equal(loss, expected) and all(v == v for v in stats.values())
    # ... but a non-finite entry of a counted step is named, with the rule
    case["logp"] = _with(case["logp"], 4, NAN)
    with pytest.raises(ValueError, match=r"^logp: entry 4 is nan; entries with step_weight > 0"):
        sf.step_policy_loss(**case, step_weight=torch.tensor([1.0, 0.0, 1.0]), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "normalizer, rule",
    [
        (0.0, "must be > 0"),
        (-1.0, "must be > 0"),
        (NAN, "must be > 0"),
        (INF, "must be > 0"),
        (torch.tensor(NAN), "must be > 0"),
        (True, "expected a real number"),
        ("2", "expected a real number"),
        (torch.ones(2), "expected a real number"),
        (1e-45, "so small that the loss can overflow"),
    ],
)
def test_normalizer_must_be_finite_and_positive(impl, normalizer, rule):
    impl = impl_or_skip("step_policy_loss", impl)
    with pytest.raises(ValueError, match=f"^normalizer: .*{rule}"):
        sf.step_policy_loss(**loss_case(), normalizer=normalizer, impl=impl)


@pytest.mark.parametrize("normalizer", [0.0, NAN, -INF, False])
def test_value_loss_normalizer(normalizer):
    v = torch.randn(4)
    with pytest.raises(ValueError, match="^normalizer: "):
        sf.value_loss(v, v, v, normalizer=normalizer)


@pytest.mark.parametrize("impl", impls_for("value_loss"))
@pytest.mark.parametrize("name", ["values", "old_values", "returns"])
def test_value_loss_names_non_finite_input(impl, name):
    impl = impl_or_skip("value_loss", impl)
    args = {k: torch.randn(4) for k in ("values", "old_values", "returns")}
    args[name] = _with(args[name], 1, NAN)
    with pytest.raises(ValueError, match=rf"^{name}: entry 1 is nan; all must be finite"):
        sf.value_loss(**args, clip=0.2, impl=impl)
    # a zero-weight entry never reaches the loss: garbage there is accepted
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss = sf.value_loss(**args, clip=0.2, weight=weight, impl=impl)
    assert torch.isfinite(loss)
    args[name] = _with(args[name], 3, -INF)
    with pytest.raises(ValueError, match=rf"^{name}: entry 3 is -inf; entries with weight > 0"):
        sf.value_loss(**args, clip=0.2, weight=weight, impl=impl)


@pytest.mark.parametrize("impl", impls_for("kl_penalty"))
@pytest.mark.parametrize("name", ["logp", "ref_logp"])
def test_kl_penalty_names_non_finite_input(impl, name):
    impl = impl_or_skip("kl_penalty", impl)
    args = {"logp": -torch.rand(6), "ref_logp": -torch.rand(6)}
    args[name] = _with(args[name], 5, INF)
    for kind in ("k1", "k2", "k3"):
        with pytest.raises(ValueError, match=rf"^{name}: entry 5 is inf; all must be finite"):
            sf.kl_penalty(args["logp"], args["ref_logp"], kind, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, index, shown",
    [("hidden", (2, 1), r"\(2, 1\)"), ("weight", (6, 0), r"\(6, 0\)"), ("bias", (3,), "3")],
)
def test_linear_logprobs_names_non_finite_input(impl, name, index, shown):
    impl = impl_or_skip("linear_logprobs", impl)
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8), "bias": torch.randn(10)}
    args[name] = args[name].clone()
    args[name][index] = NAN
    with pytest.raises(ValueError, match=rf"^{name}: entry {shown} is nan; all must be finite"):
        sf.linear_logprobs(
            args["hidden"], args["weight"], torch.tensor([0, 3, 9, 2]), bias=args["bias"], impl=impl
        )


class _CountHostReads:
    """Counts the reads of tensor values into Python (tolist, item, int, float, bool) while
    active: each is one host transfer (a device sync on an accelerator)."""

    NAMES = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, **kwargs):
                self.count += 1
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(self, fn) -> int:
        before = self.count
        fn()
        return self.count - before


def test_value_checks_read_all_inputs_in_one_host_transfer(monkeypatch):
    """Offsets, weights, finiteness and magnitudes of one call share one host transfer (the
    step loss did one per offsets tensor, one for the non-empty steps and one for the weights
    before; kl_penalty, value_loss and linear_logprobs read their inputs once)."""
    case = loss_case()
    kw = dict(cu_trajs=case.pop("cu_trajs"), ref_logp=-torch.rand(5), kl_coef=0.1)
    counter = _CountHostReads(monkeypatch)
    for options in (
        dict(step_weight=torch.ones(3)),
        dict(step_weight=None, agg="traj-mean", ratio_level="trajectory"),
    ):
        n = counter.reads(
            lambda o=options: sf.step_policy_loss(**case, **kw, **o, stats="tensor", impl="torch")
        )
        assert n == 1, options
    logp = -torch.rand(4)
    assert counter.reads(lambda: sf.kl_penalty(logp, logp, impl="torch")) == 1
    assert counter.reads(lambda: sf.value_loss(logp, logp, logp, weight=logp.abs())) == 1
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    targets = torch.tensor([0, 1, 4])
    assert counter.reads(lambda: sf.linear_logprobs(hidden, weight, targets, impl="torch")) == 1
    # the failure path may read more, to name the offender
    bad = _with(case["logp"], 2, NAN)
    with pytest.raises(ValueError, match="^logp: entry 2 is nan"):
        sf.step_policy_loss(bad, case["old_logp"], case["advantages"], case["cu_steps"])


def test_value_checks_are_skipped_while_compiling():
    """Traced code trusts its inputs' values (no host read): with stats='tensor' the call traces
    with fullgraph, and a NaN that eager rejects flows through."""
    case = loss_case()
    case["logp"] = _with(case["logp"], 1, NAN)
    with pytest.raises(ValueError, match="^logp: entry 1 is nan"):
        sf.step_policy_loss(**case, stats="tensor", impl="torch")

    def run(logp, old_logp, advantages, cu_steps):
        loss, _ = sf.step_policy_loss(
            logp, old_logp, advantages, cu_steps, stats="tensor", impl="torch"
        )
        return loss

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    args = (case["logp"], case["old_logp"], case["advantages"], case["cu_steps"])
    assert torch.isnan(compiled(*args))


# ------------------------------------------------------------------ eps = 0 on equal entries


# entries per op, chosen so that an fp64 mean of equal fp64 values summed directly misses
# them (6 or 3 copies of 0.1): the statistics must be taken about a pivot to give exactly 0
ZERO_EPS_LENGTH = {"whiten": 6, "whiten_masked": 7, "group_advantages": 7, "gigpo_advantages": 6}


def _zero_eps_call(op: str, x: torch.Tensor, impl: str) -> torch.Tensor:
    """``op`` with eps = 0 on ``x``, whose entries are equal within every class."""
    if op == "whiten":
        return sf.whiten(x, eps=0.0, impl=impl)
    if op == "whiten_masked":
        return sf.whiten(x, torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), eps=0.0, impl=impl)
    if op == "group_advantages":
        return sf.group_advantages(x, torch.tensor([4, 7, 4, 7, 4, 7, 4]), eps=0.0, impl=impl)
    # three trajectories of two equal rewards: equal episode returns, and anchors put the
    # steps with equal discounted returns together (classes of three)
    cu_trajs = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    group, anchor = torch.tensor([1, 1, 1]), torch.tensor([0, 5, 0, 5, 0, 5])
    return sf.gigpo_advantages(x, cu_trajs, group, anchor, eps=0.0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["whiten", "whiten_masked", "group_advantages", "gigpo_advantages"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eps_zero_on_equal_entries_gives_zero(impl, op, dtype):
    name = op.removesuffix("_masked")
    n = ZERO_EPS_LENGTH[op]
    if impl not in available_impls(name):
        with pytest.raises(ValueError, match=f"impl: '{impl}' is unavailable for {name}"):
            _zero_eps_call(op, torch.zeros(n, dtype=dtype), impl)
        return
    # 0.1 is not exact in binary; 3e38 and its sums overflow fp32; -1e-40 is subnormal
    for value in (0.1, 3e38, -1e-40):
        x = torch.full((n,), value, dtype=dtype, requires_grad=True)
        out = _zero_eps_call(op, x, impl)
        assert torch.equal(out, torch.zeros_like(out)), (op, value, out)
        out.backward(torch.arange(float(n), dtype=out.dtype))
        assert torch.isfinite(x.grad).all(), (op, value, x.grad)


def test_value_read_runs_on_one_cpu_thread_and_restores_the_count():
    """The CPU value read runs single-threaded (a 2-thread aminmax stalled under load) and
    leaves the caller's thread count as it was, also when the read raises."""
    from steppo_fast._validate import min_max_all

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        x = torch.randn(70_000)
        real = torch.aminmax

        def spy(t, *a, **k):
            seen.append(torch.get_num_threads())
            return real(t, *a, **k)

        torch.aminmax = spy
        try:
            got = min_max_all(x, None, x[:0])
            assert got == [(float(x.min()), float(x.max())), None, None]
        finally:
            torch.aminmax = real
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            sf.kl_penalty(_with(x, 3, NAN), x, impl="torch")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_advantage_ops_read_their_values_in_one_host_transfer(monkeypatch):
    """Offsets and finiteness (and the return-magnitude bound) of an advantage op: one read.
    The backend is stubbed out so that only the validation's reads are counted."""
    import steppo_fast.ops.advantages as adv_ops

    class Stub:
        def __getattr__(self, name):
            return lambda *args, **kwargs: (args[0], args[0])

    monkeypatch.setattr(adv_ops, "resolve", lambda *a: Stub())
    counter = _CountHostReads(monkeypatch)
    r, cu = torch.randn(5), torch.tensor([0, 2, 5], dtype=torch.int32)
    last = torch.zeros(2)
    calls = {
        "step_gae": lambda: sf.step_gae(r, r, cu, last_values=last),
        "discounted_returns": lambda: sf.discounted_returns(r, cu, last_values=last),
        "whiten": lambda: sf.whiten(r, r.abs()),
        "gigpo_advantages": lambda: sf.gigpo_advantages(
            r, cu, torch.tensor([0, 0]), torch.arange(5)
        ),
    }
    for name, call in calls.items():
        assert counter.reads(call) == 1, name
