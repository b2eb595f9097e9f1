"""bench/bench_layouts.py (merged vs rows layout, one StepPO update each) still runs: a
2-episode smoke run in a subprocess from the repo root, as the bench README runs it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.subprocess  # a fresh interpreter that trains a tiny model
def test_layout_bench_runs_and_rows_re_encode_the_history():
    args = ["--env", "doors", "--episodes", "2", "--reps", "1", "--no-save"]
    out = subprocess.run(
        [sys.executable, "bench/bench_layouts.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = lines[1].split()
    rows = {cells[1]: dict(zip(header, cells)) for cells in map(str.split, lines[2:4])}
    merged, per_step = rows["merged"], rows["rows"]
    assert merged["episodes"] == per_step["episodes"] == "2"
    # one sequence per episode vs one per step; every step re-encodes its history
    assert int(merged["sequences"]) == 2 < int(per_step["sequences"])
    assert int(per_step["tokens"]) > int(merged["tokens"])
