"""The step-level batch: rollout records -> :class:`StepBatch` (CSR layout) -> micro-batches.

One job per module (data flows down the list):

- :mod:`~steppo_fast.batch.fields`: the one table of StepBatch's fields (dtype, length,
  optional?, meaning, rules); it drives the checks and the field lists in the docs.
- :mod:`~steppo_fast.batch.records`: read and check rollout records (the layout decision).
- :mod:`~steppo_fast.batch.packing` (+ :mod:`~steppo_fast.batch.packing_numba`): the CSR offsets
  and index arrays from the records.
- :mod:`~steppo_fast.batch.step_batch`: :class:`StepBatch`, the frozen dataclass and its
  derived index maps.
- :mod:`~steppo_fast.batch.checks`: :meth:`StepBatch.validate`'s invariants.
- :mod:`~steppo_fast.batch.microbatch`: :class:`MicroBatch` and splitting by whole
  trajectories under a token budget.

This package is a low layer: the ops, the trainer and the integrations import it; it imports
only :mod:`steppo_fast._validate` (checked by scripts/import_graph.py).
"""

from .fields import FIELDS, Field
from .microbatch import MicroBatch
from .step_batch import StepBatch, position_ids

__all__ = ["FIELDS", "Field", "MicroBatch", "StepBatch", "position_ids"]
