"""Definitions every layer shares: the loss's choices and clamps, its options object, the stats
container and the logits-chunk rule. A leaf module (torch and the standard library only):
the reference, every backend (``steppo_fast.kernels``, ``steppo_fast.cpp``) and the public ops
import these names from here, so no backend needs the reference to speak the op contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---- step_policy_loss: choices, clamps, stats (docs/design.md §4) ----------------------------

RATIO_LEVELS = ("step", "token", "trajectory")
AGGS = ("step-mean", "token-mean", "traj-mean")
KL_KINDS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # rho = exp(clamp(l, -20, 20)): finite for any finite log-ratio
K3_CLAMP = 10.0  # k3 is clamped to [-10, 10] (verl's low_var_kl)
STAT_KEYS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")


@dataclass(frozen=True)
class StepLossOptions:
    """The scalar options of ``step_policy_loss``, as every backend receives them.

    Same names, defaults and meanings as the keywords of :func:`steppo_fast.step_policy_loss`
    (which validates them and builds this object; users keep calling it with keywords):
    ``ratio_level`` in RATIO_LEVELS, ``length_power`` >= 0, ``clip_low`` in [0, 1),
    ``clip_high`` >= 0, ``dual_clip`` None or > 1, ``agg`` in AGGS, ``kl_coef`` finite,
    ``kl_type`` in KL_KINDS, ``normalizer`` None or a finite number > 0. A backend's loss
    function is ``step_policy_loss(logp, old_logp, advantages, cu_steps, cu_trajs,
    step_weight, ref_logp, options) -> (loss, PackedStats)``.
    """

    ratio_level: str = "step"
    length_power: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "step-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    normalizer: float | None = None

    def scalars(self) -> tuple:
        """The options but ``normalizer`` as plain Python scalars, in the order of the
        registered loss ops' schemas (C++ ``steppo_fast::step_policy_loss`` and Triton
        ``steppo_fast_triton::step_policy_loss``): ratio_level, length_power, clip_low,
        clip_high, dual_clip, agg, kl_coef, kl_type."""
        dual = None if self.dual_clip is None else float(self.dual_clip)
        return (
            self.ratio_level,
            float(self.length_power),
            float(self.clip_low),
            float(self.clip_high),
            dual,
            self.agg,
            float(self.kl_coef),
            self.kl_type,
        )


class PackedStats(dict):
    """The stats a backend's ``step_policy_loss`` returns: a dict ``STAT_KEYS`` -> detached 0-d
    tensors that are views of one [6] tensor, kept as ``packed`` (in ``STAT_KEYS`` order), so
    the public wrapper reads them without a stacking launch."""

    def __init__(self, packed: torch.Tensor):
        super().__init__(zip(STAT_KEYS, packed.unbind()))
        self.packed = packed


# ---- linear_logprobs: rows per logits chunk ---------------------------------------------------

# Byte budget of the [rows, V] logits buffer when ``chunk_size`` is None (128 rows at
# V = 151936, fp32). Measured on a 2-core AVX-512 EPYC at V = 151936, H = 512, M = 1024..2048
# (bench/NOTES_logprobs.md): fwd+bwd time is flat within the (shared-machine) noise from 128 to
# 512 rows, while 64 rows is clearly slower, so the smallest budget giving 128 rows wins.
WORKSPACE_BUDGET_BYTES = 80 << 20
# Row granularity of a chunk (GEMM-friendly multiple) and the smallest default chunk.
CHUNK_ROW_MULTIPLE = 64


def default_chunk_rows(num_rows: int, vocab: int, itemsize: int = 4) -> int:
    """Rows per chunk: as many as fit ``WORKSPACE_BUDGET_BYTES`` in a [rows, vocab] buffer of
    ``itemsize`` bytes, rounded down to a multiple of 64 when that many fit (GEMM-friendly),
    at least 1, and never more than ``num_rows``."""
    rows = WORKSPACE_BUDGET_BYTES // max(1, vocab * itemsize)
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, num_rows))
