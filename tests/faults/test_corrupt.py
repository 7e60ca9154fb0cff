"""One flipped byte in an artifact: the next command that reads it refuses with one line naming
the file (exit code 2), instead of using it. A corrupt live checkpoint with
an earlier complete one beside it falls back with a warning: tests/faults/test_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptum import cli
from tests.faults.harness import (
    ARCH,
    CKPT,
    PRETRAIN,
    Run,
    copy_project,
    error_line,
    flip_at,
    flip_byte,
    flip_positions,
    ptum,
)

pytestmark = pytest.mark.slow

TOKENS = Path("data/tokenized/tokens.npy")
CACHE = Path("models/finetune_cache/demo")


def refused(proj: Path, corrupt: Path, *args: str) -> str:
    """Run `ptum *args`; it must refuse with one line naming `corrupt`."""
    line = error_line(ptum(proj, *args), args[0])
    assert str(corrupt) in line, line
    return line


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_a_corrupt_checkpoint_file_is_refused_by_name(name, pretrained, tmp_path):
    proj = copy_project(pretrained.proj, tmp_path / "proj")
    live = (proj / CKPT / "LATEST").read_text().strip()
    corrupt = CKPT / live / name
    flip_byte(proj / corrupt)
    # The only checkpoint: nothing to fall back to; the line says what to rerun.
    line = refused(proj, corrupt, *PRETRAIN)
    assert f"ptum pretrain --arch {ARCH}" in line


# Both readers of the token matrix (export reads it only to train serving heads, off here).
@pytest.mark.parametrize(
    "args", [PRETRAIN, ("finetune", "--task", "demo")], ids=["pretrain", "finetune"]
)
def test_a_corrupt_token_matrix_is_refused_by_name(args, pretrained, tmp_path):
    proj = copy_project(pretrained.proj, tmp_path / "proj")
    flip_byte(proj / TOKENS)
    assert "ptum tokenize" in refused(proj, TOKENS, *args)


def test_a_corrupt_onnx_file_is_refused_by_name(exported, tmp_path):
    proj = copy_project(exported.proj, tmp_path / "proj")
    corrupt = Path("models/onnx") / ARCH / "user_model.onnx"
    flip_byte(proj / corrupt)
    assert "ptum export" in refused(proj, corrupt, "embed", "--arch", ARCH)


def _first_entry(proj: Path) -> Path:
    return min(p for p in (proj / CACHE).glob("*.json")).relative_to(proj)


def test_a_corrupt_fine_tuning_cache_entry_is_refused_by_name(finetuned, tmp_path):
    proj = copy_project(finetuned.proj, tmp_path / "proj")
    corrupt = _first_entry(proj)
    flip_byte(proj / corrupt)  # stays ASCII
    refused(proj, corrupt, "finetune", "--task", "demo")


def test_a_fine_tuning_cache_entry_with_invalid_utf8_is_refused_by_name(finetuned, tmp_path):
    proj = copy_project(finetuned.proj, tmp_path / "proj")
    corrupt = _first_entry(proj)
    flip_byte(proj / corrupt, mask=0x80)
    refused(proj, corrupt, "finetune", "--task", "demo")


@pytest.mark.parametrize("name", ["behaviors.parquet", "impressions.parquet", "labels.parquet"])
def test_a_corrupt_raw_file_is_refused_by_name(name, base, tmp_path):
    proj = copy_project(base.proj, tmp_path / "proj")
    corrupt = Path("data/raw") / name
    flip_byte(proj / corrupt)
    assert "ptum ingest" in refused(proj, corrupt, "prepare")


# Each file of data/prepared and data/tokenized that a stage reads, and the first command that
# reads it (lengths.npy, spm.vocab and metrics.json have no reader).
DEMO, CTR = ("finetune", "--task", "demo"), ("finetune", "--task", "ctr")
READERS = {
    "data/prepared/items.parquet": ("tokenize",),
    "data/prepared/sequences.parquet": PRETRAIN,
    "data/prepared/users.parquet": PRETRAIN,
    "data/prepared/labels.parquet": DEMO,
    "data/prepared/impressions.parquet": CTR,
    "data/prepared/report.json": DEMO,
    "data/tokenized/tokens.npy": PRETRAIN,
    "data/tokenized/spm.model": PRETRAIN,
    "data/tokenized/report.json": PRETRAIN,
}


def refused_here(proj: Path, corrupt: Path, *args: str, capsys, monkeypatch) -> str:
    """`refused` through the same entry point (`ptum.cli.main`) in this process: no interpreter
    start and torch import per run. PTUM_DEBUG is unset, as `ptum` in `refused` runs it."""
    monkeypatch.chdir(proj)
    monkeypatch.delenv("PTUM_DEBUG", raising=False)
    capsys.readouterr()
    rc = cli.main(list(args))
    captured = capsys.readouterr()
    line = error_line(Run(args, rc, captured.out, captured.err, 0.0), args[0])
    assert str(corrupt) in line, line
    return line


@pytest.mark.parametrize("name", sorted(READERS))
def test_any_flipped_byte_of_a_prepared_or_tokenized_file_is_refused_by_name(
    name, request, tmp_path, capsys, monkeypatch
):
    # Half of the single-byte flips in a Parquet file decode to other data without an error,
    # and some make polars panic or abort: every one must be caught by the hash check first.
    # The first flip runs `python -m ptum` as a user does; the others call its entry point here.
    args = READERS[name]
    ref = request.getfixturevalue("pretrained" if args[0] == "finetune" else "base")
    proj = copy_project(ref.proj, tmp_path / "proj")
    corrupt = Path(name)
    for i, pos in enumerate(flip_positions(proj / corrupt)):
        flip_at(proj / corrupt, pos)
        if i == 0:
            line = refused(proj, corrupt, *args)
        else:
            line = refused_here(proj, corrupt, *args, capsys=capsys, monkeypatch=monkeypatch)
        assert "dvc checkout" in line or "invalid JSON" in line, line
        flip_at(proj / corrupt, pos)  # back as written
