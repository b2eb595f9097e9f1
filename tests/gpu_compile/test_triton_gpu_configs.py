"""The GPU launch configurations of ``steppo_fast.kernels._configs`` give the reference results
under the interpreter: every configuration the table can return on CUDA
(``_configs.gpu_launches``) is run once on a small shape with tails in every tiled dimension,
so a configuration that is wrong for masking, tails or grid sizes fails here, not on a GPU.

The device decides the configuration (``_configs.gpu_of``); these tests make CPU tensors look
like an H100 with 1 SM (every shape takes the large tiles) or with 10**6 SMs (every shape takes
the small-grid tiles) and record which configurations reached the kernels."""

import collections
import math

import pytest
import torch
from _tolerance import assert_close_pair, assert_within, scan_error
from steppo_fast.kernels import _configs
from test_triton_logprobs import (
    SUBNORMAL_HALF_SPACING,
    UNIT_ROUNDOFF,
    all_close_to_oracle,
    assert_within_one_dz_rounding,
    inputs,
    logit_grad_oracle,
    oracle_run,
)
from test_triton_logprobs import run as run_logprobs
from test_triton_scan import gae_bounds
from test_triton_segments import grad_bound, segment_bound
from test_triton_step_loss import compare as compare_loss
from test_triton_step_loss import offsets

import steppo_fast as sf

FEW_SMS, MANY_SMS = 1, 10**6  # large tiles everywhere / small-grid tiles everywhere


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(num_sms)`` makes every CPU tensor look like an sm_90 device with ``num_sms`` SMs;
    ``gpu.used`` maps each kernel family to the launch configurations its kernels received."""
    used = collections.defaultdict(set)

    def spy(name, family_of):
        original = getattr(_configs, name)

        def chosen(*args):
            launch = original(*args)
            used[family_of(args)].add(launch)
            return launch

        monkeypatch.setattr(_configs, name, chosen)

    def width(args):
        return "16" if args[-1] else "32"

    spy("lse_fwd", lambda args: "lse_fwd" + width(args))
    spy("logit_grad", lambda args: "logit_grad" + width(args))
    spy("matmul", lambda args: "matmul" + width(args))
    spy("segment_reduce", lambda args: "segment_reduce")
    spy("step_loss", lambda args: "step_loss")
    spy("step_loss_traj", lambda args: "step_loss_traj")
    spy("fixed", lambda args: args[1])

    def use(num_sms):
        monkeypatch.setattr(_configs, "gpu_of", lambda device: _configs.Gpu(90, num_sms))

    use.used = used
    return use


def assert_covered(used, *families):
    table = _configs.gpu_launches()
    for family in families:
        missing = set(table[family]) - used[family]
        assert not missing, (family, missing)


def test_linear_logprobs_with_gpu_configs(gpu):
    """130 rows (two 128-row tiles, the second almost empty), V = 203 (a 75-entry tail tile),
    H = 40 (one masked 64-wide slice), two backward chunks (100 + 30 rows: d W accumulates)."""
    kw = dict(temperature=0.7, return_entropy=True, chunk_size=100)
    for dtype, tiers in ((torch.float32, (FEW_SMS,)), (torch.bfloat16, (FEW_SMS, MANY_SMS))):
        hidden, weight, bias, targets, g_logp, g_ent = inputs(dtype, rows=130)
        f32 = [t.float() for t in (hidden, weight, bias)]
        outs_r, grads_r = run_logprobs("torch", *f32, targets, g_logp, g_ent, **kw)
        outs_o, grads_o = oracle_run((*f32, targets, g_logp, g_ent), **kw)
        for num_sms in tiers:
            gpu(num_sms)
            outs_t, grads_t = run_logprobs(
                "triton", hidden, weight, bias, targets, g_logp, g_ent, **kw
            )
            all_close_to_oracle(outs_t, outs_r, outs_o, "outputs")
            if dtype == torch.float32:
                all_close_to_oracle(grads_t, grads_r, grads_o, "gradients")
                continue
            dz = logit_grad_oracle(*f32, targets, g_logp, g_ent, kw["temperature"])
            per_entry = UNIT_ROUNDOFF[dtype] * dz.abs() + SUBNORMAL_HALF_SPACING[dtype]
            bounds = [per_entry @ f32[1].double().abs(), per_entry.T @ f32[0].double().abs(), 0.0]
            for got, want, oracle, bound in zip(grads_t, grads_r, grads_o, bounds):
                assert got.dtype == dtype
                assert_within_one_dz_rounding(got, want, oracle, bound)
    assert_covered(
        gpu.used, "lse_fwd16", "lse_fwd32", "logit_grad16", "logit_grad32", "matmul16", "matmul32"
    )


def _lengths(gen, count, low, high, empty_every=7):
    lengths = torch.randint(low, high + 1, (count,), generator=gen)
    lengths[::empty_every] = 0  # empty segments
    return lengths.tolist()


def _layouts():
    """Short segments (mean <= 32: 32-wide tiles) and long ones (128-wide tiles)."""
    gen = torch.Generator().manual_seed(1)
    return dict(short=_lengths(gen, 70, 1, 9), long=_lengths(gen, 9, 60, 300))


@pytest.mark.parametrize("layout", ["short", "long"])
def test_segment_ops_with_gpu_configs(gpu, layout):
    lengths = _layouts()[layout]
    cu = offsets(lengths)
    x, y = torch.randn(int(cu[-1])), torch.randn(len(lengths))
    g_seg, g_ent = torch.randn(len(lengths)), torch.randn(int(cu[-1]))
    for num_sms in (FEW_SMS, MANY_SMS):
        gpu(num_sms)
        for fn, inp, g in (
            (sf.segment_sum, x, g_seg),
            (sf.segment_mean, x, g_seg),
            (sf.segment_broadcast, y, g_ent),
        ):
            results = []
            for impl in ("triton", "torch"):
                leaf = inp.clone().requires_grad_()
                out = fn(leaf, cu, impl=impl)
                (out * g).sum().backward()
                results.append((out.detach(), leaf.grad))
            (out_t, grad_t), (out_r, grad_r) = results
            assert_within(out_t, out_r, segment_bound(fn, inp, cu), fn.__name__)
            assert_within(grad_t, grad_r, grad_bound(fn, g, cu), f"d {fn.__name__}")
    families = ["elementwise"]
    assert {launch["BLOCK_T"] for launch in gpu.used["segment_reduce"]} == {
        32 if layout == "short" else 128
    }
    assert len(gpu.used["segment_reduce"]) == 2  # both grid tiers
    assert_covered(gpu.used, *families)


def test_segment_reduce_gpu_configs_all_covered(gpu):
    """The two layouts above reach all four segment-reduce configurations."""
    for lengths in _layouts().values():
        cu = offsets(lengths)
        x = torch.randn(int(cu[-1]))
        for num_sms in (FEW_SMS, MANY_SMS):
            gpu(num_sms)
            got, want = (sf.segment_sum(x, cu, impl=impl) for impl in ("triton", "torch"))
            assert_within(got, want, segment_bound(sf.segment_sum, x, cu), "segment_sum")
    assert_covered(gpu.used, "segment_reduce")


def test_scans_with_gpu_configs(gpu):
    """2500 elements: three 1024-element chunks (aggregate, carry, apply kernels), trajectories
    straddling chunk boundaries, an empty one."""
    gen = torch.Generator().manual_seed(2)
    lengths = _lengths(gen, 40, 1, 120)
    cu = offsets(lengths)
    n = int(cu[-1])
    assert n > 2048
    rewards, values = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    last = torch.randn(len(lengths), generator=gen)
    gpu(FEW_SMS)
    kw = dict(gamma=0.99, lam=0.95, last_values=last)
    want = sf.step_gae(rewards, values, cu, impl="torch", **kw)
    bounds = gae_bounds(rewards, values, cu, 0.99, 0.95, last, *want)
    for got, ref, bound in zip(sf.step_gae(rewards, values, cu, impl="triton", **kw), want, bounds):
        assert_within(got, ref, bound, "step_gae")
    results = []
    for impl in ("triton", "torch"):
        r = rewards.clone().requires_grad_()
        out = sf.discounted_returns(r, cu, gamma=0.97, last_values=last, impl=impl)
        (out * values).sum().backward()
        results.append((out.detach(), r.grad))
    (out, d_r), (out_r, d_r_ref) = results
    twice = 2 * scan_error(torch.float32, 2 * rewards.abs() + out_r.abs(), cu, 0.97)
    assert_within(out, out_r, twice, "discounted_returns")
    d_bound = 2 * scan_error(
        torch.float32, 2 * values.abs() + d_r_ref.abs(), cu, 0.97, reverse=False
    )
    assert_within(d_r, d_r_ref, d_bound, "d rewards")
    assert_covered(gpu.used, "scan", "scan_carry")


# asymmetric and dual clips and a KL term: every branch of the loss kernels runs
CLIPS_AND_KL = dict(clip_low=0.1, clip_high=0.15, dual_clip=1.5, kl_coef=0.2)


def _loss_batch(lengths, num_trajs, seed):
    gen = torch.Generator().manual_seed(seed)
    cu_steps = offsets(lengths)
    a, s = int(cu_steps[-1]), len(lengths)
    cuts = sorted(torch.randperm(s - 1, generator=gen)[: num_trajs - 1].add(1).tolist())
    cu_trajs = offsets([hi - lo for lo, hi in zip([0, *cuts], [*cuts, s])])
    logp = -torch.rand(a, generator=gen) * 3
    weight = torch.rand(s, generator=gen) + 0.1
    weight[1::5] = 0.0  # padding steps
    return dict(
        logp=logp,
        old=logp + 0.4 * torch.randn(a, generator=gen),
        ref=logp + 0.4 * torch.randn(a, generator=gen),
        adv=torch.randn(s, generator=gen),
        weight=weight,
        cu_steps=cu_steps,
        cu_trajs=cu_trajs,
    )


@pytest.mark.parametrize("layout", ["short", "long"])
def test_step_policy_loss_with_gpu_configs(gpu, layout):
    """Every ratio level, KL k3, dual clip, zero-weight steps; trajectory ratios and traj-mean
    also run the trajectory pass; the finishing kernel runs every time."""
    lengths = [max(n, 1) for n in _layouts()[layout]]  # every step has an action token
    b = _loss_batch(lengths, num_trajs=5, seed=3)
    for num_sms in (FEW_SMS, MANY_SMS):
        gpu(num_sms)
        for ratio_level, agg in (("token", "token-mean"), ("step", "step-mean"),
                                 ("trajectory", "traj-mean"), ("step", "traj-mean")):  # fmt: skip
            stats = compare_loss(
                b,
                torch.float32,
                ratio_level=ratio_level,
                agg=agg,
                step_weight=b["weight"],
                **CLIPS_AND_KL,
                kl_type="k3",
                length_power=0.5 if ratio_level != "token" else 1.0,
            )
            assert math.isfinite(stats["ratio_mean"])
    assert len(gpu.used["step_loss"]) == 2  # both grid tiers
    assert len(gpu.used["step_loss_traj"]) == 2
    assert_covered(gpu.used, "finish")


def test_step_loss_gpu_configs_all_covered(gpu):
    """The two layouts reach all four step-loss tiles (forward only: cheap)."""
    for lengths in _layouts().values():
        b = _loss_batch([max(n, 1) for n in lengths], num_trajs=3, seed=4)
        for num_sms in (FEW_SMS, MANY_SMS):
            gpu(num_sms)
            got, _ = sf.step_policy_loss(
                b["logp"], b["old"], b["adv"], b["cu_steps"], impl="triton"
            )
            want, _ = sf.step_policy_loss(
                b["logp"], b["old"], b["adv"], b["cu_steps"], impl="torch"
            )
            assert_close_pair(got, want, int(b["cu_steps"][-1]) + 8)  # sums over the tokens
    assert_covered(gpu.used, "step_loss")


@pytest.mark.parametrize("ratio_level, agg", [("trajectory", "traj-mean"), ("token", "traj-mean")])
def test_step_loss_trajectory_pass_gpu_configs_all_covered(gpu, ratio_level, agg):
    """Few steps per trajectory (mean 2: BLOCK_K = 8, one trajectory of 11 steps, empty ones)
    and many (mean 20: BLOCK_K = 32, one trajectory of 35 steps), both grid tiers: all four
    trajectory-pass tiles, each with a trajectory longer than its BLOCK_K, forward and
    backward against the reference."""
    for traj_lengths in ([0, 1, 11, 2, 3, 1, 1, 2, 1, 1, 1, 0], [35, 5]):
        b = _loss_batch([1 + i % 3 for i in range(sum(traj_lengths))], 2, seed=len(traj_lengths))
        b["cu_trajs"] = offsets(traj_lengths)
        for num_sms in (FEW_SMS, MANY_SMS):
            gpu(num_sms)
            compare_loss(
                b,
                torch.float32,
                ratio_level=ratio_level,
                agg=agg,
                step_weight=b["weight"],
                **CLIPS_AND_KL,
                length_power=0.5,
            )
    assert_covered(gpu.used, "step_loss_traj")
