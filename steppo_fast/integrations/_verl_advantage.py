"""StepPO's step advantage on verl's padded rows (pure torch + numpy; never imports verl).

Inputs are verl's ``[R, L]`` response tensors: ``token_level_rewards``, the critic's ``values``
(``values[r, t]`` is read at the token before response token t, so ``values[r, step_start]`` is
V(s) at the state right before step s acts) and ``response_mask`` (steps = runs of 1s, see
:mod:`._verl_rows`).

Trajectories: without ids every row is one trajectory (its steps in position order): verl's
multi-turn ``ToolAgentLoop`` rows, or single-step rows. With ``traj_uid`` (one id per row, as
verl-agent puts in ``non_tensor_batch["traj_uid"]``) the rows sharing an id form one trajectory,
ordered by ``step_idx`` (an integer per row; batch order when absent): StepPO's rows layout.

Per step: reward r_s = sum of ``token_level_rewards`` from the step's first action token up to
the next step's first token of the row (or the row's end), so rewards on observation or padding
tokens go to the step they follow; a nonzero reward before a row's first step is an error.
Then (docs/design.md §1) step GAE per trajectory with V_T = 0 (terminated, like verl's GAE),
whitening over steps, and broadcast of A_s and R_s to the step's action tokens (0 elsewhere).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops.advantages import step_gae
from ..ops.advantages import whiten as whiten_steps
from ._verl_rows import _run_starts, binary_mask, steps_from_response_mask


def _as_list(name: str, ids, num_rows: int) -> list:
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if len(ids) != num_rows:
        raise ValueError(f"{name}: length {len(ids)} != number of rows {num_rows}")
    return ids


def _integer(i: int, value) -> int:
    try:
        ok = not isinstance(value, (bool, np.bool_)) and int(value) == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"step_idx: step_idx[{i}] = {value!r} is not an integer")
    return int(value)


def trajectory_row_order(num_rows: int, traj_uid=None, step_idx=None):
    """``(perm, cu_traj_rows)``: rows reordered so each trajectory's rows are contiguous and in
    step order; trajectory b = permuted rows ``[cu_traj_rows[b], cu_traj_rows[b+1])``.

    Trajectories keep the order of their first row in the batch. Without ``traj_uid`` every
    row is its own trajectory (identity order). Raises ``ValueError`` on a repeated
    (traj_uid, step_idx) pair or a non-integer ``step_idx``.
    """
    if traj_uid is None:
        if step_idx is not None:
            raise ValueError("step_idx: given without traj_uid (a step index needs trajectories)")
        return torch.arange(num_rows), torch.arange(num_rows + 1)
    uids = _as_list("traj_uid", traj_uid, num_rows)
    code_of: dict = {}
    codes = np.fromiter((code_of.setdefault(u, len(code_of)) for u in uids), np.int64, num_rows)
    if step_idx is None:
        steps = np.arange(num_rows, dtype=np.int64)
    else:
        raw = _as_list("step_idx", step_idx, num_rows)
        steps = np.fromiter((_integer(i, s) for i, s in enumerate(raw)), np.int64, num_rows)
    perm = np.lexsort((steps, codes))  # by trajectory (first appearance), then step
    same = (codes[perm][1:] == codes[perm][:-1]) & (steps[perm][1:] == steps[perm][:-1])
    if same.any():
        i = int(perm[int(np.argmax(same)) + 1])
        raise ValueError(
            f"step_idx: rows of traj_uid {uids[i]!r} repeat step_idx {int(steps[i])} "
            f"(row {i}); every (traj_uid, step_idx) pair must be unique"
        )
    cu = np.zeros(len(code_of) + 1, dtype=np.int64)
    cu[1:] = np.cumsum(np.bincount(codes, minlength=len(code_of)))
    return torch.from_numpy(perm.astype(np.int64)), torch.from_numpy(cu)


def step_rewards(token_level_rewards: torch.Tensor, mask: torch.Tensor, steps) -> torch.Tensor:
    """[S] reward of each step (see the module docstring), fp32 (fp64 for fp64 rewards)."""
    dtype = torch.float64 if token_level_rewards.dtype == torch.float64 else torch.float32
    rewards = token_level_rewards.to(dtype)
    step_in_row = _run_starts(mask).long().cumsum(dim=1) - 1  # -1 before the row's first step
    before = step_in_row < 0
    stray = (before & (rewards != 0)).nonzero()
    if stray.numel():
        r, t = (int(v) for v in stray[0])
        raise ValueError(
            f"token_level_rewards: [{r}, {t}] = {float(rewards[r, t])} lies before the first "
            "action token of its row (response_mask is 0 up to there); it belongs to no step"
        )
    step_of_pos = steps.cu_row_steps[:-1, None] + step_in_row
    out = torch.zeros(steps.num_steps, dtype=dtype, device=rewards.device)
    return out.index_add(0, step_of_pos[~before], rewards[~before])


def step_advantages(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    traj_uid=None,
    step_idx=None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """StepPO step advantages and returns on verl rows, each ``[R, L]`` (0 off action tokens).

    Args:
        token_level_rewards: [R, L] float.
        values: [R, L] float critic values (verl layout) or None for V = 0 (then the
            advantage is the discounted step return-to-go; lam has no effect).
        response_mask: [R, L] 0/1 (bool, int or float).
        traj_uid, step_idx: optional per-row trajectory ids and step indices (sequences or
            arrays of length R; see the module docstring).
        gamma, lam: step-level discount and GAE lambda in [0, 1].
        whiten: whiten the step advantages over all steps of the batch (docs/design.md §1).
        impl: steppo_fast backend for step_gae / whiten.

    Returns:
        ``(advantages, returns)`` [R, L] fp32 (fp64 for fp64 ``token_level_rewards``), no
        autograd graph.
        ``returns`` are R_s = A_s + V_s before whitening.
    """
    mask = binary_mask(response_mask)
    num_rows, length = mask.shape
    for name, t in (("token_level_rewards", token_level_rewards), ("values", values)):
        if t is not None and tuple(t.shape) != (num_rows, length):
            raise ValueError(
                f"{name}: shape {tuple(t.shape)} != response_mask {(num_rows, length)}"
            )
    perm, cu_traj_rows = trajectory_row_order(num_rows, traj_uid, step_idx)
    perm = perm.to(mask.device)
    mask_p = mask[perm]
    steps = steps_from_response_mask(mask_p)
    rewards = step_rewards(token_level_rewards[perm], mask_p, steps)
    if values is None:
        step_values = torch.zeros_like(rewards)
    else:
        step_values = values[perm][steps.step_row, steps.step_start].to(rewards.dtype)
    cu_trajs = steps.cu_row_steps[cu_traj_rows.to(mask.device)]
    with torch.no_grad():
        adv, ret = step_gae(rewards, step_values, cu_trajs, gamma=gamma, lam=lam, impl=impl)
        if whiten:
            adv = whiten_steps(adv, impl=impl)
    token_step = torch.repeat_interleave(
        torch.arange(steps.num_steps, device=mask.device),
        (steps.cu_steps[1:] - steps.cu_steps[:-1]).long(),
        output_size=steps.num_tokens,
    )
    out_adv = torch.zeros(num_rows * length, dtype=adv.dtype, device=mask.device)
    out_ret = torch.zeros(num_rows * length, dtype=ret.dtype, device=mask.device)
    out_adv[steps.token_index] = adv[token_step]
    out_ret[steps.token_index] = ret[token_step]
    advantages = torch.empty_like(out_adv).view(num_rows, length)
    returns = torch.empty_like(out_ret).view(num_rows, length)
    advantages[perm] = out_adv.view(num_rows, length)
    returns[perm] = out_ret.view(num_rows, length)
    return advantages, returns
