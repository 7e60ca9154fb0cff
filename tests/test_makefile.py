"""`make run` and friends call `dvc repro`, whose stage commands are `ptum ...`: recipes must
find the venv's `ptum` without the user activating the venv (a fresh machine has no other)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ptum").exists(), reason="no .venv/bin/ptum")
def test_make_recipes_find_the_venv_ptum_without_activation():
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run(
        ["make", "--no-print-directory", "--eval", "which-ptum:\n\t@command -v ptum", "which-ptum"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(out.stdout.strip()) == ROOT / ".venv" / "bin" / "ptum"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_quick_runs_in_a_temporary_copy_not_in_the_workspace():
    """A plain `dvc exp run -S ...` applies the tiny params to params.yaml and overwrites the
    workspace's outputs and dvc.lock; `--temp` keeps them (the experiment: `dvc exp show`)."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "dvc exp run --temp " in out.stdout
