"""verl's padded row layout -> steppo_fast's CSR layout (pure torch; never imports verl).

verl hands a policy loss or an advantage estimator padded ``[R, L]`` response tensors (R rows,
L = response length) and a ``response_mask`` [R, L] that is 1 on the policy's own tokens and 0 on
everything else (padding, and in verl's multi-turn ``ToolAgentLoop`` rows the tool / user
observation tokens between two assistant turns). A **step** is one maximal run of 1s in a row:

- rows layout (StepPO reference, verl-agent): one step per row (the row's response);
- multi-turn rows (``ToolAgentLoop``): one row per trajectory, one step per assistant turn.

Both are the same rule, so nothing here needs to know which layout it is given. Two assistant
turns with no masked token between them are one step (nothing marks the boundary).

Action tokens are flattened row-major, i.e. ordered by (row, step, position), which is
docs/design.md §2's action axis when a row (or a ``traj_uid`` group of rows) is a trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_tensor

VERL_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


@dataclass(frozen=True)
class RowSteps:
    """Steps of a padded ``[R, L]`` response batch in CSR form (all int64 unless noted).

    token_index:  [A] flat index (``row * L + position``) of every action token, row-major.
    cu_steps:     [S+1] int32 offsets of the steps on the action axis (n_s >= 1 tokens each).
    step_row:     [S] row of each step.
    step_start:   [S] position (column) of each step's first action token; verl's
                  ``values[row, step_start]`` is the critic's value at the token before it.
    cu_row_steps: [R+1] offsets of each row's steps on the step axis (0 steps for an all-0 row).
    row_tokens:   [R] action tokens per row.
    response_length: L.
    """

    token_index: torch.Tensor
    cu_steps: torch.Tensor
    step_row: torch.Tensor
    step_start: torch.Tensor
    cu_row_steps: torch.Tensor
    row_tokens: torch.Tensor
    response_length: int

    @property
    def num_steps(self) -> int:
        return self.step_row.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Action-token entries [A] of a padded [R, L] tensor (differentiable gather)."""
        return x.reshape(-1)[self.token_index]


def _run_starts(mask: torch.Tensor) -> torch.Tensor:
    """[R, L] bool: True where a run of 1s begins (mask[t] and not mask[t-1])."""
    before = torch.zeros_like(mask)
    before[:, 1:] = mask[:, :-1]
    return mask & ~before


def binary_mask(response_mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """``response_mask`` as bool, after checking it is [R, L] with every entry 0 or 1."""
    check_tensor(name, response_mask, ndim=2)
    if response_mask.dtype == torch.bool:
        return response_mask
    bad = ((response_mask != 0) & (response_mask != 1)).nonzero()
    if bad.numel():
        r, t = (int(v) for v in bad[0])
        raise ValueError(
            f"{name}: {name}[{r}, {t}] = {float(response_mask[r, t])}; entries must be 0 or 1"
        )
    return response_mask != 0


def steps_from_response_mask(response_mask: torch.Tensor) -> RowSteps:
    """Split every row of ``response_mask`` [R, L] into steps (maximal runs of 1s).

    O(R * L), vectorised (no Python loop over rows or steps), one host sync for the counts.
    """
    mask = binary_mask(response_mask)
    num_rows, length = mask.shape
    device = mask.device
    starts = _run_starts(mask)
    flat_mask, flat_starts = mask.reshape(-1), starts.reshape(-1)
    token_index = flat_mask.nonzero().squeeze(1)
    start_index = flat_starts.nonzero().squeeze(1)  # flat position of each step's first token
    # step of every action token: running count of run starts, minus one
    token_step = flat_starts.long().cumsum(0)[token_index] - 1
    step_lengths = torch.bincount(token_step, minlength=start_index.shape[0])
    cu_steps = torch.zeros(start_index.shape[0] + 1, dtype=torch.long, device=device)
    cu_steps[1:] = step_lengths.cumsum(0)
    step_row = torch.div(start_index, max(length, 1), rounding_mode="floor")
    row_steps = torch.bincount(step_row, minlength=num_rows)
    cu_row_steps = torch.zeros(num_rows + 1, dtype=torch.long, device=device)
    cu_row_steps[1:] = row_steps.cumsum(0)
    return RowSteps(
        token_index=token_index,
        cu_steps=cu_steps.to(torch.int32),
        step_row=step_row,
        step_start=start_index - step_row * length,
        cu_row_steps=cu_row_steps,
        row_tokens=mask.sum(dim=1),
        response_length=length,
    )


def _positive_count(name: str, value) -> float | None:
    """A global count from verl's ``global_batch_info`` (int, float or 0-d tensor) or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    if not value >= 0:
        raise ValueError(f"global_batch_info[{name!r}]: must be >= 0, got {value}")
    return value


def verl_loss_aggregation(
    loss_agg_mode: str,
    steps: RowSteps,
    *,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> tuple[str, torch.Tensor | None, float | None]:
    """``(agg, step_weight, normalizer)`` for ``step_policy_loss`` reproducing verl's ``agg_loss``.

    verl aggregates a per-token loss matrix; the StepPO loss matrix holds the step loss L_s on
    every token of step s. With n_s tokens in step s, N_r action tokens in row r, D = dp_size,
    T = batch_num_tokens, G = global_batch_size (verl's global mini-batch counts; without them
    the local counts: all action tokens, rows with >= 1 action token), verl's modes are exactly:

    - token-mean:              sum_s n_s L_s / T * D            -> agg token-mean, norm T / D
    - token-sum:               sum_s n_s L_s * D                -> agg token-mean, norm 1 / D
    - seq-mean-token-mean:     sum_r (sum_{s in r} n_s L_s / N_r) / G * D
                               -> agg step-mean, step_weight n_s / N_r, norm G / D
    - seq-mean-token-sum:      sum_s n_s L_s / G * D            -> agg token-mean, norm G / D
    - seq-mean-token-sum-norm: the same divided by loss_scale_factor (default L)

    With one step per row, seq-mean-token-mean is StepPO's step-mean (every step weighs 1 / G).
    A normalizer of 0 is only valid for a batch without action tokens (loss 0): then None.
    """
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        choices = ", ".join(map(repr, VERL_LOSS_AGG_MODES))
        raise ValueError(f"loss_agg_mode: {loss_agg_mode!r} is not one of {choices}")
    if isinstance(dp_size, torch.Tensor):
        dp_size = dp_size.item()
    if isinstance(dp_size, bool) or int(dp_size) != dp_size or dp_size < 1:
        raise ValueError(f"global_batch_info['dp_size']: must be an integer >= 1, got {dp_size!r}")
    tokens = _positive_count("batch_num_tokens", batch_num_tokens)
    rows = _positive_count("global_batch_size", global_batch_size)
    if loss_agg_mode.startswith("seq-mean"):
        if rows is None:
            if dp_size > 1:
                raise ValueError(
                    "global_batch_info['global_batch_size']: required when dp_size > 1"
                )
            rows = float((steps.row_tokens > 0).sum())
        denominator, count_name = rows, "global_batch_size"
    elif loss_agg_mode == "token-mean":
        if tokens is None:
            if dp_size > 1:
                raise ValueError("global_batch_info['batch_num_tokens']: required when dp_size > 1")
            tokens = float(steps.num_tokens)
        denominator, count_name = tokens, "batch_num_tokens"
    else:  # token-sum
        denominator, count_name = 1.0, "dp_size"
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = steps.response_length if loss_scale_factor is None else loss_scale_factor
        denominator *= _positive_count("loss_scale_factor", scale)
    step_weight = None
    agg = "token-mean"
    if loss_agg_mode == "seq-mean-token-mean":
        agg = "step-mean"
        lengths = (steps.cu_steps[1:] - steps.cu_steps[:-1]).double()
        step_weight = lengths / steps.row_tokens[steps.step_row].double()
    if denominator == 0:
        if steps.num_tokens:
            raise ValueError(
                f"global_batch_info[{count_name!r}]: the normaliser is 0 but this micro-batch "
                f"has {steps.num_tokens} action tokens"
            )
        return agg, step_weight, None
    return agg, step_weight, denominator / dp_size
