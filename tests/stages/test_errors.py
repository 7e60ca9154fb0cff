"""The CLI's error policy: an anticipated failure is one line `ptum STAGE: error: ...` naming
the file and the fix, exit code 2; anything else keeps its traceback and says it is a bug."""

from __future__ import annotations

import errno
import importlib
import json
import subprocess
from pathlib import Path

import polars as pl
import pytest

from ptum import cli
from ptum.data.verified import write_manifest
from ptum.stages.errors import explain

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ["--params", str(ROOT / "params.yaml")]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main([*argv, *PARAMS])
    return code, capsys.readouterr().err.strip()


def _one_error_line(err: str, stage: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ptum {stage}: error: "), err
    return lines[0]


def _fail_with(monkeypatch, stage: str, name: str, exc_or_fn) -> None:
    """Make the library function `name` that ptum.stages.STAGE calls fail."""

    def fake(*args, **kwargs):
        if callable(exc_or_fn) and not isinstance(exc_or_fn, BaseException):
            return exc_or_fn()
        raise exc_or_fn

    monkeypatch.setattr(importlib.import_module(f"ptum.stages.{stage}"), name, fake)


# --- real failures ----------------------------------------------------------------------------


def test_config_error(capsys):
    code, err = _run(["prepare", "--set", "pretrain.epochs=-2"], capsys)
    assert code == 2
    assert "pretrain.epochs = -2 is out of range" in _one_error_line(err, "prepare")


def test_corrupt_parquet_is_a_polars_compute_error_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/items.parquet").write_bytes(b"PAR1 not really parquet")
    write_manifest(tmp_path / "data/prepared", "prepare")  # recorded: the decoder's error shows
    code, err = _run(["tokenize"], capsys)
    line = _one_error_line(err, "tokenize")
    assert code == 2
    assert "polars ComputeError while reading data/prepared/items.parquet" in line
    assert "dvc repro" in line and "ptum prepare" in line  # the fix: rebuild it


def test_missing_column_is_a_polars_column_not_found_error(tmp_path, capsys):
    pl.DataFrame({"text": ["a", "b"]}).write_parquet(tmp_path / "items.parquet")
    write_manifest(tmp_path, "prepare")
    code, err = _run(["tokenize", "--input", str(tmp_path), "--out", str(tmp_path / "t")], capsys)
    line = _one_error_line(err, "tokenize")
    assert code == 2 and "polars ColumnNotFoundError" in line and "item_id" in line


def test_a_prepared_directory_without_a_manifest_is_refused(tmp_path, capsys):
    pl.DataFrame({"item_id": [1], "text": ["a"]}).write_parquet(tmp_path / "items.parquet")
    code, err = _run(["tokenize", "--input", str(tmp_path), "--out", str(tmp_path / "t")], capsys)
    line = _one_error_line(err, "tokenize")
    assert code == 2 and line.endswith("rerun `ptum prepare`")
    assert f"{tmp_path / 'manifest.json'}: missing" in line


def test_missing_input_names_the_file_and_the_stage_that_writes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(["tokenize"], capsys)
    line = _one_error_line(err, "tokenize")
    assert code == 2 and "data/prepared/items.parquet: no such file" in line
    assert "ptum prepare" in line


def test_safetensors_error(tmp_path, capsys, monkeypatch):
    from safetensors.numpy import load_file

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _fail_with(monkeypatch, "export", "read_meta", lambda: load_file(bad))
    code, err = _run(["export", "--input", str(tmp_path)], capsys)
    line = _one_error_line(err, "export")
    assert code == 2 and "safetensors SafetensorError while reading" in line
    assert str(tmp_path) in line


def test_onnxruntime_error_loading_a_corrupt_model(tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    bad = tmp_path / "user_model.onnx"
    bad.write_bytes(b"not an onnx graph")
    _fail_with(monkeypatch, "embed", "embed", lambda: ort.InferenceSession(str(bad)))
    code, err = _run(["embed", "--input", str(tmp_path), "--model", str(tmp_path)], capsys)
    line = _one_error_line(err, "embed")
    assert code == 2 and "onnxruntime" in line and str(tmp_path) in line


@pytest.mark.parametrize("inside_a_stage", [True, False])
def test_invalid_json_names_the_file(tmp_path, capsys, monkeypatch, inside_a_stage):
    bad = tmp_path / "report.json"
    bad.write_text('{"vocab_size": 8')  # cut short
    _fail_with(monkeypatch, "report", "build", lambda: json.loads(bad.read_text()))
    if not inside_a_stage:  # the error reaches the CLI without the stage's wrapper
        monkeypatch.setattr("ptum.stages.report.reading", _no_wrapper)
    code, err = _run(["report", "--out", str(tmp_path / "r.md")], capsys)
    line = _one_error_line(err, "report")
    assert code == 2 and f"{bad}: invalid JSON" in line and "line 1 column" in line


class _no_wrapper:
    def __init__(self, *inputs, **kw):
        pass

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- operating-system failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "data/prepared/items.parquet"),
            "data/prepared/items.parquet: cannot write (No space left on device): the device is full",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "data/raw/behaviors.parquet"),
            "data/raw/behaviors.parquet: permission denied",
        ),
        (
            OSError(errno.EIO, "Input/output error", "data/raw/users.parquet"),
            "data/raw/users.parquet: Input/output error; check the disk",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/log.tsv"),
            "/nowhere/log.tsv: no such file; check the path",
        ),
    ],
)
def test_os_errors(exc, expected, capsys, monkeypatch):
    _fail_with(monkeypatch, "prepare", "prepare", exc)
    code, err = _run(["prepare"], capsys)
    assert code == 2 and expected in _one_error_line(err, "prepare")


def test_polars_schema_error_outside_a_stage_wrapper(capsys, monkeypatch):
    _fail_with(monkeypatch, "prepare", "prepare", pl.exceptions.SchemaError("dtypes differ"))
    monkeypatch.setattr("ptum.stages.prepare.reading", _no_wrapper)
    code, err = _run(["prepare"], capsys)
    line = _one_error_line(err, "prepare")
    assert code == 2 and "polars SchemaError: dtypes differ" in line and "dvc repro" in line


def test_a_failed_rank_is_one_line(capsys, monkeypatch):
    exc = subprocess.CalledProcessError(1, ["python", "-m", "ptum", "pretrain"])
    _fail_with(monkeypatch, "pretrain", "run", exc)
    code, err = _run(["pretrain"], capsys)
    assert code == 2 and "exited with status 1" in _one_error_line(err, "pretrain")


# --- unexpected -------------------------------------------------------------------------------


def test_an_unexpected_error_keeps_its_traceback_and_says_it_is_a_bug(capsys, monkeypatch):
    _fail_with(monkeypatch, "prepare", "prepare", ZeroDivisionError("division by zero"))
    code, err = _run(["prepare"], capsys)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "ZeroDivisionError: division by zero" in err
    assert lines[-1].startswith("ptum prepare: unexpected error (ZeroDivisionError): ")
    assert "bug" in lines[-1] and "report" in lines[-1]


def test_ptum_debug_shows_the_traceback_of_an_anticipated_error(capsys, monkeypatch):
    monkeypatch.setenv("PTUM_DEBUG", "1")
    with pytest.raises(ValueError, match="out of range"):
        cli.main(["prepare", "--set", "pretrain.epochs=-2", *PARAMS])


def test_interrupt_is_exit_130(capsys, monkeypatch):
    _fail_with(monkeypatch, "prepare", "prepare", KeyboardInterrupt())
    code, err = _run(["prepare"], capsys)
    assert code == 130 and err == "ptum prepare: interrupted"


def test_a_lost_peer_of_a_data_parallel_run_is_one_line_in_gloo_words():
    gloo = (
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
        "closed by peer [127.0.0.1]:8366. This is typically caused by a remote worker crashing."
    )
    line = explain(RuntimeError(gloo))
    assert line is not None and line.startswith(
        "lost a peer of this data-parallel run (gloo: Connection closed by peer [127.0.0.1]:8366); "
    )
    assert "rerun it (on every machine)" in line
    assert explain(RuntimeError("an ordinary bug")) is None  # other RuntimeErrors stay bugs


def test_a_killed_process_of_a_stage_names_its_signal():
    import subprocess

    killed = subprocess.CalledProcessError(-9, ["python", "-m", "ptum", "(rank 1 of 2)"])
    assert (
        explain(killed)
        == "a process of this stage was killed by SIGKILL: python -m ptum (rank 1 of 2)"
    )
    failed = subprocess.CalledProcessError(3, ["x"])
    assert explain(failed) == "a process of this stage exited with status 3 (its error is above): x"
