"""CSR layouts for the tests: offsets from segment lengths, random ragged lengths, named
layouts with the edge cases every op must survive, and random two-level (trajectory -> step ->
token) layouts.

A CSR offsets vector ``cu`` of ``n`` segments is ``[n + 1]`` integers, ``cu[0] = 0``,
non-decreasing, ``cu[-1]`` = the axis length; segment ``b`` is ``[cu[b], cu[b + 1])``
(docs/design.md). Every test builds its offsets here, so an edge case added once reaches every
op family."""

from __future__ import annotations

import torch


def offsets(lengths, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """CSR offsets ``[len(lengths) + 1]`` of ``dtype`` from segment lengths (a list, tuple or
    integer tensor; empty lengths give ``[0]``)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(dtype)


def ragged_lengths(gen: torch.Generator, count: int, low: int, high: int) -> torch.Tensor:
    """``count`` int64 lengths uniform in ``[low, high]`` (``low = 0``: empty segments)."""
    return torch.randint(low, high + 1, (count,), generator=gen)


# Named layouts of segment lengths (a trajectory's steps, or a step's tokens). The large ones
# (> 2**16 entries) split into several thread-pool chunks of the C++ kernels, and their segments
# cross chunk boundaries; "long_tokens" is token-level GAE with trajectories of 60k-70k tokens.
LAYOUTS = [
    "hand",
    "one_each",
    "ragged_with_empty",
    "long_5000",
    "long_tokens",
    "many_short",
    "empty_batch",
    "all_empty",
]


def layout(name: str, gen: torch.Generator) -> torch.Tensor:
    """The int64 segment lengths of the named layout (one of ``LAYOUTS``)."""
    if name == "hand":
        return torch.tensor([3, 1, 2])
    if name == "one_each":  # one-step trajectories / one-token steps
        return torch.ones(64, dtype=torch.int64)
    if name == "ragged_with_empty":  # includes leading, inner and trailing empty segments
        inner = ragged_lengths(gen, 200, 0, 40)
        return torch.cat(
            [torch.zeros(2, dtype=torch.int64), inner, torch.zeros(3, dtype=torch.int64)]
        )
    if name == "long_5000":
        return torch.tensor([5000])
    if name == "long_tokens":
        return torch.tensor([60_000, 1, 70_000, 0])
    if name == "many_short":  # ~120k entries in 40k segments: chunk-crossing segments
        return ragged_lengths(gen, 40_000, 1, 5)
    if name == "empty_batch":
        return torch.zeros(0, dtype=torch.int64)
    if name == "all_empty":
        return torch.zeros(5, dtype=torch.int64)
    raise KeyError(name)


def random_layout(gen: torch.Generator, num_trajs: int, max_steps: int, max_tokens: int):
    """(cu_steps int32 [S+1], cu_trajs int32 [B+1]) with 1..max_steps steps per trajectory and
    1..max_tokens tokens per step."""
    steps = ragged_lengths(gen, num_trajs, 1, max_steps)
    tokens = ragged_lengths(gen, int(steps.sum()), 1, max_tokens)
    return offsets(tokens), offsets(steps)
