"""Pure-PyTorch reference of the advantage ops (the spec the kernels are tested against).

Layout: ``S`` steps (or tokens) ordered by (trajectory, time), ``B`` trajectories given by CSR
offsets ``cu_trajs`` [B+1] (trajectory ``b`` = entries ``[cu_trajs[b], cu_trajs[b+1])``).
Empty trajectories (``cu_trajs[b] == cu_trajs[b+1]``) are accepted: they produce no outputs
(and, in the group statistics of :func:`gigpo_advantages`, count as an episode of return 0).

Every function takes inputs already validated by :mod:`steppo_fast.ops.advantages`, computes in
fp32 (fp64 when any float input is fp64) and returns that dtype; the normalisations (``whiten``,
the group statistics of ``group_advantages`` / ``gigpo_advantages``) compute in fp64 and round
once, as the C++ backend does, so extreme values agree across backends.

Segmented reverse scans (GAE, discounted returns) use a log-depth doubling scan over the flat
array: no Python loop over trajectories or positions, ``ceil(log2(T_max))`` vectorised passes,
O(S) memory, and only products of factors in [0, 1] (never ``decay ** -t``), so nothing
overflows for long trajectories.
"""

from __future__ import annotations

import torch

from .._validate import compute_dtype


def _segment_layout(cu: torch.Tensor, n: int):
    """For CSR offsets ``cu`` [B+1] over ``n`` entries return ``(segment_id [n] int64,
    is_last [n] bool, longest)``: each entry's segment, whether it ends its segment, and the
    longest segment length (a Python int)."""
    cu = cu.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    segment_id = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device), lengths, output_size=n
    )
    is_last = torch.zeros(n, dtype=torch.bool, device=cu.device)
    ends = cu[1:][lengths > 0] - 1
    is_last[ends] = True
    if torch.compiler.is_compiling():
        longest = n  # an upper bound: same result, no host read of tensor values
    else:
        longest = int(lengths.max()) if lengths.numel() else 0
    return segment_id, is_last, longest


def _reverse_discounted_sum(x: torch.Tensor, is_last: torch.Tensor, decay: float, longest: int):
    """Segmented reverse scan ``y_t = x_t + decay * y_{t+1}``, with ``y_{t+1} = 0`` after the
    last entry of a segment (``is_last``). Differentiable w.r.t. ``x``.

    Doubling scan: after the pass with span ``s``, ``y_t`` holds the discounted sum of
    ``x[t : t + 2s]`` within t's segment and ``link_t`` the factor ``decay ** (2s)`` (0 once
    the window crosses the segment end). ``ceil(log2(longest))`` passes cover every segment.
    """
    n = x.numel()
    y = x
    # Factor from entry t to entry t+1 (0 across a segment end), in x's dtype (exact in fp64).
    link = torch.full_like(x, decay).masked_fill(is_last, 0.0)
    span = 1
    while span < longest:
        zeros = x.new_zeros(min(span, n))
        y = y + link * torch.cat([y[span:], zeros])
        link = link * torch.cat([link[span:], zeros])
        span *= 2
    return y


def discounted_returns(rewards, cu_trajs, *, gamma=1.0, last_values=None):
    """``G_t = r_t + gamma * G_{t+1}`` per trajectory, ``G_T = last_values[b]`` (0 if None).

    rewards [S], cu_trajs [B+1], last_values [B] or None -> returns [S] (fp32, fp64 for fp64
    inputs). Differentiable w.r.t. ``rewards`` and ``last_values``.
    """
    dtype = compute_dtype(rewards, last_values)
    r = rewards.to(dtype)
    segment_id, is_last, longest = _segment_layout(cu_trajs, r.numel())
    if last_values is not None:
        # Fold the bootstrap into the last reward: r_{T-1} + gamma * last_value.
        bootstrap = last_values.to(dtype)[segment_id]
        r = r + torch.where(is_last, gamma * bootstrap, torch.zeros_like(bootstrap))
    return _reverse_discounted_sum(r, is_last, gamma, longest)


def step_gae(rewards, values, cu_trajs, *, gamma=1.0, lam=1.0, last_values=None):
    """Generalised advantage estimation per trajectory (over steps, or over tokens when given
    token rewards/values and ``cu_steps[cu_trajs]``).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_T = last_values[b]`` (0 if None),
    ``A_t = delta_t + gamma * lam * A_{t+1}`` (``A_T = 0``), ``R_t = A_t + V_t``.

    rewards [S], values [S], cu_trajs [B+1], last_values [B] or None ->
    (advantages [S], returns [S]), raw (not whitened), detached (no autograd graph).
    """
    dtype = compute_dtype(rewards, values, last_values)
    with torch.no_grad():
        r = rewards.to(dtype)
        v = values.to(dtype)
        segment_id, is_last, longest = _segment_layout(cu_trajs, r.numel())
        next_v = torch.cat([v[1:], v.new_zeros(min(1, v.numel()))])
        if last_values is None:
            bootstrap = torch.zeros_like(v)
        else:
            bootstrap = last_values.to(dtype)[segment_id]
        next_v = torch.where(is_last, bootstrap, next_v)
        delta = r + gamma * next_v - v
        advantages = _reverse_discounted_sum(delta, is_last, gamma * lam, longest)
        returns = advantages + v
    return advantages, returns


def _safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient at ``var == 0``."""
    positive = var > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, var, 1.0)), 0.0)


def _stable_scale(std: torch.Tensor, eps: float, enough: torch.Tensor) -> torch.Tensor:
    """The divisor of a normalisation: ``std + eps`` where the statistic exists (``enough``) and
    is positive, else 1 (an undefined or zero scale falls back to the identity, so ``eps = 0``
    on equal entries gives 0, never 0/0 = NaN)."""
    scale = std + eps
    return torch.where(enough & (scale > 0), scale, torch.ones_like(scale))


def whiten(x, weight=None, eps=1e-8):
    """``(x - mean) / (std + eps)``, mean and unbiased std over the entries with ``weight > 0``
    (a mask: every counted entry weighs the same); every entry is transformed.

    x [...] (any shape), weight same shape or None (all counted) -> same shape, fp32 (fp64 for
    fp64 ``x``). Differentiable w.r.t. ``x`` (through the mean and std too).

    Computed in fp64 and rounded once to the output dtype (as the C++ backend does), so values
    up to the fp32 limit (+-3.4e38, whose sum and squares overflow fp32) whiten exactly, and
    the statistics are taken about a pivot (the first counted entry, detached: the result does
    not depend on it) so that equal entries give a mean equal to them, bit for bit.

    Degenerate cases never give NaN; an undefined statistic falls back to the identity:
    no counted entry -> mean 0 and scale 1 (``x`` returned unchanged, as a new tensor);
    one counted entry -> its value is the mean and the scale is 1 (``x - x_counted``, so the
    counted entry becomes 0). A zero std (all counted entries equal) gives ``(x - mean) / eps``
    (0 on the counted entries) with a finite gradient, and ``x - mean`` when ``eps == 0``.
    """
    out_dtype = compute_dtype(x)
    xc = x.to(torch.float64)
    flat = xc.reshape(-1)
    mask = torch.ones_like(xc, dtype=torch.bool) if weight is None else weight > 0
    count = mask.sum().to(torch.float64)
    # pivot: the first counted entry (0 when none is counted, or x is empty)
    if flat.numel():  # index_select, not [first]: a tensor index would not trace
        first = mask.reshape(-1).to(torch.int8).argmax().reshape(1)
        pivot = flat.detach().index_select(0, first)[0]
    else:
        pivot = flat.new_zeros(())
    pivot = torch.where(count > 0, pivot, torch.zeros_like(pivot))
    shifted = xc - pivot
    mean = torch.where(mask, shifted, 0.0).sum() / count.clamp(min=1.0)
    centred = shifted - mean
    var = torch.where(mask, centred, 0.0).square().sum() / (count - 1.0).clamp(min=1.0)
    scale = _stable_scale(_safe_sqrt(var), eps, count >= 2)
    return (centred / scale).to(out_dtype)


def _group_normalise(x: torch.Tensor, ids: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """Normalise ``x`` [n] within the classes of equal ``ids`` ([n] int64).

    mode "std": (x - mean) / (std + eps); "mean": x - mean; "loo": n/(n-1) * (x - mean).
    std is the unbiased std of the class; classes of one give 0; a zero ``std + eps`` (equal
    members, ``eps == 0``) gives the divisor 1, so 0. Computed in fp64 about a per-class pivot
    (the class's first member, detached), rounded once to ``x``'s dtype, as :func:`whiten`:
    exact for values up to the fp32 limit, and equal members give exactly 0. Differentiable
    w.r.t. ``x``.
    """
    out_dtype = x.dtype
    x64 = x.to(torch.float64)
    _, inverse = torch.unique(ids, return_inverse=True)
    n_classes = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(x.numel(), device=x.device)
    first = positions.new_full((n_classes,), x.numel()).scatter_reduce(
        0, inverse, positions, "amin"
    )
    shifted = x64 - x64.detach()[first][inverse]
    zeros = x64.new_zeros(n_classes)
    count = zeros.index_add(0, inverse, torch.ones_like(x64))
    mean = zeros.index_add(0, inverse, shifted) / count.clamp(min=1.0)
    centred = shifted - mean[inverse]
    n = count[inverse]
    if mode == "mean":
        out = centred
    elif mode == "loo":
        out = centred * (n / (n - 1.0).clamp(min=1.0))
    else:
        var = zeros.index_add(0, inverse, centred.square()) / (count - 1.0).clamp(min=1.0)
        out = centred / _stable_scale(_safe_sqrt(var), eps, count >= 2)[inverse]
    return torch.where(n >= 2, out, 0.0).to(out_dtype)


_GROUP_MODES = {"grpo": "std", "dr_grpo": "mean", "rloo": "loo"}
_GIGPO_MODES = {"mean_std_norm": "std", "mean_norm": "mean"}


def group_advantages(scores, group, *, mode="grpo", eps=1e-6):
    """Trajectory-level group-relative advantages (GRPO, Dr.GRPO, RLOO).

    scores [B] float, group [B] int (arbitrary ids) -> [B] fp32 (fp64 for fp64 scores):
    grpo ``(s - mean_g) / (std_g + eps)``; dr_grpo ``s - mean_g``; rloo
    ``n_g / (n_g - 1) * (s - mean_g)`` (= s minus the mean of the others); ``std_g`` unbiased;
    groups of one give 0 in every mode. Differentiable w.r.t. ``scores``.
    """
    s = scores.to(compute_dtype(scores))
    return _group_normalise(s, group.to(torch.int64), _GROUP_MODES[mode], eps)


def gigpo_advantages(
    rewards, cu_trajs, group, anchor, *, step_weight=1.0, gamma=1.0, mode="mean_std_norm", eps=1e-6
):
    """GiGPO advantages per step: episode part + ``step_weight`` * step part.

    Episode part: each trajectory's reward sum, normalised within its ``group`` (every
    trajectory counts once), broadcast to its steps. Step part: ``discounted_returns(rewards,
    gamma)`` (no bootstrap), normalised within the classes of steps sharing (group of their
    trajectory, ``anchor``). "mean_std_norm" = (x - mean) / (std + eps), "mean_norm" =
    x - mean; unbiased std; groups/classes of one give 0 in both parts.

    rewards [S] float, cu_trajs [B+1], group [B] int, anchor [S] int -> [S] fp32 (fp64 for
    fp64 rewards), computed in fp64 and rounded once. Differentiable w.r.t. ``rewards``.

    Differences from verl-agent's GiGPO code (by design, per the package contract): there the
    episode statistics count every step row (a long trajectory weighs more) and a group of one
    keeps its raw score; here each trajectory counts once and a group of one gives 0.
    """
    # in fp64, rounded once at the end: episode sums and returns of fp32 rewards cannot
    # overflow (the normalised result is what is returned), as in whiten
    dtype = compute_dtype(rewards)
    r = rewards.to(torch.float64)
    group = group.to(torch.int64)
    segment_id, _, _ = _segment_layout(cu_trajs, r.numel())
    kind = _GIGPO_MODES[mode]

    episode_return = r.new_zeros(group.numel()).index_add(0, segment_id, r)
    episode = _group_normalise(episode_return, group, kind, eps)[segment_id]

    step_return = discounted_returns(r, cu_trajs, gamma=gamma)
    # One int64 key per (group, anchor) pair: dense group rank * number of anchors + anchor rank
    # (both ranks < S + B, so the key cannot overflow); cheaper than a row-wise unique.
    _, group_rank = torch.unique(group, return_inverse=True)
    anchors, anchor_rank = torch.unique(anchor.to(torch.int64), return_inverse=True)
    step_class = group_rank[segment_id] * anchors.numel() + anchor_rank
    step = _group_normalise(step_return, step_class, kind, eps)
    return (episode + step_weight * step).to(dtype)
