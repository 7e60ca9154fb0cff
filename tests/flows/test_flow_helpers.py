"""Fast checks of the flow's plain helpers: parameter mapping, params.yaml edits, streaming, metrics.

The flow itself, served and run through a Prefect server, is tested in test_pipeline.py (slow).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import (
    STAGES,
    StageError,
    experiment_name,
    flatten_metrics,
    metrics_markdown,
    overrides_for,
    parse_overrides,
    pipeline_order,
    pipeline_stages,
    run_streaming,
    select_stages,
    write_params,
)
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
    # `overrides` strings come last and are parsed as YAML values, as by `ptum --set`.
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


def test_stages_run_in_pipeline_order_with_new_stages_after_their_predecessor():
    defined = ["ingest", "prepare", "tokenize", "pretrain", "finetune", "sensitivity", "report"]
    assert pipeline_order(defined) == defined
    # Stages of STAGES follow STAGES whatever dvc.yaml's order; others follow their predecessor.
    shuffled = ["report", "ingest", "extra", "prepare", "tokenize"]
    assert pipeline_order(shuffled) == ["ingest", "extra", "prepare", "tokenize", "report"]
    assert pipeline_order(["first", "ingest"]) == ["first", "ingest"]
    assert select_stages(None, defined) == defined
    assert select_stages(["report", "ingest", "sensitivity"], defined) == [
        "ingest",
        "sensitivity",
        "report",
    ]
    with pytest.raises(ValueError, match="not in dvc.yaml"):
        select_stages(["tune"], defined)
    # The real dvc.yaml: STAGES' stages keep their relative order.
    real = select_stages(None, pipeline_stages(ROOT))
    known = [s for s in real if s in STAGES]
    assert known == sorted(known, key=STAGES.index)


def test_write_params_changes_only_the_overridden_lines(tmp_path):
    """On the real params.yaml: comments, quotes and flow-style lists survive the edit."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text(encoding="utf-8").splitlines()
    changed = write_params(params, {"data.size": "not-a-preset", "data.path": "/a b/c: d"})
    assert {k: new for k, (_, new) in changed.items()} == {
        "data.size": "not-a-preset",
        "data.path": "/a b/c: d",
    }
    after = params.read_text(encoding="utf-8").splitlines()
    assert len(after) == len(before)
    diff = [(b, a) for b, a in zip(before, after) if b != a]
    assert sorted(b.split(":")[0].strip() for b, _ in diff) == ["path", "size"], diff
    data = yaml.safe_load(params.read_text(encoding="utf-8"))["data"]
    assert data["size"] == "not-a-preset" and data["path"] == "/a b/c: d"
    # The same values again: nothing to change, and the file is not rewritten.
    mtime = params.stat().st_mtime_ns
    assert write_params(params, {"data.size": "not-a-preset"}) == {}
    assert params.stat().st_mtime_ns == mtime


def test_write_params_keeps_flow_style_lists_and_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# top\nsec:\n  names: [a, b, c]  # which\n  n: 3\n", encoding="utf-8")
    assert write_params(params, {"sec.names": ["a"], "sec.n": 1}) == {
        "sec.names": (["a", "b", "c"], ["a"]),
        "sec.n": (3, 1),
    }
    assert (
        params.read_text(encoding="utf-8") == "# top\nsec:\n  names: [a]        # which\n  n: 1\n"
    )


def test_run_streaming_logs_lines_as_they_come_and_raises_with_stderr(tmp_path):
    seen: list[str] = []
    script = "import sys; print('out 1'); print('err 1', file=sys.stderr); print('out 2')"
    run_streaming([sys.executable, "-c", script], cwd=tmp_path, log=seen.append)
    assert sorted(seen) == ["err 1", "out 1", "out 2"]
    assert seen.index("out 1") < seen.index("out 2")

    failing = "import sys; print('working'); print('stage exploded: bad row 3', file=sys.stderr); sys.exit(3)"
    with pytest.raises(StageError, match=r"(?s)`fake stage` exited with code 3.*bad row 3"):
        run_streaming(
            [sys.executable, "-c", failing], cwd=tmp_path, log=seen.append, label="fake stage"
        )
    assert "working" in seen


def test_flatten_metrics_and_markdown():
    shown = {
        "": {
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
    assert flatten_metrics({}) == []

    md = metrics_markdown(rows, "ptum-x-1234")
    assert "## `data/tokenized/report.json`" in md and "| vocab_size | 601 |" in md
    assert "ptum-x-1234" in md
    assert "No metrics yet" in metrics_markdown([], None)


def test_experiment_name_is_a_valid_ref_name():
    assert experiment_name("gallant-otter", "0d1e2f3a-aaaa") == "ptum-gallant-otter-0d1e2f3a"
    assert experiment_name("nightly run: #3", None) == "ptum-nightly-run-3"
