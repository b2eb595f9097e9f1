"""steppo_fast: fast, memory-frugal step-level agentic RL (StepPO).

Public API (see docs/design.md): :class:`StepBatch` and the functional ops below; every op takes
``impl=`` ("auto", "torch", "triton", "cpp").
"""

from .batch import MicroBatch, StepBatch
from .ops.advantages import (
    discounted_returns,
    gigpo_advantages,
    group_advantages,
    step_gae,
    whiten,
)
from .ops.logprobs import linear_logprobs
from .ops.loss import kl_penalty, step_policy_loss, value_loss
from .ops.segments import segment_broadcast, segment_mean, segment_sum

__version__ = "0.1.0"

__all__ = [
    "MicroBatch",
    "StepBatch",
    "discounted_returns",
    "gigpo_advantages",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "segment_broadcast",
    "segment_mean",
    "segment_sum",
    "step_gae",
    "step_policy_loss",
    "value_loss",
    "whiten",
]
