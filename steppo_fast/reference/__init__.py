"""Pure-PyTorch reference of every op: the definition the kernels are tested against, and the
``impl="torch"`` backend. Functions take validated inputs (the public wrappers in
:mod:`steppo_fast.ops` validate) and share the public signatures minus ``impl``."""

from .advantages import discounted_returns, gigpo_advantages, group_advantages, step_gae, whiten
from .logprobs import linear_logprobs
from .loss import kl_penalty, step_policy_loss, value_loss
from .segments import segment_broadcast, segment_mean, segment_sum

__all__ = [
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
