"""`ptum export` then `ptum embed` from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ptum import cli
from ptum.serving.embed import embed


@pytest.mark.slow
def test_cli_export_then_embed(exported, tiny_pipeline: Path, tmp_path: Path, monkeypatch) -> None:
    if not {"export", "embed"} <= set(cli.STAGES):
        pytest.skip("ptum export / ptum embed are not wired into ptum.cli yet")
    ex = exported("hsa")
    monkeypatch.chdir(tmp_path)  # the CLI resolves data/tokenized/spm.model from the cwd
    # export trains the serving heads on frozen user vectors: it reads the prepared data too.
    for sub in ("prepared", "tokenized"):
        shutil.copytree(tiny_pipeline / sub, tmp_path / "data" / sub)
    (tmp_path / "params.yaml").write_text("")  # an empty params file: every default
    params = ["--params", str(tmp_path / "params.yaml")]
    assert (
        cli.main(
            [
                "export",
                *params,
                "--arch",
                "hsa",
                "--input",
                str(ex.checkpoint),
                "--out",
                "onnx",
                "--set",
                "export.data_version=cli-test",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())["metadata"]
    assert meta["data_version"] == "cli-test" and meta["architecture"] == "hsa"
    assert (tmp_path / "onnx" / "demo_age.onnx").exists()
    assert (
        cli.main(
            [
                "embed",
                *params,
                "--arch",
                "hsa",
                "--input",
                str(tiny_pipeline / "raw"),
                "--model",
                "onnx",
                "--out",
                "users.parquet",
                "--set",
                "embed.demo=true",
            ]
        )
        == 0
    )
    got = pl.read_parquet(tmp_path / "users.parquet")
    embed(tiny_pipeline / "raw" / "behaviors.parquet", ex.onnx, tmp_path / "direct.parquet")
    want = pl.read_parquet(tmp_path / "direct.parquet")
    assert got["user_id"].to_list() == want["user_id"].to_list() and "age" in got.columns
    np.testing.assert_allclose(
        np.stack(got["vector"].to_numpy()),
        np.stack(want["vector"].to_numpy()),
        rtol=1e-5,
        atol=1e-6,
    )
