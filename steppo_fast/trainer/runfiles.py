"""Crash-safe run directory: every file is written to a temporary name and then
``os.replace``-d over the old one, so a crash leaves either the old or the new file, never a torn
one.

Layout of ``runs/<name>/``::

    config.yaml      the resolved TrainConfig
    metrics.jsonl    one JSON object per iteration (rewritten atomically each iteration)
    curves.png       learning curves, redrawn as training goes
    checkpoint.pt    model(s), optimizer(s), RNG states, iteration (every N iterations + last)
    model/           the policy in HF format (save_pretrained), loadable with --model PATH
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

FILE_MODE = 0o644  # mkstemp creates 0600 files; run files are meant to be shared and read


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
