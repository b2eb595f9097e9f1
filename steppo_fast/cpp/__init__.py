"""The ``impl="cpp"`` backend: CPU tensors, C++ kernels and a tuned CPU ``linear_logprobs``.

- :mod:`._registry`: the C++ kernels live in ``csrc/`` and are built by ``setup.py`` into
  ``steppo_fast._C`` (importing it registers ``torch.ops.steppo_fast.*``); this registers a
  fake (meta) kernel per op, so they trace under ``torch.compile``, and the autograd formulas;
- :mod:`.ops`: the backend functions over those ops (inputs already validated by
  :mod:`steppo_fast.ops`);
- :mod:`.logprobs`: ``linear_logprobs`` in torch ops tuned for CPUs (oneDNN products, in-place
  row kernels, preallocated gradient buffers; no C++ of its own);
- :mod:`.threads`: the thread-count knob of the C++ kernels (public, re-exported here).

Differentiable: ``discounted_returns`` (rewards, last_values), ``segment_sum``,
``segment_mean``, ``segment_broadcast``, ``whiten`` (x), ``group_advantages`` (scores),
``linear_logprobs`` (hidden, weight, bias), ``step_policy_loss`` (logp only: when another input
requires grad, :mod:`steppo_fast._dispatch` routes the call to the reference). ``step_gae`` has
no gradient (as the reference). Not implemented here (``impl="auto"`` uses the reference):
``gigpo_advantages``, ``kl_penalty``, ``value_loss``.

Threads: the kernels follow ``torch.get_num_threads()`` unless :func:`set_num_threads` (or the
:func:`num_threads` context manager) says otherwise, and use more than one thread only on
inputs large enough to gain from it. On a machine whose cores are busy with other work, use
``set_num_threads(1)``: a parallel region waits for every thread to be scheduled.
"""

from .logprobs import linear_logprobs
from .ops import (
    discounted_returns,
    group_advantages,
    segment_broadcast,
    segment_mean,
    segment_sum,
    step_gae,
    step_policy_loss,
    whiten,
)
from .threads import get_num_threads, num_threads, set_num_threads, thread_setting

__all__ = [
    "discounted_returns",
    "get_num_threads",
    "group_advantages",
    "linear_logprobs",
    "num_threads",
    "segment_broadcast",
    "segment_mean",
    "segment_sum",
    "set_num_threads",
    "step_gae",
    "step_policy_loss",
    "thread_setting",
    "whiten",
]
