"""`ptum embed` reads only verified export files: hashes from export.json, one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ptum import cli
from ptum.data.errors import DataError
from ptum.serving.artifacts import open_export
from ptum.serving.embed import embed
from tests.conftest import write_tsv


def _log(tmp_path: Path) -> Path:
    rows = [["u1", 10, "first title"], ["u1", 20, "second title"], ["u2", 5, "other title"]]
    return write_tsv(tmp_path / "behaviors.tsv", ["user_id", "timestamp", "text"], rows)


def _copy(exported, tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(exported("hsa").onnx, model_dir)
    return model_dir


def _flip(path: Path, at: float = 0.5) -> None:
    """Flip every bit of one byte in the middle of the file (inside the weights)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# behavior_encoder.onnx, and demo_age.onnx without --demo, are files embed does not load: the
# whole export is checked all the same.
@pytest.mark.parametrize(
    "name, demo",
    [
        ("user_model.onnx", False),
        ("demo_age.onnx", True),
        ("demo_age.onnx", False),
        ("spm.model", False),
        ("behavior_encoder.onnx", False),
    ],
)
def test_embed_refuses_a_flipped_byte(name: str, demo: bool, exported, tmp_path: Path) -> None:
    model_dir = _copy(exported, tmp_path)
    out = tmp_path / "out.parquet"
    embed(_log(tmp_path), model_dir, out, demo=demo)  # intact: fine
    out.unlink()
    _flip(model_dir / name)
    with pytest.raises(DataError) as e:
        embed(_log(tmp_path), model_dir, out, demo=demo)
    msg = str(e.value)
    assert msg.startswith(f"{model_dir / name}: sha256 differs from the one export.json records")
    assert "rerun `ptum export`" in msg and "\n" not in msg
    assert not out.exists()


def test_embed_refuses_a_missing_file(exported, tmp_path: Path) -> None:
    model_dir = _copy(exported, tmp_path)
    (model_dir / "user_model.onnx").unlink()
    with pytest.raises(DataError, match=r"user_model.onnx: missing \(listed in export.json\)"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")


def test_embed_without_an_export_is_one_clear_line(tmp_path: Path, capsys, monkeypatch) -> None:
    log = _log(tmp_path)
    with pytest.raises(DataError, match="no ONNX export here .*run `ptum export --arch ARCH`"):
        embed(log, tmp_path / "nowhere", tmp_path / "out.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no export.json"):
        embed(log, tmp_path / "empty", tmp_path / "out.parquet")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: every default
    rc = cli.main(["embed", "--input", str(log), "--model", "nowhere", "--out", "o.parquet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [
        f"ptum: no params.yaml in {tmp_path}: using the built-in defaults (run ptum from the "
        "project root)",
        "ptum embed: error: nowhere: no ONNX export here (the directory does not exist); run "
        "`ptum export --arch ARCH` first, or point --model at the directory it wrote",
    ]


def test_export_json_lists_what_embed_loads(exported, tmp_path: Path) -> None:
    """Only the demo heads export.json records are served; a broken export.json is refused."""
    model_dir = _copy(exported, tmp_path)
    assert open_export(model_dir).demo_heads() == ["demo_age.onnx"]
    shutil.copyfile(model_dir / "demo_age.onnx", model_dir / "demo_stray.onnx")
    report = embed(_log(tmp_path), model_dir, tmp_path / "out.parquet", demo=True)
    assert report["demographic_labels"] == ["age"]
    (model_dir / "export.json").write_text("{not json")
    with pytest.raises(DataError, match=r"export.json: unreadable \(JSONDecodeError"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")
    (model_dir / "export.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(DataError, match="user_model.onnx: not listed in export.json"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")


def test_an_export_json_that_is_not_utf8_is_named(exported, tmp_path: Path) -> None:
    model_dir = _copy(exported, tmp_path)
    (model_dir / "export.json").write_bytes(b"\xff\xfe" + (model_dir / "export.json").read_bytes())
    with pytest.raises(DataError) as e:
        open_export(model_dir)
    msg = str(e.value)
    assert msg.startswith(f"{model_dir / 'export.json'}: unreadable (UnicodeDecodeError")
    assert "rerun `ptum export`" in msg and "\n" not in msg
