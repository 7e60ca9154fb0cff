"""Fast checks of the flow's plain parts: parameter mapping into `dvc exp run -S`, the stage
plan against `dvc dag`, the retry rule, the stage-by-stage reading of DVC's output, metrics.

The flow itself, served and run through a Prefect server, is tested in test_pipeline.py (slow).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.artifacts import flatten_metrics, metrics_markdown, params_rows
from flows.experiment import Experiment, StageError, experiment_name, is_retryable
from flows.params import effective_params, hydra_value, overrides_for, parse_overrides, set_args
from flows.plan import select_stages, stage_plan
from ptum.config import load_params
from ptum.presets import QUICK

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_map_flow_parameters_to_dvc_params():
    def overrides(**kw):
        return overrides_for(**({"source": None, "data_path": None, "size": None} | kw))

    assert overrides(quick=False) == {}
    assert overrides(source="generic", data_path="/logs", quick=False) == {
        "data.source": "generic",
        "data.path": "/logs",
    }
    quick = parse_overrides(QUICK)
    assert quick["data.size"] == "tiny"
    assert overrides(data_path="", quick=True) == quick | {"data.path": ""}
    assert overrides(size="tiny", quick=True) == quick
    with pytest.raises(ValueError, match="quick"):
        overrides(size="large", quick=True)
    extra = ["pretrain.epochs=5", "pretrain.architectures=[hsa, han]", "data.path=/a b"]
    assert overrides(quick=True, extra=extra) == quick | {
        "pretrain.epochs": 5,
        "pretrain.architectures": ["hsa", "han"],
        "data.path": "/a b",
    }
    with pytest.raises(ValueError, match="section.key=value"):
        overrides(quick=False, extra=["epochs"])


def test_quick_preset_is_valid_params():
    quick = [f"{k}={json.dumps(v)}" for k, v in parse_overrides(QUICK).items()]
    assert load_params(ROOT / "params.yaml", quick).data.size == "tiny"


def test_dvc_applies_the_overrides_as_the_flow_reports_them(tmp_path):
    """`-S` goes through DVC's own override code (Hydra's grammar): the params.yaml DVC writes
    for the experiment equals the effective params the flow publishes, for awkward values too."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    overrides = overrides_for(
        source="generic",
        data_path="/a b/it's: here, [x]",
        size=None,
        quick=True,
        extra=["tune.lr=[1e-4, 0.01]", "tune.study_name=''", "prepare.seed=3"],
    )
    expected = effective_params(params, overrides)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    apply_overrides(params, [a for a in set_args(overrides) if a != "-S"])
    assert yaml.safe_load(params.read_text(encoding="utf-8")) == expected
    assert hydra_value("") == "''" and hydra_value(["a", 1, 0.5]) == "['a', 1, 0.5]"


def test_effective_params_are_validated_before_anything_runs():
    with pytest.raises(Exception, match="nonsense"):
        effective_params(ROOT / "params.yaml", {"pretrain.nonsense": 1})
    rows = params_rows({"a": {"b": 1, "c": [1, 2]}}, {"a.c": [1, 2]})
    assert rows == [
        {"param": "a.b", "value": "1", "from": "params.yaml"},
        {"param": "a.c", "value": "[1, 2]", "from": "override"},
    ]


def _dag_edges(root: Path) -> set[tuple[str, str]]:
    dot = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))


def test_stage_plan_has_the_stages_and_edges_of_dvc_dag():
    spec = effective_params(ROOT / "params.yaml", {})
    plan = stage_plan(yaml.safe_load((ROOT / "dvc.yaml").read_text()), spec)
    edges = {(u, s) for s, ups in plan.upstream.items() for u in ups}
    # `dvc dag` draws only direct edges; the plan may add implied ones (a stage reading the
    # outputs of both a stage and its ancestor), never miss one.
    assert _dag_edges(ROOT) <= edges
    for up, stage in edges - _dag_edges(ROOT):
        assert up in _ancestors(plan.upstream, stage, skip=(up, stage)), (up, stage)
    assert {s.split("@")[0] for s in plan.order} == set(
        yaml.safe_load(open(ROOT / "dvc.yaml"))["stages"]
    )
    quick = stage_plan(
        yaml.safe_load((ROOT / "dvc.yaml").read_text()),
        effective_params(ROOT / "params.yaml", parse_overrides(QUICK)),
    )
    assert [s for s in quick.order if s.startswith("pretrain@")] == [
        "pretrain@hsa",
        "pretrain@nativectr",
    ]
    assert select_stages(quick, ["tokenize"]) == ["ingest", "prepare", "tokenize"]
    assert select_stages(quick, ["export@hsa"])[-2:] == ["pretrain@hsa", "export@hsa"]
    with pytest.raises(ValueError, match="not in dvc.yaml"):
        select_stages(quick, ["nope"])


def _ancestors(upstream, stage, skip):
    seen, todo = set(), [u for u in upstream[stage] if (u, stage) != skip]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += upstream[s]
    return seen


def test_only_failures_that_can_pass_are_retried():
    assert is_retryable(StageError("killed", returncode=-9))
    assert is_retryable(StageError("oom via sh", returncode=137))
    assert is_retryable(OSError("fork failed"))
    assert not is_retryable(StageError("ConfigError", returncode=2))
    assert not is_retryable(StageError("ZeroDivisionError traceback", returncode=1))
    assert not is_retryable(StageError("dvc's own error", returncode=255))
    assert not is_retryable(ZeroDivisionError())


def _fake_dvc(tmp_path: Path, script: str) -> Experiment:
    stages = ["ingest", "prepare", "tokenize"]
    return Experiment(
        [sys.executable, "-c", script], root=tmp_path, stages=stages, log_file=tmp_path / "x.log"
    )


def _drain(exp: Experiment, stage: str) -> list[tuple[str, str]]:
    out = []
    while not exp.queues[stage].empty():
        e = exp.queues[stage].get()
        out.append((e.kind, e.text))
    return out


def test_experiment_output_is_split_by_stage(tmp_path):
    script = "\n".join(
        f"print({line!r})"
        for line in [
            "Reproducing experiment 'ptum-x'",
            "Stage 'ingest' didn't change, skipping",
            "Running stage 'prepare':",
            "> ptum prepare",
            "prepare progress",
            "ptum prepare: done in 1.0s",
            "Updating lock file 'dvc.lock'",
            "Running stage 'tokenize':",
            "> ptum tokenize",
            "Ran experiment(s): ptum-x",
        ]
    )
    exp = _fake_dvc(tmp_path, script)
    exp.run()
    exp.settle(None, will_retry=False)
    assert [k for k, _ in _drain(exp, "ingest")] == ["unchanged"]
    prepare = _drain(exp, "prepare")
    assert prepare[0][0] == "start" and prepare[-1][0] == "done"
    assert ("line", "prepare progress") in prepare
    assert [k for k, _ in _drain(exp, "tokenize")][-1] == "done"
    assert "prepare progress" in (tmp_path / "x.log").read_text()


def test_a_failing_stage_gets_the_error_and_later_stages_do_not_run(tmp_path):
    script = (
        "import sys\n"
        "print(\"Running stage 'ingest':\")\n"
        "print('ptum ingest: error: no such directory')\n"
        "print(\"ERROR: failed to reproduce 'ingest': failed to run: ptum ingest, exited with 2\")\n"
        "sys.exit(255)\n"
    )
    exp = _fake_dvc(tmp_path, script)
    with pytest.raises(StageError, match="no such directory") as err:
        exp.run()
    assert err.value.returncode == 2 and not is_retryable(err.value)
    exp.settle(err.value, will_retry=False)
    assert _drain(exp, "ingest")[-1][0] == "failed"
    assert [k for k, _ in _drain(exp, "prepare")] == ["absent"]


def test_a_retried_experiment_tells_the_interrupted_stage(tmp_path):
    script = "import os, signal\nprint(\"Running stage 'ingest':\", flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    exp = _fake_dvc(tmp_path, script)
    with pytest.raises(StageError) as err:
        exp.run()
    assert is_retryable(err.value)
    exp.settle(err.value, will_retry=True)
    assert [k for k, _ in _drain(exp, "ingest")] == ["start", "retrying"]
    assert exp.queues["prepare"].empty() and not exp.final.is_set()


def test_flatten_metrics_and_markdown():
    shown = {
        "rev": {
            "data": {
                "data/tokenized/report.json": {"data": {"vocab_size": 601, "unk_share": 0.0}},
                "data/prepared/report.json": {
                    "data": {"impressions": {"click_rate": {"test": 0.3}}, "cols": ["a", "b"]}
                },
                "broken.json": {"error": {"type": "FileNotFoundError", "msg": "missing"}},
            }
        }
    }
    rows = flatten_metrics(shown)
    assert {"file": "data/tokenized/report.json", "metric": "vocab_size", "value": 601} in rows
    assert {
        "file": "data/prepared/report.json",
        "metric": "impressions.click_rate.test",
        "value": 0.3,
    } in rows
    assert {"file": "data/prepared/report.json", "metric": "cols.1", "value": "b"} in rows
    assert [r["metric"] for r in rows if r["file"] == "broken.json"] == ["error"]
    md = metrics_markdown(rows, "ptum-1234")
    assert "## `data/tokenized/report.json`" in md and "| vocab_size | 601 |" in md
    assert "No metrics yet" in metrics_markdown([], None)


def test_experiment_name_is_a_hash_of_what_it_computes():
    a = experiment_name("c0ffee", "", {"data.size": "tiny"}, [])
    assert re.fullmatch(r"ptum-[0-9a-f]{10}", a)
    assert a == experiment_name("c0ffee", "", {"data.size": "tiny"}, [])
    assert a != experiment_name("c0ffee", "diff", {"data.size": "tiny"}, [])
    assert a != experiment_name("c0ffee", "", {"data.size": "small"}, [])
    assert a != experiment_name("c0ffee", "", {"data.size": "tiny"}, ["tokenize"])


def test_a_params_file_written_by_a_stage_orders_the_plan():
    """`pretrain` reads tune's best_params.json as a params file: tune runs first (a flow task
    waits only for tasks submitted before it, so the order must be a run order)."""
    dvc_yaml = {
        "stages": {
            "b": {"cmd": "b", "params": ["x.k", {"out/best.json": ["k"]}, {"params.yaml": None}]},
            "a": {"cmd": "a", "metrics": [{"out/best.json": {"cache": False}}]},
            "c": {"cmd": "c"},
        }
    }
    plan = stage_plan(dvc_yaml, {})
    assert plan.upstream == {"b": ["a"], "a": [], "c": []}
    assert plan.order == ["a", "b", "c"]
    real = stage_plan(
        yaml.safe_load((ROOT / "dvc.yaml").read_text()), effective_params(ROOT / "params.yaml", {})
    )
    for i, stage in enumerate(real.order):
        assert set(real.upstream[stage]) <= set(real.order[:i]), stage
