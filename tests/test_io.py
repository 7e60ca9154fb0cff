"""ptum.io: atomic writes leave the old file or the new one, fsynced, and no temp files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ptum import io


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_writes_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    io.atomic_write_bytes(path, b"\x00first")
    io.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _names(tmp_path) == ["a.bin"]


def test_atomic_write_text_keeps_newlines_and_encoding(tmp_path):
    path = tmp_path / "a.txt"
    io.atomic_write_text(path, "é\r\nb\n")
    assert path.read_bytes() == "é\r\nb\n".encode()


def test_atomic_write_json_is_json_dumps_plus_a_newline(tmp_path):
    obj = {"b": 1.5, "a": [1, {"z": None}], "nan": float("nan")}
    path = tmp_path / "r.json"
    io.atomic_write_json(path, obj, indent=1, sort_keys=True, allow_nan=True)
    assert path.read_text() == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    io.atomic_write_json(path, [1, 2])
    assert path.read_text() == "[1, 2]\n"


def test_a_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    io.atomic_write_text(path, "old\n")

    def disk_full(p: Path, data: bytes) -> None:
        Path(p).write_bytes(data[:2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_durable", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.atomic_write_json(path, {"new": 1})
    assert path.read_text() == "old\n"
    assert _names(tmp_path) == ["a.json"]


def test_atomic_path_replaces_only_when_the_block_completes(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["t.parquet"]
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["t.parquet"]


def test_new_files_get_the_usual_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    io.atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    io.atomic_write_bytes(tmp_path / "a", b"x")
    # The temp file before its rename, then the directory after it.
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(".a.") and synced[1] == str(tmp_path)
    synced.clear()
    with io.atomic_path(tmp_path / "b") as tmp:
        tmp.write_bytes(b"y")  # a writer that does not fsync
    assert synced == [str(tmp), str(tmp_path)]


def test_temp_target_recognises_only_temp_names():
    assert io.temp_target(".LATEST.3f9a0c1d.tmp") == "LATEST"
    assert io.temp_target(".meta.json.00ff00ff.tmp") == "meta.json"
    for name in ("LATEST", "LATEST.tmp", ".tmp", "..tmp", ".x.tmp.json"):
        assert io.temp_target(name) is None, name


OURS = {"marker": "manifest.json", "stage": "tokenize"}  # what an earlier output holds


def _earlier_output(out: Path, stage: str | None = "tokenize") -> None:
    """An output directory as the writer left it: its marker file names the stage."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"stage": stage, "files": {}}))


def test_atomic_dir_swaps_a_complete_directory(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    (out / "stale.txt").write_text("previous run")
    (tmp_path / "out.tmp").mkdir()
    (tmp_path / "out.tmp" / "junk").write_text("left by a killed run")
    with io.atomic_dir(out, **OURS) as tmp:
        assert tmp == tmp_path / "out.tmp" and _names(tmp) == []
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert _names(out) == ["sub"] and (out / "sub" / "a.txt").read_text() == "a"
    assert _names(tmp_path) == ["out"]


def test_a_failure_inside_atomic_dir_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    (out / "a.txt").write_text("old")
    with pytest.raises(ValueError), io.atomic_dir(out, **OURS) as tmp:
        (tmp / "a.txt").write_text("new")
        raise ValueError("bad input")
    assert (out / "a.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_creates_missing_parents(tmp_path):
    with io.atomic_dir(tmp_path / "x" / "y", **OURS) as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "x" / "y" / "f").read_text() == "1"


def test_atomic_dir_keeps_the_directorys_gitignore(tmp_path):
    # DVC keeps its outputs inside data/prepared out of git with data/prepared/.gitignore and does
    # not write it again on a rerun: a swapped-in directory must carry it over.
    out = tmp_path / "prepared"
    _earlier_output(out)
    (out / ".gitignore").write_text("/sequences.parquet\n")
    (out / "sequences.parquet").write_bytes(b"old")
    with io.atomic_dir(out, **OURS) as staging:
        (staging / "sequences.parquet").write_bytes(b"new")
        _earlier_output(staging)
    assert (out / ".gitignore").read_text() == "/sequences.parquet\n"
    assert (out / "sequences.parquet").read_bytes() == b"new"
    # A stage that writes its own .gitignore keeps its own.
    with io.atomic_dir(out, **OURS) as staging:
        (staging / ".gitignore").write_text("/x\n")
    assert (out / ".gitignore").read_text() == "/x\n"


def test_atomic_dir_never_replaces_a_directory_of_the_users_own_files(tmp_path):
    # `ptum prepare --out ~/thesis` must not empty ~/thesis: only what the writer wrote before
    # (its marker) is replaced; nothing is written and nothing is removed.
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("years of work")
    with pytest.raises(
        io.NotAnOutput,
        match=r"thesis: holds files that are not an earlier output of stage tokenize \(no manifest.json\).*new or empty directory",
    ):
        with io.atomic_dir(out, **OURS):
            raise AssertionError("the block must not run")
    assert (out / "sub" / "thesis.tex").read_text() == "years of work"
    assert _names(tmp_path) == ["thesis"]


@pytest.mark.parametrize("stage", ["prepare", None])
def test_atomic_dir_never_replaces_another_stages_output(tmp_path, stage):
    # `ptum tokenize --out data/prepared` (or `--out data/raw`, whose manifest has no stage).
    out = tmp_path / "other"
    _earlier_output(out, stage=stage)
    (out / "sequences.parquet").write_bytes(b"theirs")
    with pytest.raises(
        io.NotAnOutput, match=r"of stage tokenize \(its manifest.json is another stage.s\)"
    ):
        with io.atomic_dir(out, **OURS):
            pass
    assert (out / "sequences.parquet").read_bytes() == b"theirs"


def test_atomic_dir_replaces_its_own_output_with_a_damaged_marker(tmp_path):
    # A rerun repairs what it wrote: a truncated or flipped manifest still marks the output.
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b'{"stage": "tok\xff')
    with io.atomic_dir(out, **OURS) as staging:
        (staging / "manifest.json").write_text("{}")
    assert (out / "manifest.json").read_text() == "{}"


@pytest.mark.parametrize("content", [[], [".gitignore"]])
def test_atomic_dir_fills_an_empty_directory(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    for name in content:
        (out / name).write_text("/x\n")
    with io.atomic_dir(out, **OURS) as staging:
        (staging / "a").write_text("1")
    assert (out / "a").read_text() == "1"


def test_atomic_dir_refuses_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(io.NotAnOutput, match="a file, not an output directory"):
        with io.atomic_dir(out, **OURS):
            pass
    assert out.read_text() == "a file"
