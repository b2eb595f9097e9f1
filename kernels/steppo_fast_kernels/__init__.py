"""Triton backend of steppo_fast (installed as ``steppo_fast.kernels``).

Exposes functions named like the public ops, with the public signatures minus ``impl`` (the
loss: its tensors and one ``StepLossOptions``; the backend contract of
:mod:`steppo_fast._dispatch`); they take already-validated inputs and never import the reference.
One folder per op family (``segment``, ``scan``, ``logprobs``, ``step_loss``), one rule in
each: the ``@triton.jit`` code lives in ``kernel*.py`` files (kernels, jit helpers and their
constexpr constants; no torch import, no launch), and ``ops.py`` holds the host side: the
launchers, the ``torch.library`` ops registered in the namespace ``steppo_fast_triton`` with
their fakes and autograd, and the backend functions re-exported here. The step loss has three
kernel files (token kernels, per-trajectory pass, finishing reduction), the others one. A family
imports only its own files and the shared ``_common`` (CSR segment lookup, small host helpers)
and ``_configs`` (launch configurations). On disk this package is
``kernels/steppo_fast_kernels/``, mapped by setup.py to ``steppo_fast.kernels``: the top-level
``kernels/`` folder has no ``__init__.py``, so from the repository root ``import kernels`` never
finds this code (that name belongs to Hugging Face's ``kernels`` package, which transformers
imports). Every launcher takes its tile sizes, ``num_warps`` and
``num_stages`` from ``_configs`` (small tiles on CPU for the interpreter, a static GPU table on
CUDA chosen from the shapes; see bench/ROOFLINE.md, "Launch configurations"). Layers: kernel ->
launcher -> registered op (``torch.library.custom_op`` + ``register_fake`` +
``register_autograd``) -> backend function.

Triton is imported when this package is imported (the kernels are ``@triton.jit`` functions);
without triton the import fails with ImportError, which the dispatcher reports as "triton is not
installed". On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). The kernels compute in fp32: fp64
calls are routed to the torch reference by a rule of :mod:`steppo_fast._dispatch` (fp64 is the
gradcheck path).

Ops without a kernel here (whiten, group_advantages, gigpo_advantages, value_loss,
kl_penalty) are absent on purpose: ``impl="auto"`` then uses the reference (see
bench/ROOFLINE.md for why torch ops are at the floor for them).
"""

from .logprobs.ops import linear_logprobs
from .scan.ops import discounted_returns, step_gae
from .segment.ops import segment_broadcast, segment_mean, segment_sum
from .step_loss.ops import step_policy_loss

__all__ = [
    "discounted_returns",
    "linear_logprobs",
    "segment_broadcast",
    "segment_mean",
    "segment_sum",
    "step_gae",
    "step_policy_loss",
]
