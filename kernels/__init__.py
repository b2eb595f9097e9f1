"""Triton backend of steppo_fast (installed as ``steppo_fast.kernels``).

Exposes functions named like the public ops, with the reference signatures minus ``impl``
(the backend contract of :mod:`steppo_fast._dispatch`); they take already-validated inputs.
Each op family is one kernel module (``segment``, ``scan``, ``step_loss``,
``logprobs``) plus one module registering its ``torch.library`` ops in the namespace
``steppo_fast_triton`` and holding the backend functions (``*_ops``); the step loss keeps its
launchers apart (``step_loss_launch``) and has two more kernels: the per-trajectory pass for
trajectory ratios and traj-mean (``step_loss_traj``) and the finishing reduction of loss and
stats (``step_loss_finish``). Every launcher takes its tile sizes, ``num_warps`` and
``num_stages`` from ``_configs`` (small tiles on CPU for the interpreter, a static GPU table on
CUDA chosen from the shapes; see bench/ROOFLINE.md, "Launch configurations"). Layers: kernel ->
launcher -> registered op (``torch.library.custom_op`` + ``register_fake`` +
``register_autograd``) -> backend function.

Triton is imported when this package is imported (the kernels are ``@triton.jit`` functions);
without triton the import fails with ImportError, which the dispatcher reports as "triton is not
installed". On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). fp64 inputs are handed to the
torch reference (Triton fp64 is not the point: fp64 is the gradcheck path).

Ops without a kernel here (whiten, group_advantages, gigpo_advantages, value_loss,
kl_penalty) are absent on purpose: ``impl="auto"`` then uses the reference (see
bench/ROOFLINE.md for why torch ops are at the floor for them).
"""

from .logprobs_ops import linear_logprobs
from .scan_ops import discounted_returns, step_gae
from .segment_ops import segment_broadcast, segment_mean, segment_sum
from .step_loss_ops import step_policy_loss

__all__ = [
    "discounted_returns",
    "linear_logprobs",
    "segment_broadcast",
    "segment_mean",
    "segment_sum",
    "step_gae",
    "step_policy_loss",
]
