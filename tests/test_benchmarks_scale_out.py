"""benchmarks/scale_out.py: its result comparison, and a smoke run of one part on tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scale_out import first_difference

ROOT = Path(__file__).resolve().parents[1]


def test_first_difference_names_where_results_part():
    cell = {"model": "hsa", "test": {"acc": 0.5, "f1": float("nan")}, "pred": {"y": [0, 1]}}
    assert first_difference(cell, {**cell, "test": dict(cell["test"])}) is None  # NaN == NaN
    other = {**cell, "pred": {"y": [0, 2]}}
    assert first_difference([cell], [other]) == "[0].pred.y[1]: 1 vs 2"
    assert first_difference(cell, {**cell, "test": {"acc": 0.5}}) == "test: keys ['f1'] in one only"
    assert first_difference([1], [1.0]) == "[0]: 1 vs 1.0"  # JSON keeps int and float apart
    assert first_difference([cell], []) == ": 1 vs 0 entries"


@pytest.mark.slow
def test_tiny_pretrain_part_runs_and_finds_the_weights_bit_identical():
    p = subprocess.run(
        [sys.executable, "benchmarks/scale_out.py", "--tiny", "--only", "pretrain"],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    row = p.stdout.strip().splitlines()[-1]
    assert row.startswith("| pre-training across machines (hsa, 2 epochs) |"), p.stdout
    assert row.endswith("| bit-identical weights |"), row
