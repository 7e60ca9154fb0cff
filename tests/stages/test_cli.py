"""`ptum STAGE`: arguments reach `ptum.stages.STAGE.run` as keywords, nothing else in between."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from ptum import cli, paths

ROOT = Path(__file__).resolve().parents[2]


def test_every_subcommand_has_a_stage_module_with_run():
    for stage in cli.STAGES:
        module = importlib.import_module(f"ptum.stages.{stage}")
        params = inspect.signature(module.run).parameters
        assert next(iter(params)) == "p", stage
        assert all(v.kind is v.KEYWORD_ONLY for k, v in params.items() if k != "p"), stage


@pytest.mark.parametrize(
    ("argv", "stage", "expected"),
    [
        (["ingest"], "ingest", {}),
        (["ingest", "--out", "x"], "ingest", {"out": Path("x")}),
        (
            ["prepare", "--input", "r", "--out", "o"],
            "prepare",
            {"raw": Path("r"), "out": Path("o")},
        ),
        (["tokenize", "--input", "pr"], "tokenize", {"prepared": Path("pr")}),
        (["finetune", "--task", "ctr"], "finetune", {"task": "ctr"}),
        (["sensitivity"], "sensitivity", {}),
        (["tune", "--workers", "3"], "tune", {"workers": 3, "worker": 0}),
        (
            ["export", "--arch", "han", "--input", "ck"],
            "export",
            {"arch": "han", "ckpt": Path("ck")},
        ),
        (
            ["embed", "--input", "b.tsv", "--model", "m", "--out", "u.parquet"],
            "embed",
            {"src": Path("b.tsv"), "model": Path("m"), "out": Path("u.parquet")},
        ),
        (["report", "--out", "r.md"], "report", {"out": Path("r.md")}),
        (
            ["pretrain", "--arch", "hsa", "--nproc", "2", "--set", "pretrain.epochs=1"],
            "pretrain",
            {
                "arch": "hsa",
                "nproc": 2,
                "command": ["pretrain", "--arch", "hsa", "--set", "pretrain.epochs=1"],
            },
        ),
    ],
)
def test_arguments_reach_the_stage_run(argv, stage, expected, monkeypatch, capsys):
    seen = {}

    def fake_run(p, **kwargs):
        seen.update(kwargs, p=p)
        return {"ok": 1}

    monkeypatch.setattr(importlib.import_module(f"ptum.stages.{stage}"), "run", fake_run)
    assert cli.main([*argv, "--params", str(ROOT / "params.yaml")]) == 0
    p = seen.pop("p")
    if stage == "pretrain":
        expected["command"] += ["--params", str(ROOT / "params.yaml")]
        assert p.pretrain.epochs == 1  # the override reached the params
    assert seen == expected
    assert '"ok": 1' in capsys.readouterr().out


def test_without_option_drops_the_option_and_its_value():
    assert cli._without_option(["a", "--nproc", "2", "b"], "--nproc") == ["a", "b"]
    assert cli._without_option(["--nproc=4", "a", "--nprocs", "x"], "--nproc") == [
        "a",
        "--nprocs",
        "x",
    ]


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in cli.STAGES)


def test_stage_defaults_are_the_pipeline_paths():
    from ptum.stages import embed, ingest, prepare, tokenize

    assert inspect.signature(ingest.run).parameters["out"].default == paths.RAW
    assert inspect.signature(prepare.run).parameters["out"].default == paths.PREPARED
    assert inspect.signature(tokenize.run).parameters["out"].default == paths.TOKENIZED
    assert inspect.signature(embed.run).parameters["src"].default == paths.RAW


def test_ingest_prepare_tokenize_through_the_cli(tmp_path, monkeypatch):
    """The first three stages, for real, on the tiny synthetic log (a few seconds)."""
    from ptum.presets import QUICK

    monkeypatch.chdir(tmp_path)
    sets = [a for o in QUICK for a in ("--set", o)]
    params = ["--params", str(ROOT / "params.yaml"), *sets]
    for stage in ("ingest", "prepare", "tokenize"):
        assert cli.main([stage, *params]) == 0, stage
    assert (tmp_path / paths.RAW_MANIFEST).is_file()
    assert all((tmp_path / paths.prepared_table(t)).is_file() for t in paths.PREPARED_TABLES)
    assert (tmp_path / paths.TOKENS).is_file() and (tmp_path / paths.TOKENIZE_REPORT).is_file()
