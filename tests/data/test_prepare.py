"""Preprocessing invariants on the tiny synthetic preset: order, truncation, splits, no leakage."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from ptum import paths
from ptum.config import PrepareConfig
from ptum.data.prepare import ctr_cutoffs, prepare, split_labels
from ptum.stages.prepare import prepare_options


@pytest.fixture(scope="module")
def prepared(tiny_pipeline):
    d = tiny_pipeline / "prepared"
    return {
        n: pl.read_parquet(d / f"{n}.parquet")
        for n in ("items", "sequences", "users", "labels", "impressions")
    }


def test_sequences_time_ordered_truncated_with_true_gaps(tiny_pipeline, prepared):
    raw = pl.read_parquet(tiny_pipeline / "raw" / "behaviors.parquet")
    items = prepared["items"]
    full = raw.join(items.select("text", "item_id"), on="text").sort("user_id", "timestamp")
    seqs = prepared["sequences"].filter(pl.col("view") == "full")
    assert seqs.height > 0
    for row in seqs.iter_rows(named=True):
        ts = row["timestamps"]
        assert ts == sorted(ts)
        assert len(row["item_ids"]) == min(row["n_total"], 20)
        mine = full.filter(pl.col("user_id") == row["user_id"])
        assert mine.height == row["n_total"]
        # The kept behaviors are the most recent ones, with gaps to their true predecessor.
        assert ts == mine["timestamp"].to_list()[-20:]
        all_ts = mine["timestamp"].to_list()
        expected_gaps = [0] + [b - a for a, b in zip(all_ts, all_ts[1:])]
        assert row["gaps"] == expected_gaps[-20:]
    assert seqs["n_total"].max() > 20  # truncation was exercised


def test_items_are_distinct_texts(tiny_pipeline, prepared):
    items = prepared["items"]
    assert items["text"].n_unique() == items.height
    raw = pl.read_parquet(tiny_pipeline / "raw" / "behaviors.parquet")
    imps = pl.read_parquet(tiny_pipeline / "raw" / "impressions.parquet")
    assert set(items["text"]) == set(raw["text"]) | set(imps["text"])
    counts = dict(raw.group_by("text").len().iter_rows())
    assert all(counts.get(t, 0) == n for t, n in items.select("text", "n_behaviors").iter_rows())


def test_label_splits_disjoint_and_subsets_nested(prepared):
    labels = prepared["labels"]
    sizes = dict(labels.group_by("split").len().iter_rows())
    n = labels.height
    assert sizes["train"] == round(0.8 * n) and sizes["valid"] == round(0.1 * n)
    assert labels["user_id"].n_unique() == n
    train = labels.filter(pl.col("split") == "train")
    s20, s50, s100 = (
        set(train.filter(pl.col(c))["user_id"]) for c in ("train_20", "train_50", "train_100")
    )
    assert s20 < s50 < s100 and s100 == set(train["user_id"])
    assert len(s20) == round(0.2 * len(s100))
    # Subset flags never mark validation or test users.
    assert not labels.filter(pl.col("split") != "train")["train_100"].any()


def test_impression_windows_and_subsets(prepared):
    imps = prepared["impressions"]
    assert set(imps["window"]) == {"train", "valid", "test"}
    tr = imps.filter(pl.col("window") == "train")
    n20, n50 = tr["train_20"].sum(), tr["train_50"].sum()
    assert n20 < n50 < tr.height
    assert (tr["train_20"] & ~tr["train_50"]).sum() == 0
    assert not imps.filter(pl.col("window") != "train")["train_100"].any()
    # Global windows: every test impression is later than every train/valid impression.
    assert (
        imps.filter(pl.col("window") == "test")["timestamp"].min()
        >= imps.filter(pl.col("window") != "test")["timestamp"].max()
    )


def test_no_leakage_into_pretraining_corpus(tiny_pipeline, prepared):
    """The pre-training corpus holds no behavior at/after any user's CTR test window, and the
    histories of CTR samples end strictly before their window starts."""
    imps = prepared["impressions"]
    seqs = prepared["sequences"]
    test_start = imps.filter(pl.col("window") == "test")["timestamp"].min()
    train_start = imps.filter(pl.col("window") != "test")["timestamp"].min()
    pre = seqs.filter(pl.col("view") == "before_test")
    assert (
        pre.height
        == prepared["users"]["pretrain_split"].is_not_null().sum() + (pre["n_total"] < 2).sum()
    )
    assert pre.explode("timestamps")["timestamps"].max() < test_start
    hist = seqs.filter(pl.col("view") == "before_train").explode("timestamps")
    assert hist["timestamps"].max() < train_start
    # No (user, item) pair of a test impression at or after its time is in the corpus.
    test_pairs = imps.filter(pl.col("window") == "test").select("user_id", "item_id", "timestamp")
    corpus = pre.explode("item_ids", "timestamps").rename(
        {"item_ids": "item_id", "timestamps": "ts"}
    )
    leaked = test_pairs.join(corpus, on=["user_id", "item_id"]).filter(
        pl.col("ts") >= pl.col("timestamp")
    )
    assert leaked.height == 0
    # Labels never travel into pre-training inputs.
    assert set(pre.columns) == {"user_id", "view", "item_ids", "timestamps", "gaps", "n_total"}


def test_pretrain_valid_split_seeded(prepared):
    users = prepared["users"]
    assert set(users["pretrain_split"].drop_nulls()) == {"train", "valid"}
    assert users.filter(pl.col("pretrain_split") == "valid").height == round(
        0.05 * users["pretrain_split"].is_not_null().sum()
    )


def test_prepare_is_deterministic(tiny_pipeline, tmp_path):
    opts = prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2))
    prepare(tiny_pipeline / "raw", tmp_path / "again", opts)
    for name in ("items", "sequences", "users", "labels", "impressions"):
        a = pl.read_parquet(tiny_pipeline / "prepared" / f"{name}.parquet")
        b = pl.read_parquet(tmp_path / "again" / f"{name}.parquet")
        assert a.equals(b), name


def test_sequences_row_groups(tiny_pipeline, tmp_path, monkeypatch):
    """sequences.parquet is written in row groups of SEQUENCE_ROW_GROUP rows (bounded writer
    buffers on big logs); a file with fewer rows is byte-identical to the default writer's, so
    existing DVC outputs keep their hashes."""
    import pyarrow.parquet as pq

    from ptum.data.prepare import views

    opts = prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2))
    small = tiny_pipeline / "prepared" / "sequences.parquet"
    seqs = pl.read_parquet(small)
    assert seqs.height < views.SEQUENCE_ROW_GROUP
    seqs.write_parquet(tmp_path / "default.parquet")
    assert (tmp_path / "default.parquet").read_bytes() == small.read_bytes()
    monkeypatch.setattr(views, "SEQUENCE_ROW_GROUP", 50)
    prepare(tiny_pipeline / "raw", tmp_path / "grouped", opts)
    grouped = tmp_path / "grouped" / "sequences.parquet"
    assert pq.ParquetFile(grouped).metadata.num_row_groups == -(-seqs.height // 50)
    assert pl.read_parquet(grouped).equals(seqs)


def test_global_windows_are_the_future_of_every_user():
    imps = pl.DataFrame(
        {
            "line": list(range(1, 11)),
            "user_id": ["a"] * 5 + ["b"] * 5,
            "timestamp": [1, 2, 3, 4, 5, 100, 200, 300, 400, 500],
            "item_id": [1] * 10,
            "clicked": [0] * 10,
        }
    )
    out, cut = ctr_cutoffs(imps, train_frac=0.2, test_frac=0.2)
    w = dict(zip(zip(out["user_id"], out["timestamp"]), out["window"]))
    # One cut-off for everyone: user a's impressions are all before b's test window.
    assert {w[("a", t)] for t in (1, 2, 3, 4, 5)} == {"history"}
    assert w[("b", 500)] == w[("b", 400)] == "test" and w[("b", 300)] == w[("b", 200)] == "train"
    assert cut.rows() == [(200, 400)]


def test_per_user_windows_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="per-user windows .* no longer the future"):
        PrepareConfig(ctr_windows="per_user")


def test_split_labels_seed_changes_assignment():
    labels = pl.DataFrame({"user_id": [f"u{i}" for i in range(200)]})
    a = split_labels(labels, (0.8, 0.1, 0.1), (0.2, 1.0), seed=1)
    b = split_labels(labels, (0.8, 0.1, 0.1), (0.2, 1.0), seed=1)
    c = split_labels(labels, (0.8, 0.1, 0.1), (0.2, 1.0), seed=2)
    assert a.equals(b) and not a.equals(c)
    # Independent of input order.
    d = split_labels(labels.reverse(), (0.8, 0.1, 0.1), (0.2, 1.0), seed=1).sort("user_id")
    assert d.equals(a.sort("user_id"))
    assert np.isclose(a["train_20"].sum(), 0.2 * 160)


def test_sequences_any_row_order_and_any_time_span():
    """Same views whether rows come sorted or not, and on the per-row path used when the
    (user, time) search key would overflow."""
    from ptum.data.prepare import sequences

    rng = np.random.default_rng(3)
    n, users = 3_000, pl.Series("user_id", [f"u{i}" for i in range(40)])
    beh = pl.DataFrame(
        {
            "user": np.r_[np.arange(40), rng.integers(0, 40, n - 40)].astype(np.uint32),
            "timestamp": rng.integers(0, 500, n),
            "line": np.arange(n, dtype=np.uint32),
            "item_id": rng.integers(1, 50, n).astype(np.int32),
        }
    )
    cut = pl.DataFrame(
        {
            "user_id": users,
            "t_train": [None if i % 7 == 0 else 200 + i for i in range(40)],
            "t_test": [None if i % 5 == 0 else 300 + i for i in range(40)],
        },
        schema={"user_id": pl.String, "t_train": pl.Int64, "t_test": pl.Int64},
    )
    labeled = np.arange(40) % 3 == 0
    ref = sequences(beh.sort("user", "timestamp", "line"), users, cut, labeled, 7)
    assert sequences(beh, users, cut, labeled, 7).equals(ref)
    # One behavior far in the future (user u3: labeled, both cut-offs set) makes the time span
    # too wide for the combined key; it may only show up in u3's full view.
    far = pl.DataFrame(
        {"user": [3], "timestamp": [2**62], "line": [n], "item_id": [1]}, schema=beh.schema
    )
    wide = sequences(pl.concat([beh, far]), users, cut, labeled, 7)
    assert wide.filter(pl.col("view") != "full").equals(ref.filter(pl.col("view") != "full"))

    def full_total(seqs: pl.DataFrame) -> int:
        return seqs.filter(pl.col("view") == "full", pl.col("user_id") == "u3")["n_total"].item()

    assert full_total(wide) == full_total(ref) + 1


# ---------------------------------------------------------------- chunked (out-of-core) prepare

OUTPUTS = ("items", "sequences", "users", "labels", "impressions")


def _same_outputs(a, b) -> None:
    for name in OUTPUTS:
        fa, fb = pl.read_parquet(a / f"{name}.parquet"), pl.read_parquet(b / f"{name}.parquet")
        assert fa.equals(fb), name
    assert json.loads((a / "report.json").read_text()) == json.loads(
        (b / "report.json").read_text()
    )


def test_chunked_prepare_equals_in_memory(tiny_pipeline, tmp_path, monkeypatch):
    """A log bigger than prepare.chunk_rows goes through in chunks of whole users and gives
    the very same tables and report as the in-memory path."""
    from ptum.data.prepare import build

    n = (
        pl.scan_parquet(tiny_pipeline / "raw" / "behaviors.parquet")
        .select(pl.len())
        .collect()
        .item()
    )
    base = dict(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2)
    prepare(tiny_pipeline / "raw", tmp_path / "whole", prepare_options(PrepareConfig(**base)))
    seen = []
    real = build.prepare_chunked
    monkeypatch.setattr(build, "prepare_chunked", lambda *a: seen.append(a[-1]) or real(*a))
    prepare(
        tiny_pipeline / "raw",
        tmp_path / "chunked",
        prepare_options(PrepareConfig(**base, chunk_rows=n // 5)),
    )
    assert seen == [6 if n % 5 else 5]
    _same_outputs(tmp_path / "whole", tmp_path / "chunked")
    assert not (tmp_path / "chunked" / "chunks").exists()  # scratch files are removed
    manifest = json.loads((tmp_path / "chunked" / "manifest.json").read_text())["files"]
    assert set(manifest) == set(
        json.loads((tmp_path / "whole" / "manifest.json").read_text())["files"]
    )


def _bad_log(raw):
    """Users a..f; the first bad behavior line belongs to the last user, a later one to the
    first; bad impressions too (unknown user, duplicate)."""
    from tests.conftest import write_tsv

    raw.mkdir(parents=True)
    rows = [
        [u, 100 + 10 * i + j, f"{u} title {j}"] for i, u in enumerate("fedcba") for j in range(4)
    ]
    rows.insert(1, ["f", "not-a-time", "f broken"])  # line 3
    rows.insert(9, ["a", 5, ""])  # line 11: empty text
    rows.append(["a", 199, "a title 0"])  # a real repeat (other time)
    rows.append(["b", 140, "b title 0"])  # duplicate event (b's first)
    write_tsv(raw / "behaviors.tsv", ["user_id", "timestamp", "text"], rows)
    imps = [[u, 1000 + i, f"{u} ad", i % 2] for i, u in enumerate("abcdefzab")]
    imps.append(["a", 1000, "a ad", 0])  # duplicate of the first
    write_tsv(raw / "impressions.tsv", ["user_id", "timestamp", "text", "clicked"], imps)
    write_tsv(
        raw / "labels.tsv",
        ["user_id", "gender"],
        [[u, "MF"[i % 2]] for i, u in enumerate("abcdef")],
    )


def test_chunked_bad_rows_first_line_and_quarantine(tmp_path):
    from ptum.data.errors import DataError

    raw = tmp_path / "raw"
    _bad_log(raw)
    opts = dict(max_behaviors=5, ctr_train_frac=0.3, ctr_test_frac=0.3)
    for chunk_rows in (10**6, 5):  # in memory; chunks of about one user
        with pytest.raises(DataError) as err:
            prepare(
                raw, tmp_path / f"err{chunk_rows}", PrepareConfig(**opts, chunk_rows=chunk_rows)
            )
        # The first bad line of the file, though its user is in the last chunk.
        assert ":3:" in str(err.value) and "bad_timestamp" in str(err.value)
        assert "duplicate_event: 1" in str(err.value) and "empty_text: 1" in str(err.value)
    prepare(
        raw, tmp_path / "whole", prepare_options(PrepareConfig(**opts, on_bad_rows="quarantine"))
    )
    prepare(
        raw,
        tmp_path / "chunked",
        prepare_options(PrepareConfig(**opts, on_bad_rows="quarantine", chunk_rows=5)),
    )
    _same_outputs(tmp_path / "whole", tmp_path / "chunked")
    for table in ("behaviors", "impressions"):
        a = pl.read_parquet(tmp_path / "whole" / "quarantine" / f"{table}.parquet")
        b = pl.read_parquet(tmp_path / "chunked" / "quarantine" / f"{table}.parquet")
        assert a.equals(b) and a.height >= 2, table
    report = __import__("json").loads((tmp_path / "chunked" / "report.json").read_text())
    assert report["behaviors"]["rows_dropped"] == {
        "bad_timestamp": 1,
        "duplicate_event": 1,
        "empty_text": 1,
    }
    assert report["impressions"]["rows_dropped"] == {"duplicate_event": 1, "unknown_user": 1}


def test_kth_smallest_of_sorted_parts():
    from ptum.data.prepare.chunked import kth_smallest

    rng = np.random.default_rng(0)
    parts = [np.sort(rng.integers(-50, 50, size)) for size in (0, 1, 7, 30, 100)]
    merged = np.sort(np.concatenate(parts))
    assert [kth_smallest(parts, k) for k in range(len(merged))] == merged.tolist()


# ---------------------------------------------------------------- raw files vs the ingest manifest


@pytest.mark.parametrize("change", ["delete", "edit", "add"])
def test_raw_files_are_verified_against_the_ingest_manifest(tiny_pipeline, tmp_path, change):
    """A raw file deleted, edited or added since `ptum ingest` is a one-line error naming the
    file and saying to rerun ingest (a deleted impressions file once gave 0 impressions)."""
    import shutil

    from ptum.hashing import HashMismatch

    raw = tmp_path / "raw"
    shutil.copytree(tiny_pipeline / "raw", raw)
    opts = prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2))
    if change == "delete":
        (raw / "impressions.parquet").unlink()
        error, name = FileNotFoundError, "impressions.parquet"
    elif change == "edit":
        df = pl.read_parquet(raw / "behaviors.parquet")
        df.head(df.height - 1).write_parquet(raw / "behaviors.parquet")
        error, name = HashMismatch, "behaviors.parquet"
    else:
        (raw / "labels.tsv").write_text("user_id\tgender\nu1\tF\n", encoding="utf-8")
        error, name = ValueError, "labels.tsv"
    with pytest.raises(error) as err:
        prepare(raw, tmp_path / "prepared", opts)
    msg = str(err.value)
    assert msg.startswith(str(raw / name)) and "ptum ingest" in msg and "\n" not in msg
    assert not (tmp_path / "prepared").exists()


def test_headline_metrics_are_a_dozen_numbers(tiny_pipeline):
    """metrics.json (what `dvc metrics show` lists) holds at most 12 numbers, taken from the
    detailed report.json."""
    import json

    prepared = tiny_pipeline / "prepared"
    metrics = json.loads((prepared / "metrics.json").read_text())
    report = json.loads((prepared / "report.json").read_text())
    assert len(metrics) <= 12
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())
    windows = report["impressions"]["windows"]
    assert metrics == {
        "users": 300,
        "behaviors": 5461,
        "items": 116,
        "labeled_users": 131,
        "ctr_impressions": windows["train"] + windows["valid"] + windows["test"],
        "ctr_test_click_rate": report["impressions"]["click_rate"]["test"],
        "pretrain_users": report["pretrain"]["users"],
        "duplicates_dropped": 0,
        "bad_rows_dropped": 0,
        "long_texts": 0,
        "demo_tasks": 2,
        "ctr_task": 1,
    }
    assert metrics["ctr_impressions"] == 1000


def test_headline_metrics_count_duplicates_and_bad_rows(tmp_path):
    import json

    raw = tmp_path / "raw"
    _bad_log(raw)
    opts = prepare_options(PrepareConfig(max_behaviors=5, ctr_train_frac=0.3, ctr_test_frac=0.3))
    prepare(
        raw,
        tmp_path / "out",
        prepare_options(PrepareConfig(**{**opts.__dict__, "on_bad_rows": "quarantine"})),
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # behaviors: 1 duplicate, 1 bad timestamp, 1 empty text; impressions: 1 duplicate, 1 unknown
    assert (metrics["duplicates_dropped"], metrics["bad_rows_dropped"]) == (2, 3)


@pytest.mark.parametrize("tty", [True, False])
def test_chunk_passes_show_progress_only_on_a_terminal(tiny_pipeline, tmp_path, monkeypatch, tty):
    import io
    import sys

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return tty

    err = Stderr()
    monkeypatch.setattr(sys, "stderr", err)
    opts = prepare_options(
        PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2, chunk_rows=2000)
    )
    prepare(tiny_pipeline / "raw", tmp_path / "out", opts)
    text = err.getvalue()
    bars = ("validating behaviors", "validating impressions", "windows and view sizes", "sequences")
    for bar in bars:
        assert (f"prepare: {bar}: " in text) == tty, (bar, text)
    assert ("chunk/s" in text or "s/chunk" in text) == tty
    # The step lines are there either way (logs show which pass a long run is in).
    assert "chunks of whole users: validating" in text


def test_the_manifest_records_every_output(tiny_pipeline):
    prepared = tiny_pipeline / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["stage"] == "prepare"
    written = {p.name for p in prepared.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == written
    assert {f"{t}.parquet" for t in paths.PREPARED_TABLES} | {"report.json"} <= written
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((prepared / name).read_bytes()).hexdigest(), name
