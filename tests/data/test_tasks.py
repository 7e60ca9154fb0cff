"""Sources without labels or impressions: prepare succeeds, writes every output with its
schema, and records which downstream tasks the data allows (`available_tasks`)."""

from __future__ import annotations

import json

import polars as pl

from ptum.config import PrepareConfig
from ptum.data.ingest import ingest
from ptum.data.prepare import available_tasks, prepare
from ptum.data.prepare.tasks import tasks_of
from ptum.stages.prepare import prepare_options
from tests.conftest import write_tsv

OUTPUTS = ("items", "sequences", "users", "labels", "impressions")


def test_the_tiny_preset_allows_every_task(tiny_pipeline):
    tasks = available_tasks(tiny_pipeline / "prepared")
    assert tasks == {"demo": ["gender", "age"], "ctr": True, "why_not": {}}
    report = json.loads((tiny_pipeline / "prepared" / "report.json").read_text())
    assert report["tasks"] == tasks


def test_ptum_behavior_tsv_allows_pretraining_only(tiny_pipeline, tmp_path):
    """The original PTUM behavior.tsv has neither labels nor impressions: every output file is
    there with the schema downstream stages read (label columns aside), without rows."""
    sep = "#|NTABN|#"
    lines = [
        f"u{u}\tx\t{sep.join(f'title {(u * 7 + k) % 13}' for k in range(5))}\t"
        f"{sep.join(str(100 * u + 10 * k) for k in range(5))}"
        for u in range(6)
    ]
    src = tmp_path / "behavior.tsv"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ingest(source="ptum_tsv", path=str(src), out_dir=tmp_path / "raw")
    report = prepare(
        tmp_path / "raw", tmp_path / "prepared", prepare_options(PrepareConfig(max_behaviors=4))
    )
    tasks = available_tasks(tmp_path / "prepared")
    assert tasks["demo"] == [] and tasks["ctr"] is False
    assert set(tasks["why_not"]) == {"demo", "ctr"}
    assert report["tasks"] == tasks
    assert report["behaviors"]["rows_kept"] == 30 and report["pretrain"]["users"] == 6
    full = tiny_pipeline / "prepared"
    for name in OUTPUTS:
        got = pl.read_parquet(tmp_path / "prepared" / f"{name}.parquet")
        want = pl.read_parquet(full / f"{name}.parquet")
        if name == "labels":
            want = want.drop("gender", "age")
        assert got.schema == want.schema, name
        assert (got.height == 0) == (name in ("labels", "impressions")), name


def test_labels_without_impressions_allow_demo_only(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    users = [f"u{i}" for i in range(20)]
    write_tsv(
        raw / "behaviors.tsv",
        ["user_id", "timestamp", "text"],
        [[u, 10 * k, f"t{(i + k) % 5}"] for i, u in enumerate(users) for k in range(3)],
    )
    write_tsv(
        raw / "labels.tsv", ["user_id", "gender"], [[u, "MF"[i % 2]] for i, u in enumerate(users)]
    )
    report = prepare(raw, tmp_path / "prepared", prepare_options(PrepareConfig()))
    assert report["tasks"]["demo"] == ["gender"] and report["tasks"]["ctr"] is False
    assert report["tasks"]["why_not"] == {
        "ctr": "no impressions (the source has no impressions table, or it is empty)"
    }


def test_a_label_with_one_class_is_not_a_task():
    labels = pl.DataFrame(
        {
            "user_id": ["a", "b", "c", "d"],
            "gender": ["F", "F", "M", "F"],
            "country": ["x", "x", "y", None],
            "split": ["train", "train", "test", "test"],
            "train_100": [True, True, False, False],
        }
    )
    imps = pl.DataFrame(
        {"window": ["train", "test", "test"], "clicked": [1, 1, 1]},
        schema={"window": pl.String, "clicked": pl.Int8},
    )
    tasks = tasks_of(labels, imps)
    assert tasks["demo"] == []
    assert tasks["why_not"]["demo:gender"] == "1 class(es) among the training users"
    assert tasks["why_not"]["demo:country"] == "1 class(es) among the training users"
    assert tasks["why_not"]["ctr"] == "the CTR-test window has only clicks or only non-clicks"
