"""Crash-safe run directory: every file is written to a temporary name and then
``os.replace``-d over the old one, so a crash leaves either the old or the new file, never a torn
one.

Layout of ``runs/<name>/``::

    config.yaml         the resolved TrainConfig
    metrics.jsonl       one JSON object per iteration (rewritten atomically each iteration)
    curves.png          learning curves, redrawn as training goes
    checkpoint.pt       model(s), optimizer(s), RNG states, iteration, checksum (every N
                        iterations + last; see :mod:`.checkpoint`)
    checkpoint.prev.pt  the checkpoint before it (the fallback when checkpoint.pt is corrupt)
    model/              the policy in HF format (save_pretrained), loadable with --model PATH

Temporary names: files ``.tmp-*`` (:func:`atomic_write_bytes`) and the directories
``model.tmp`` / ``model.old`` (:func:`replace_dir`). A crash can leave them behind;
:func:`clean_orphans` removes them (and finishes an interrupted model swap) when a run starts.

A write that fails (a full disk: ``ENOSPC``, a read-only folder, ...) raises
:class:`RunFileError` naming the file and the cause; the temporary file is removed and the
previous version of the file is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable

FILE_MODE = 0o644  # mkstemp creates 0600 files; run files are meant to be shared and read
TMP_PREFIX = ".tmp-"


class RunFileError(OSError):
    """A run file could not be written; the message names the file and the cause."""


def _write_failed(path: str, e: OSError) -> RunFileError:
    cause = "the disk is full (ENOSPC)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    err = RunFileError(
        e.errno, f"{path}: could not be written: {cause}; its previous version is unchanged"
    )
    return err


def atomic_write(path: str, write: Callable[[object], None], label: str | None = None) -> None:
    """Call ``write(f)`` on a binary file object of a temporary file in ``path``'s directory,
    fsync it, then ``os.replace`` it over ``path``. On any failure the temporary file is
    removed and ``path`` keeps its previous content; an ``OSError`` becomes a
    :class:`RunFileError` naming ``label`` (default: ``path``)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if isinstance(e, RunFileError):
            raise
        raise _write_failed(label or path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(final: str, write: Callable[[str], None]) -> None:
    """Write a directory with ``write(tmp_dir)`` into ``final + ".tmp"``, then swap it in:
    ``final`` -> ``final.old``, ``tmp`` -> ``final``, remove ``final.old``. A crash at any point
    leaves a complete ``final`` or a complete ``final.old`` (restored by
    :func:`clean_orphans`); leftovers of an earlier crash are removed first, so they never
    block a later swap."""
    tmp, old = final + ".tmp", final + ".old"
    try:
        for leftover in (tmp, old) if os.path.isdir(final) else (tmp,):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
        write(tmp)
        if os.path.isdir(final):
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.isdir(old):
            shutil.rmtree(old)
    except BaseException as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, RunFileError):
            raise _write_failed(final + "/", e) from e
        raise


def clean_orphans(run_dir: str) -> list[str]:
    """Remove what a crash left in ``run_dir``: temporary files (``.tmp-*``) and the temporary
    model directory ``model.tmp``; a ``model.old`` becomes ``model`` again when ``model`` is
    missing (a crash mid-swap), else it is removed. Returns the names removed or restored."""
    if not os.path.isdir(run_dir):
        return []
    done = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(TMP_PREFIX) and os.path.isfile(path):
            os.unlink(path)
            done.append(name)
    final = os.path.join(run_dir, "model")
    if os.path.isdir(final + ".tmp"):
        shutil.rmtree(final + ".tmp")
        done.append("model.tmp")
    if os.path.isdir(final + ".old"):
        if os.path.isdir(final):
            shutil.rmtree(final + ".old")
        else:
            os.replace(final + ".old", final)
        done.append("model.old")
    return done


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line, impossible with atomic writes, is skipped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return rows


def write_metrics(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))
