"""Every ValueError path of the loss family: the message names the argument (and index)."""

import pytest
import torch
from _impls import impl_or_skip, impls_for

from steppo_fast import kl_penalty, step_policy_loss, value_loss
from steppo_fast.ops.loss import loss_normalizer


def base():
    # 3 steps of (2, 1, 2) tokens in trajectories (steps 0-1 | step 2)
    return dict(
        logp=torch.randn(5),
        old_logp=torch.randn(5),
        advantages=torch.randn(3),
        cu_steps=torch.tensor([0, 2, 3, 5], dtype=torch.int32),
        cu_trajs=torch.tensor([0, 2, 3], dtype=torch.int32),
    )


POLICY_CASES = [
    (dict(logp=torch.randn(5, 1)), "logp: expected 1-D"),
    (dict(logp=torch.arange(5)), "logp: dtype int64"),
    (dict(old_logp=torch.randn(4)), "old_logp: length 4 != expected 5"),
    (
        dict(advantages=torch.randn(4)),
        "cu_steps: 3 steps (len(cu_steps) - 1) != len(advantages) = 4",
    ),
    (dict(advantages=torch.randn(3, 1)), "advantages: expected 1-D"),
    (dict(cu_steps=torch.tensor([0, 2, 3, 4])), "cu_steps: offsets must end at the axis length 5"),
    (dict(cu_steps=torch.tensor([0, 3, 2, 5])), "cu_steps: offsets must be non-decreasing"),
    (dict(cu_steps=torch.tensor([0, 2, 2, 5])), "cu_steps: segment 1 is empty"),
    (dict(cu_steps=torch.tensor([0.0, 2.0, 3.0, 5.0])), "cu_steps: dtype float32"),
    (dict(cu_trajs=torch.tensor([0, 2])), "cu_trajs: offsets must end at the axis length 3"),
    (
        dict(cu_trajs=None, ratio_level="trajectory"),
        "cu_trajs: required for ratio_level='trajectory'",
    ),
    (dict(cu_trajs=None, agg="traj-mean"), "cu_trajs: required for agg='traj-mean'"),
    (dict(ratio_level="sequence"), "ratio_level: 'sequence' is not one of"),
    (dict(agg="seq-mean-token-mean"), "agg: 'seq-mean-token-mean' is not one of"),
    (dict(kl_type="low_var_kl"), "kl_type: 'low_var_kl' is not one of"),
    (dict(length_power=-0.5), "length_power: must be >= 0"),
    (dict(clip_low=1.0), "clip_low: must be in [0, 1)"),
    (dict(clip_low=-0.1), "clip_low: must be in [0, 1)"),
    (dict(clip_high=-0.1), "clip_high: must be >= 0"),
    (dict(clip_high=float("nan")), "clip_high: must be >= 0"),
    (dict(clip_high="0.2"), "clip_high: expected a real number"),
    (dict(dual_clip=1.0), "dual_clip: must be > 1"),
    (dict(dual_clip=0.5), "dual_clip: must be > 1"),
    (dict(step_weight=torch.tensor([1.0, -1.0, 1.0])), "step_weight: step_weight[1] = -1.0"),
    (dict(step_weight=torch.tensor([1.0, 1.0, float("nan")])), "step_weight: step_weight[2] = nan"),
    (dict(step_weight=torch.tensor([1.0, 1.0])), "step_weight: length 2 != expected 3"),
    (dict(step_weight=torch.tensor([1, 1, 1])), "step_weight: dtype int64"),
    (dict(kl_coef=0.1), "ref_logp: required when kl_coef != 0"),
    (dict(kl_coef=float("inf"), ref_logp=torch.randn(5)), "kl_coef: must be a finite number"),
    (dict(ref_logp=torch.randn(6)), "ref_logp: length 6 != expected 5"),
    (dict(normalizer=0.0), "normalizer: must be > 0"),
    (dict(normalizer=-2.0), "normalizer: must be > 0"),
    (dict(normalizer=True), "normalizer: expected a real number"),
    (dict(impl="cuda"), "impl: 'cuda' is not one of"),
    (dict(stats="numpy"), "stats: 'numpy' is not one of 'float', 'tensor'"),
]


@pytest.mark.parametrize("override, needle", POLICY_CASES)
@pytest.mark.parametrize("impl", impls_for("step_policy_loss"))
def test_step_policy_loss_errors(impl, override, needle):
    # every backend: the checks run before the backend is chosen (an impl in ``override`` wins)
    impl = impl_or_skip("step_policy_loss", impl)
    with pytest.raises(ValueError) as err:
        step_policy_loss(**{**base(), "impl": impl, **override})
    assert needle in str(err.value)


def test_valid_base_and_tensor_normalizer_pass():
    loss, _ = step_policy_loss(**base(), normalizer=torch.tensor(4.0), impl="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "override, needle",
    [
        (dict(old_values=torch.randn(3)), "old_values: length 3 != expected 4"),
        (dict(returns=torch.randn(5)), "returns: length 5 != expected 4"),
        (dict(values=torch.ones(4, dtype=torch.int32)), "values: dtype int32"),
        (dict(clip=-0.1), "clip: must be >= 0"),
        (dict(weight=torch.tensor([1.0, 0.0, -1.0, 1.0])), "weight: weight[2] = -1.0"),
        (dict(weight=torch.ones(3)), "weight: length 3 != expected 4"),
        (dict(normalizer=0), "normalizer: must be > 0"),
    ],
)
def test_value_loss_errors(override, needle):
    args = dict(values=torch.randn(4), old_values=torch.randn(4), returns=torch.randn(4))
    with pytest.raises(ValueError) as err:
        value_loss(**{**args, **override})
    assert needle in str(err.value)


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match=r"ref_logp: length 3 != expected 4"):
        kl_penalty(torch.randn(4), torch.randn(3))
    with pytest.raises(ValueError, match=r"kind: 'k4' is not one of"):
        kl_penalty(torch.randn(4), torch.randn(4), "k4")
    with pytest.raises(ValueError, match=r"logp: expected a torch.Tensor"):
        kl_penalty([0.0], torch.randn(1))


def test_loss_normalizer_errors():
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_trajs: required for agg='traj-mean'"):
        loss_normalizer(cu, agg="traj-mean")
    with pytest.raises(ValueError, match=r"step_weight: step_weight\[0\] = -1.0"):
        loss_normalizer(cu, step_weight=torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"agg: 'mean' is not one of"):
        loss_normalizer(cu, agg="mean")
    assert loss_normalizer(cu, agg="token-mean") == 3.0
    assert loss_normalizer(cu, ratio_level="token", agg="step-mean") == 2.0
