"""Thread count of the C++ CPU kernels (re-exported as ``steppo_fast.cpp.set_num_threads``,
``get_num_threads`` and ``num_threads``).

By default the kernels follow torch's intra-op setting (``torch.set_num_threads``), and a
kernel hands its loop to the thread pool (csrc/parallel.h) only when its input has 2**16
entries or more (below that, waking a thread costs more than it saves; measured with
``bench/bench_threads.py``, see bench/README.md). The pool's caller runs chunks itself and
never waits for a thread that other processes keep off the CPU, so a loaded machine makes a
threaded call about as fast as a one-thread call, not slower. ``set_num_threads(1)`` pins the
kernels to one thread without changing torch's own setting (matmuls keep their threads);
torch's own ops, such as the public ops' argument checks, follow ``torch.set_num_threads``.

The setting is process-wide (as ``torch.set_num_threads``), set only by these calls (never
read from the environment), and not inherited by spawned processes.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

from .. import _C

MAX_THREADS = 1 << 16


def set_num_threads(n: int | None) -> None:
    """Set the number of threads the C++ kernels use.

    Args:
        n: an int in ``[1, 65536]``, or ``None`` (or 0) to follow ``torch.get_num_threads()``
            again (the default).

    Raises:
        ValueError: ``n`` is not an int (bools rejected) or out of range.
    """
    if n is None:
        n = 0
    if isinstance(n, bool):
        raise ValueError(f"n: thread count must be an int or None, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n: thread count must be an int or None, got {n!r}") from None
    if not 0 <= n <= MAX_THREADS:
        raise ValueError(
            f"n: thread count must be in [1, {MAX_THREADS}] (or 0 / None for torch's), got {n}"
        )
    _C._set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads a parallel C++ kernel uses now: the value given to
    :func:`set_num_threads`, else ``torch.get_num_threads()``."""
    return _C._get_num_threads()[1]


def thread_setting() -> int | None:
    """The value given to :func:`set_num_threads` (None: following torch's setting)."""
    return _C._get_num_threads()[0] or None


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Context manager: the C++ kernels use ``n`` threads inside the block (see
    :func:`set_num_threads`), the previous setting again after it."""
    previous = thread_setting()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)
