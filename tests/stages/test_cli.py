"""`ptum STAGE`: arguments reach `ptum.stages.STAGE.run` as keywords, nothing else in between."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest

from ptum import cli, locks, paths

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
def test_arguments_reach_the_stage_run(argv, stage, expected, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # the run's lock files go beside its outputs
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


def test_an_out_holding_other_files_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    """`--out` names a directory the stage replaces whole: one of the user's own files, or
    another stage's output, is refused with one line and every file in it stays."""
    from ptum.presets import QUICK

    monkeypatch.chdir(tmp_path)
    params = ["--params", str(ROOT / "params.yaml"), *[a for o in QUICK for a in ("--set", o)]]
    assert cli.main(["ingest", *params]) == 0
    raw = {f.name: f.read_bytes() for f in paths.RAW.iterdir()}
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out in (mine, paths.RAW):
        assert cli.main(["prepare", "--out", str(out), *params]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out}: holds files that are not an earlier output" in err[0]
    assert (mine / "notes.txt").read_text() == "mine"
    assert {f.name: f.read_bytes() for f in paths.RAW.iterdir()} == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]


def test_a_params_file_that_is_not_there_is_an_error_not_the_defaults(
    tmp_path, monkeypatch, capsys
):
    # A typo in --params used to run the stage on the built-in defaults, over the last output.
    monkeypatch.chdir(tmp_path)
    _fake_stage(monkeypatch, "prepare", lambda p, **kw: pytest.fail("ran on the defaults"))
    assert cli.main(["prepare", "--params", "typo.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "typo.yaml: no such params file" in err[0]


# --- one writer per output; the error policy ------------------------------------------------


def _fake_stage(monkeypatch, stage: str, run) -> None:
    monkeypatch.setattr(importlib.import_module(f"ptum.stages.{stage}"), "run", run)


def _args(*argv: str):
    args = cli.build_parser().parse_args([*argv, "--params", str(ROOT / "params.yaml")])
    args.argv = list(argv)
    return args


def test_each_stage_locks_its_default_outputs_or_out():
    from ptum.config import load_params
    from ptum.stages import finetune

    p = load_params(ROOT / "params.yaml", [])
    arch = p.pretrain.architectures[0]
    # The stage's own default output, where its run() has one.
    for stage in cli.STAGES:
        default = inspect.signature(importlib.import_module(f"ptum.stages.{stage}").run)
        out = default.parameters.get("out")
        if out is not None and out.default is not None:
            assert cli.outputs(p, _args(stage))[0] == out.default, stage
    assert cli.outputs(p, _args("pretrain")) == [paths.pretrain_model(arch)]
    assert cli.outputs(p, _args("pretrain", "--arch", "gru4rec", "--out", "x")) == [Path("x")]
    assert cli.outputs(p, _args("export", "--arch", "han")) == [paths.onnx_model("han")]
    assert cli.outputs(p, _args("embed")) == [paths.embeddings(arch)]
    default_task = inspect.signature(finetune.run).parameters["task"].default
    assert cli.outputs(p, _args("finetune")) == [
        paths.finetune_result(default_task),
        paths.finetune_cache(default_task),
    ]
    assert cli.outputs(p, _args("finetune", "--task", "ctr", "--out", "r.json")) == [
        Path("r.json"),
        paths.finetune_cache("ctr"),
    ]


def test_a_second_writer_of_an_output_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _fake_stage(monkeypatch, "ingest", lambda p, **kw: pytest.fail("ran without the lock"))
    with locks.holding([Path("raw")]):
        monkeypatch.delenv(locks.HELD_ENV)  # as seen by another process
        assert cli.main(["ingest", "--out", "raw", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"ptum ingest: error: raw: another ptum process (PID {os.getpid()}) is writing it; "
        f"wait for it to finish or stop it (kill {os.getpid()}), then rerun"
    ]


def test_the_run_holds_the_lock_and_releases_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    def run(p, **kw):
        with pytest.raises(locks.OutputLocked):
            locks.acquire(kw["out"])
        seen.append(locks.lock_path(kw["out"]).read_text())

    _fake_stage(monkeypatch, "report", run)
    assert cli.main(["report", "--out", "r.md", "--params", str(ROOT / "params.yaml")]) == 0
    assert seen == [f"{os.getpid()}\n"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("rank", "code"), [("1", 0), ("0", 2)])
def test_ranks_of_a_users_torchrun_share_rank_0s_lock(rank, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    _fake_stage(monkeypatch, "pretrain", lambda p, **kw: {})
    lock = locks.acquire(Path("ck"))  # rank 0 holds it
    try:
        argv = ["pretrain", "--out", "ck", "--params", str(ROOT / "params.yaml")]
        assert cli.main(argv) == code
    finally:
        locks.release(*lock)


class NativeAbort(BaseException):
    """A BaseException that is not an Exception, like pyo3's PanicException (polars' Rust
    panics), that errors.explain does not know."""


class Interrupted(RuntimeError):
    """Like pre-training's: raised after saving, on a stop signal."""

    signum = 15


@pytest.mark.parametrize(
    ("exc", "code", "last"),
    [
        (NativeAbort("index out of bounds"), 1, "unexpected error (NativeAbort)"),
        (ValueError("data/x.parquet: bad column"), 2, "error: data/x.parquet: bad column"),
        (Interrupted("interrupted by signal 15; checkpoint saved"), 143, "interrupted by"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_failures_end_with_their_exit_code(exc, code, last, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PTUM_DEBUG", raising=False)

    def run(p, **kw):
        raise exc

    _fake_stage(monkeypatch, "report", run)
    assert cli.main(["report", "--params", str(ROOT / "params.yaml")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ptum report: {last}"), err
    assert ("Traceback (most recent call last):" in err) == (code == 1)
    assert not (tmp_path / "reports" / ".results.md.lock").exists()  # released


def test_system_exit_is_not_a_failure_to_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(p, **kw):
        raise SystemExit(5)

    _fake_stage(monkeypatch, "report", run)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--params", str(ROOT / "params.yaml")])
    assert e.value.code == 5
