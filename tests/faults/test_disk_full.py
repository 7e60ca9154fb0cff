"""A full disk (a file-size limit: writes past it fail with EFBIG) while a stage writes its
output: the stage fails with one line, leaves the previous complete output (or none) visible,
and a rerun with room to write equals an uninterrupted run."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import (
    CKPT,
    PRETRAIN,
    Run,
    assert_pretrain_equal,
    copy_project,
    error_line,
    ptum,
    rerun,
    tree,
)

pytestmark = pytest.mark.slow

PREPARED = Path("data/prepared")


# --- pretrain: a checkpoint save ------------------------------------------------------------


@dataclass
class FullSave:
    proj: Path
    run: Run  # the run under the limit
    entries: list[str]  # models/pretrain/ARCH after it
    latest: str
    first: str  # the checkpoint of epoch 1


@pytest.fixture(scope="module")
def full_save(base, pretrained, tmp_path_factory) -> FullSave:
    """Pre-training killed once the checkpoint of epoch 1 is live, then resumed with files
    limited to half the size of the model's weights: the save of epoch 2 fails."""
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "full-save")
    switches = [i for i, op, p in pretrained.events if op == "replace" and p.startswith(str(CKPT))]
    assert ptum(proj, *PRETRAIN, kill_at=switches[0] + 1).rc == -9
    first = (proj / CKPT / "LATEST").read_text().strip()
    weights = next((pretrained.proj / CKPT).glob("ckpt-*/model.safetensors"))
    run = ptum(proj, *PRETRAIN, max_file_size=weights.stat().st_size // 2)
    entries = sorted(p.name for p in (proj / CKPT).iterdir())
    return FullSave(proj, run, entries, (proj / CKPT / "LATEST").read_text().strip(), first)


def test_disk_full_in_a_checkpoint_save_keeps_the_last_one_and_rerun_is_byte_equal(
    full_save, pretrained
):
    error_line(full_save.run, "pretrain")
    resumed = f"resuming from epoch 1 step 0 ({CKPT / full_save.first})"
    assert resumed in full_save.run.stdout + full_save.run.stderr
    # The checkpoint of epoch 1 stays live and complete; nothing of the failed save is left.
    assert re.fullmatch(r"ckpt-\d+", full_save.first)
    assert full_save.entries == ["LATEST", full_save.first]
    assert full_save.latest == full_save.first
    rerun(full_save.proj, *PRETRAIN)
    assert_pretrain_equal(full_save.proj, pretrained.proj)


def test_disk_full_in_a_checkpoint_save_names_the_file_and_the_fix(full_save):
    line = error_line(full_save.run, "pretrain")
    assert f"{CKPT}/" in line, line
    assert "space" in line or "too large" in line.lower(), line


# --- prepare ----------------------------------------------------------------------------------


@dataclass
class FullPrepare:
    proj: Path
    over: Run  # over the complete output of another run, with other params
    after_over: dict[str, str]  # data/prepared after it
    fresh: Run  # without an earlier output
    fresh_left: list[str]  # what it left under data/


@pytest.fixture(scope="module")
def full_prepare(base, tmp_path_factory) -> FullPrepare:
    """prepare with files limited to half the size of its largest output, over the previous
    output (with another prepare.seed, so a mix would show) and without one."""
    proj = copy_project(base.proj, tmp_path_factory.mktemp("faults") / "full-prepare")
    limit = max(p.stat().st_size for p in (base.proj / PREPARED).iterdir()) // 2
    over = ptum(proj, "prepare", "--set", "prepare.seed=14", max_file_size=limit)
    after_over = tree(proj / PREPARED)
    shutil.rmtree(proj / PREPARED)
    fresh = ptum(proj, "prepare", max_file_size=limit)
    left = sorted(p.name for p in (proj / "data").iterdir())
    return FullPrepare(proj, over, after_over, fresh, left)


def test_disk_full_in_prepare_leaves_the_previous_output_or_none(full_prepare, base):
    error_line(full_prepare.over, "prepare")
    error_line(full_prepare.fresh, "prepare")
    assert full_prepare.after_over == tree(base.proj / PREPARED)
    assert full_prepare.fresh_left == ["raw", "tokenized"]  # no prepared, no staging left
    rerun(full_prepare.proj, "prepare")
    assert tree(full_prepare.proj / PREPARED) == tree(base.proj / PREPARED)


def test_disk_full_in_prepare_says_so_and_does_not_blame_the_input(full_prepare):
    line = error_line(full_prepare.fresh, "prepare")
    assert "damaged" not in line and "ptum ingest" not in line, line
    assert str(PREPARED) in line and ("space" in line or "too large" in line.lower()), line
