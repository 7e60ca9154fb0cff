"""The checked reader of stage outputs: a manifest of every file written, a refusal naming the
file and the fix for a changed, unlisted or undecodable file or a missing manifest, one hash
per file per process."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import polars as pl
import pytest
from polars.exceptions import PanicException

from ptum import hashing, paths
from ptum.data import verified
from ptum.data.verified import DamagedInput
from ptum.hashing import HashMismatch
from ptum.stages import errors


@pytest.fixture
def out(tmp_path):
    """A stage output directory: a table, an array, a report, a hidden file and the manifest."""
    pl.DataFrame({"user_id": ["a", "b"], "n": [3, 4]}).write_parquet(tmp_path / "t.parquet")
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
    (tmp_path / "report.json").write_text('{"items": 2}\n')
    (tmp_path / ".gitignore").write_text("/t.parquet\n")
    verified.write_manifest(tmp_path, "prepare")
    return tmp_path


def _rewrite(path, data: bytes) -> None:
    """Replace a file's bytes with a new modification time (as any writer gives it)."""
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_the_manifest_records_each_written_file_and_its_sha256(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prepare"
    assert set(manifest["files"]) == {"t.parquet", "a.npy", "report.json"}  # not hidden files
    digest = hashlib.sha256((out / "a.npy").read_bytes()).hexdigest()
    assert manifest["files"]["a.npy"] == digest


def test_unchanged_files_read_back_as_written(out):
    assert verified.read_parquet(out / "t.parquet", "prepare")["n"].to_list() == [3, 4]
    assert verified.read_parquet(out / "t.parquet", "prepare", ["user_id"]).columns == ["user_id"]
    assert verified.load_npy(out / "a.npy", "prepare").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert verified.read_json(out / "report.json", "prepare") == {"items": 2}
    assert verified.verify(out / "report.json", "prepare") == out / "report.json"


@pytest.mark.parametrize("name", ["t.parquet", "a.npy", "report.json"])
def test_one_flipped_byte_is_refused_naming_the_file_and_the_fix(out, name):
    data = bytearray((out / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    _rewrite(out / name, bytes(data))
    with pytest.raises(HashMismatch) as e:
        verified.verify(out / name, "prepare")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out / name}: SHA-256 ")
    assert str(out / "manifest.json") in msg
    assert "`dvc checkout`" in msg and "`ptum prepare`" in msg


def test_a_directory_without_a_manifest_is_refused(out):
    (out / "manifest.json").unlink()
    with pytest.raises(DamagedInput, match=r"manifest.json: missing, .* rerun `ptum prepare`$"):
        verified.read_parquet(out / "t.parquet", "prepare")


def test_an_unlisted_file_is_refused(out):
    pl.DataFrame({"x": [1]}).write_parquet(out / "extra.parquet")
    with pytest.raises(DamagedInput, match=r"extra.parquet: not written by `ptum prepare`"):
        verified.read_parquet(out / "extra.parquet", "prepare")


def test_a_missing_file_is_a_file_not_found_error_naming_it(out):
    (out / "a.npy").unlink()
    with pytest.raises(FileNotFoundError) as e:
        verified.load_npy(out / "a.npy", "prepare")
    assert e.value.filename == str(out / "a.npy")


@pytest.mark.parametrize("text", ["{not json", '{"files": ["a.npy"]}', "[]"])
def test_an_unreadable_manifest_is_refused(out, text):
    (out / "manifest.json").write_text(text)
    with pytest.raises(
        DamagedInput, match=r"manifest.json: not a readable manifest .*ptum prepare"
    ):
        verified.load_npy(out / "a.npy", "prepare")


@pytest.mark.parametrize(
    "name, reader",
    [
        ("t.parquet", verified.read_parquet),
        ("a.npy", verified.load_npy),
        ("report.json", verified.read_json),
    ],
)
def test_a_recorded_file_the_decoder_rejects_is_one_line(out, name, reader):
    # A file whose bytes the manifest records but that does not decode (an older format, or a
    # manifest rewritten by hand): the decoder's error, on one line, naming the file.
    _rewrite(out / name, b"PAR1 garbage \x00\xff")
    verified.write_manifest(out, "prepare")
    with pytest.raises(DamagedInput) as e:
        reader(out / name, "prepare")
    msg = str(e.value)
    assert "\n" not in msg and f"while reading {out / name}: " in msg and "`ptum prepare`" in msg
    kind = {
        "t.parquet": "polars ComputeError",
        "a.npy": "ValueError",
        "report.json": "UnicodeDecodeError",
    }
    assert msg.startswith(kind[name]), msg


def test_a_native_panic_is_a_damaged_input_and_a_one_line_cli_error(out):
    # polars' Rust reader panics on some damaged Parquet files; the exception derives from
    # BaseException, so an `except Exception` lets it through.
    assert not issubclass(PanicException, Exception)
    with pytest.raises(
        DamagedInput, match=r"^pyo3_runtime PanicException while reading .*t.parquet"
    ):
        with verified.decoding(out / "t.parquet", verified.fix("prepare")):
            raise PanicException("index out of bounds: the len is 3 but the index is 7")
    line = errors.explain(PanicException("called `Option::unwrap()` on a `None` value"))
    assert line is not None and line.startswith("pyo3_runtime PanicException: called")
    with pytest.raises(errors.StageError, match="PanicException while reading x.parquet"):
        with errors.reading(paths.Path("x.parquet")):
            raise PanicException("boom")


def test_other_errors_pass_through_the_decoder_guard(out):
    with pytest.raises(KeyError):
        with verified.decoding(out / "t.parquet", "fix"):
            raise KeyError("a bug, not a damaged file")
    with pytest.raises(KeyboardInterrupt):
        with verified.decoding(out / "a.npy", "fix", also=(ValueError,)):
            raise KeyboardInterrupt


def test_each_file_is_hashed_once_per_version(out, monkeypatch):
    calls: list[str] = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p.name) or real(p))
    for _ in range(3):
        verified.read_parquet(out / "t.parquet", "prepare")
    assert calls == ["t.parquet"]
    _rewrite(out / "t.parquet", (out / "t.parquet").read_bytes())  # same bytes, new mtime
    verified.read_parquet(out / "t.parquet", "prepare")
    assert calls == ["t.parquet", "t.parquet"]


def test_the_manifest_name_is_the_one_ptum_paths_gives():
    assert paths.PREPARED_MANIFEST == paths.PREPARED / verified.MANIFEST
    assert paths.TOKENIZED_MANIFEST == paths.TOKENIZED / verified.MANIFEST
