"""Generic-format reading and the bad-input contract: clear errors or counted quarantine."""

from __future__ import annotations

import json

import polars as pl
import pytest

from ptum.config import PrepareConfig
from ptum.data.errors import DataError
from ptum.data.ingest import ingest, read_ptum_tsv
from ptum.data.prepare import prepare
from ptum.stages.prepare import prepare_options
from tests.conftest import write_tsv

GOOD = [
    ["a", 100, "red apple pie"],
    ["a", 200, "green tea"],
    ["a", 300, "red apple pie"],
    ["b", 150, "green tea"],
    ["b", 250, "blue cheese"],
    ["b", 260, "jazz night"],
    ["c", 120, "jazz night"],
    ["c", 130, "blue cheese"],
]


def _write(tmp_path, behaviors=GOOD, labels=None, impressions=None, extra_lines=""):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tsv(raw / "behaviors.tsv", ["user_id", "timestamp", "text"], behaviors)
    if extra_lines:
        with (raw / "behaviors.tsv").open("ab") as f:
            f.write(extra_lines if isinstance(extra_lines, bytes) else extra_lines.encode())
    if labels is not None:
        write_tsv(raw / "labels.tsv", ["user_id", "gender"], labels)
    if impressions is not None:
        write_tsv(raw / "impressions.tsv", ["user_id", "timestamp", "text", "clicked"], impressions)
    return raw


def _prepare(tmp_path, raw, **kw):
    opts = prepare_options(PrepareConfig(demo_split=(0.34, 0.33, 0.33), **kw))
    return prepare(raw, tmp_path / "prepared", opts)


def test_good_tsv_round_trip(tmp_path):
    raw = _write(
        tmp_path,
        labels=[["a", "F"], ["b", "M"], ["c", "F"]],
        impressions=[["a", 400, "ad one", 1], ["b", 500, "ad two", 0]],
    )
    report = _prepare(tmp_path, raw)
    assert report["behaviors"]["rows_read"] == 8
    assert report["behaviors"]["users"] == 3
    # Items are distinct texts of behaviors and impressions.
    items = pl.read_parquet(tmp_path / "prepared" / "items.parquet")
    assert sorted(items["text"]) == sorted({r[2] for r in GOOD} | {"ad one", "ad two"})
    assert items["item_id"].to_list() == list(range(1, items.height + 1))


@pytest.mark.parametrize(
    ("extra", "line", "reason"),
    [
        ("d\t10\n", 10, "malformed_line"),  # missing field
        ("d\t10\tx\ty\n", 10, "malformed_line"),  # one field too many
        (b"d\t10\tbad \xff\xfe bytes\n", 10, "bad_utf8"),
        ("d\t10\t   \n", 10, "empty_text"),
        ("d\tten\ttext\n", 10, "bad_timestamp"),
        ("d\t-5\ttext\n", 10, "bad_timestamp"),
        ("\t10\ttext\n", 10, "missing_user"),
        ("a\t100\tred apple pie\n", 10, "duplicate_event"),  # with on_duplicates=error
    ],
)
def test_bad_behavior_rows_name_file_and_line(tmp_path, extra, line, reason):
    raw = _write(tmp_path, extra_lines=extra)
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw, on_duplicates="error")
    assert err.value.path.endswith("behaviors.tsv")
    assert err.value.line == line
    assert f"[{reason}]" in str(err.value)
    assert f"behaviors.tsv:{line}:" in str(err.value)
    # Nothing half-written is left behind and no earlier output is destroyed.
    assert not (tmp_path / "prepared").exists()


def test_error_does_not_destroy_previous_output(tmp_path):
    raw = _write(tmp_path)
    _prepare(tmp_path, raw)
    before = (tmp_path / "prepared" / "items.parquet").read_bytes()
    with (raw / "behaviors.tsv").open("a") as f:
        f.write("d\tten\ttext\n")
    with pytest.raises(DataError):
        _prepare(tmp_path, raw)
    assert (tmp_path / "prepared" / "items.parquet").read_bytes() == before


def test_missing_column_is_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tsv(raw / "behaviors.tsv", ["user_id", "text"], [["a", "x"]])
    with pytest.raises(DataError, match=r"behaviors.tsv:1: missing column\(s\) \['timestamp'\]"):
        _prepare(tmp_path, raw)


def test_unknown_user_in_labels(tmp_path):
    raw = _write(tmp_path, labels=[["a", "F"], ["zz", "M"]])
    with pytest.raises(
        DataError, match=r"labels.tsv:3: user 'zz' has no behaviors \[unknown_user\]"
    ):
        _prepare(tmp_path, raw)


def test_duplicate_user_in_labels(tmp_path):
    raw = _write(tmp_path, labels=[["a", "F"], ["a", "M"]])
    with pytest.raises(DataError, match=r"labels.tsv:3: .*\[duplicate_user\]"):
        _prepare(tmp_path, raw)


def test_bad_clicked(tmp_path):
    raw = _write(tmp_path, impressions=[["a", 400, "ad", 2]])
    with pytest.raises(DataError, match=r"impressions.tsv:2: clicked is not 0 or 1"):
        _prepare(tmp_path, raw)


def test_quarantine_counts_and_reconciles(tmp_path):
    extra = "d\t10\n\na\t100\tred apple pie\ne\tten\tx\nf\t11\t \n"
    raw = _write(tmp_path, labels=[["a", "F"], ["zz", "M"], ["b", ""]], extra_lines=extra)
    report = _prepare(tmp_path, raw, on_bad_rows="quarantine")
    b = report["behaviors"]
    assert b["rows_dropped"] == {
        "malformed_line": 1,
        "duplicate_event": 1,
        "bad_timestamp": 1,
        "empty_text": 1,
    }
    assert b["rows_kept"] == len(GOOD)
    assert b["rows_read"] == b["rows_kept"] + sum(b["rows_dropped"].values())
    assert b["blank_lines_skipped"] == 1
    assert report["labels"]["rows_dropped"] == {"unknown_user": 1}
    # An empty label value is a missing label, not a bad row.
    assert report["labels"]["rows_kept"] == 2
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert sorted(q["line"].to_list()) == [10, 12, 13, 14]
    saved = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert saved["behaviors"]["reconciles"] is True


def test_parquet_input_with_row_numbers(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pl.DataFrame(
        {"user_id": ["a", "a", "b"], "timestamp": [1, 2, None], "text": ["x", "y", "z"]}
    ).write_parquet(raw / "behaviors.parquet")
    with pytest.raises(DataError, match=r"behaviors.parquet row 3: timestamp"):
        _prepare(tmp_path, raw)


def test_generic_source_copies_files_unchanged(tmp_path):
    src = _write(tmp_path, labels=[["a", "F"]])
    out = tmp_path / "ingested"
    info = ingest(source="generic", path=str(src), out_dir=out)
    assert (out / "behaviors.tsv").read_bytes() == (src / "behaviors.tsv").read_bytes()
    assert set(info["files"]) == {"behaviors.tsv", "labels.tsv"}


def test_ptum_tsv_layout(tmp_path):
    f = tmp_path / "behavior.tsv"
    sep = "#|NTABN|#"
    f.write_text(
        f"u1\tx\tfirst title{sep}second title\t100{sep}200\nu2\tx\tonly one\t50\n", encoding="utf-8"
    )
    df = read_ptum_tsv(f)
    assert df.rows() == [
        ("u1", 100, "first title", 1),
        ("u1", 200, "second title", 1),
        ("u2", 50, "only one", 2),
    ]
    f.write_text(f"u1\tx\ta{sep}b\t100\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"behavior.tsv:1: 2 texts but 1 timestamps"):
        read_ptum_tsv(f)
    f.write_bytes(b"u1\tx\ta\t1\nu2\tx\t\xff\t2\n")
    with pytest.raises(DataError, match=r"behavior.tsv:2: bytes that are not valid UTF-8"):
        read_ptum_tsv(f)


def _flag_duplicates_by_hashing(lf: pl.LazyFrame, keys: list[str], reason: str) -> pl.LazyFrame:
    """Reference: every good row but the first (by line) of each key group gets `reason`."""
    first = pl.struct(*keys, pl.col("reason").is_null()).is_first_distinct()
    return lf.sort("line").with_columns(
        reason=pl.when(pl.col("reason").is_null() & ~first)
        .then(pl.lit(reason))
        .otherwise(pl.col("reason"))
    )


def test_mark_duplicates_matches_a_hash_based_reference():
    """The sort-based duplicate check flags exactly the rows a composite-key hash flags."""
    import numpy as np

    from ptum.data import generic

    rng = np.random.default_rng(0)
    n = 2_000

    def pick(values: list) -> list:
        return [values[i] for i in rng.integers(0, len(values), n)]

    df = pl.DataFrame(
        {
            "line": np.arange(2, n + 2, dtype=np.uint32),
            "user_id": pick(["a", "b", "c", None]),
            "timestamp": rng.integers(0, 5, n),
            "text": pick(["x", "y", "z", " "]),
            "source_item_id": pick(["1", "2", None]),
            "reason": pick([None, None, None, "bad_timestamp"]),
        }
    ).sample(fraction=1.0, shuffle=True, seed=1)  # out of line order on purpose
    keys = ["user_id", "timestamp", "text", "source_item_id"]
    lazy = _flag_duplicates_by_hashing(df.lazy(), keys, "duplicate_event").collect()
    eager = generic.mark_duplicates(df, keys, "duplicate_event").sort("line")
    assert eager.equals(lazy)
    assert (eager["reason"] == "duplicate_event").sum() > 0


# ---------------------------------------------------------------- input handling


def test_duplicate_events_are_dropped_and_counted_by_default(tmp_path):
    """Double-logged events (same user, second and text) are dropped and counted, in behaviors
    and impressions; the outputs equal those of the log without them."""
    imps = [["a", 400, "ad one", 1], ["b", 500, "ad two", 0], ["c", 600, "ad one", 1]]
    (tmp_path / "clean").mkdir()
    (tmp_path / "doubled").mkdir()
    clean = _write(tmp_path / "clean", impressions=imps)
    doubled = _write(
        tmp_path / "doubled",
        behaviors=GOOD + [GOOD[0], GOOD[4], GOOD[4]],
        impressions=imps + [imps[1]],
    )
    want = _prepare(tmp_path / "clean", clean)
    got = _prepare(tmp_path / "doubled", doubled)
    assert got["behaviors"]["rows_dropped"] == {"duplicate_event": 3}
    assert got["impressions"]["rows_dropped"] == {"duplicate_event": 1}
    assert got["behaviors"]["rows_kept"] == want["behaviors"]["rows_kept"] == len(GOOD)
    assert got["behaviors"]["rows_read"] == len(GOOD) + 3
    for name in ("items", "sequences", "users", "impressions"):
        a = pl.read_parquet(tmp_path / "clean" / "prepared" / f"{name}.parquet")
        b = pl.read_parquet(tmp_path / "doubled" / "prepared" / f"{name}.parquet")
        assert a.equals(b), name
    # Dropped, not quarantined: on_bad_rows=error writes no quarantine.
    assert not (tmp_path / "doubled" / "prepared" / "quarantine").exists()


@pytest.mark.parametrize("on_bad_rows", ["error", "quarantine"])
def test_on_duplicates_error_stops_at_the_first_duplicate(tmp_path, on_bad_rows):
    raw = _write(tmp_path, behaviors=GOOD + [GOOD[3]], extra_lines="e\tten\tx\n")
    opts = dict(on_duplicates="error", on_bad_rows=on_bad_rows)
    # Line 10 is the duplicate, line 11 a bad timestamp (quarantined in quarantine mode).
    with pytest.raises(DataError, match=r"behaviors.tsv:10: duplicate event") as err:
        _prepare(tmp_path, raw, **opts)
    assert "set prepare.on_duplicates=drop" in str(err.value)
    assert "\n" not in str(err.value)


def test_on_duplicates_is_checked():
    with pytest.raises(
        ValueError, match="prepare.on_duplicates = 'keep' is out of range: must be drop or error"
    ):
        PrepareConfig(on_duplicates="keep")


def test_errors_name_the_file_the_user_gave(tmp_path):
    """After `ptum ingest` of a generic directory, prepare's errors name the user's file (not
    the copy under data/raw/) and its line."""
    src = _write(tmp_path, extra_lines="a\t100\n")
    ingest(source="generic", path=str(src), out_dir=tmp_path / "ingested")
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tmp_path / "ingested")
    assert err.value.path == str(src / "behaviors.tsv") and err.value.line == 10
    assert str(err.value).startswith(f"{src / 'behaviors.tsv'}:10: wrong number of")


def test_ptum_tsv_errors_name_the_line_of_behavior_tsv(tmp_path):
    """ptum_tsv is converted to Parquet at ingest; prepare's errors still name behavior.tsv and
    its line (not a Parquet row number), and the report names it as the source."""
    f = tmp_path / "behavior.tsv"
    sep = "#|NTABN|#"
    f.write_text(
        f"u1\tx\tfirst{sep}second\t100{sep}200\nu2\tx\tone{sep} {sep}three\t50{sep}60{sep}70\n",
        encoding="utf-8",
    )
    ingest(source="ptum_tsv", path=str(f), out_dir=tmp_path / "raw")
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tmp_path / "raw")
    assert str(err.value).startswith(f"{f}:2: empty text [empty_text]")
    report = _prepare(tmp_path, tmp_path / "raw", on_bad_rows="quarantine")
    assert report["behaviors"]["source"] == str(f)
    assert report["behaviors"]["rows_dropped"] == {"empty_text": 1}
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert q["source_line"].to_list() == [2]


def test_quarantine_keeps_the_raw_line_verbatim(tmp_path):
    extra = b"d\t10\ne\tten\tx\nf\t11\tbad \xff bytes\n"
    raw = _write(tmp_path, extra_lines=extra)
    _prepare(tmp_path, raw, on_bad_rows="quarantine")
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert q["line"].to_list() == [10, 11, 12]
    assert q["reason"].to_list() == ["malformed_line", "bad_timestamp", "bad_utf8"]
    assert q["raw"].to_list() == extra.rstrip(b"\n").split(b"\n")
    # Parquet input: the row as it was stored, bad value included.
    pq_raw = tmp_path / "pq"
    pq_raw.mkdir()
    pl.DataFrame(
        {"user_id": ["a", "b"], "timestamp": ["1", "ten"], "text": ["x", "y"]}
    ).write_parquet(pq_raw / "behaviors.parquet")
    prepare(pq_raw, tmp_path / "pq_out", prepare_options(PrepareConfig(on_bad_rows="quarantine")))
    q = pl.read_parquet(tmp_path / "pq_out" / "quarantine" / "behaviors.parquet")
    assert json.loads(q["raw"][0]) == {"user_id": "b", "timestamp": "ten", "text": "y"}


def test_a_very_long_text_is_kept_with_one_warning(tmp_path, capsys):
    from ptum.data.prepare.validate import LONG_TEXT

    long = "x" * (LONG_TEXT + 1)
    rows = GOOD + [["c", 140, long], ["a", 150, long + "y"]]
    raw = _write(tmp_path, behaviors=rows)
    report = _prepare(tmp_path, raw)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{raw / 'behaviors.tsv'}:10: 2 behaviors text(s) longer than 10,000" in err[0]
    assert "kept unchanged" in err[0]
    assert report["behaviors"]["long_texts"] == 2
    items = pl.read_parquet(tmp_path / "prepared" / "items.parquet")
    assert {long, long + "y"} <= set(items["text"])


GARBAGE = bytes(range(255, -1, -1)) * 4  # not UTF-8 text (0xff first), not Parquet


@pytest.mark.parametrize(
    "name, data, problem",
    [
        ("behaviors.tsv", b"", r"behaviors.tsv:1: empty file or missing header line"),
        ("behaviors.tsv", GARBAGE, r"behaviors.tsv:1: header line is not valid UTF-8"),
        ("behaviors.parquet", b"", r"behaviors.parquet: not a readable Parquet file \(polars "),
        ("behaviors.parquet", GARBAGE, r"behaviors.parquet: not a readable Parquet file \(polars"),
        (
            "behaviors.tsv",
            b"user_id\ttext\n",
            r"behaviors.tsv:1: missing column\(s\) \['timestamp'",
        ),
    ],
)
def test_ingest_refuses_a_generic_table_that_is_not_one_naming_the_users_file(
    tmp_path, name, data, problem
):
    src = tmp_path / "mine"
    src.mkdir()
    (src / name).write_bytes(data)
    with pytest.raises(DataError, match=problem) as err:
        ingest(source="generic", path=str(src), out_dir=tmp_path / "raw")
    assert err.value.path == str(src / name)  # the user's file, not the copy in raw/
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", r"behavior.tsv: no behaviors: the file is empty or has only blank lines"),
        (b"\n  \n", r"behavior.tsv: no behaviors: the file is empty or has only blank lines"),
        (GARBAGE, r"behavior.tsv:1: bytes that are not valid UTF-8"),
    ],
)
def test_ingest_refuses_an_empty_or_garbage_ptum_tsv_naming_it(tmp_path, data, problem):
    f = tmp_path / "behavior.tsv"
    f.write_bytes(data)
    with pytest.raises(DataError, match=problem) as err:
        ingest(source="ptum_tsv", path=str(f), out_dir=tmp_path / "raw")
    assert err.value.path == str(f)
    assert not (tmp_path / "raw").exists()


def test_a_byte_order_mark_before_the_header_is_not_part_of_the_first_column(tmp_path):
    # Excel and Notepad write one: "missing column(s) ['user_id']" named a column the file has.
    raw = _write(tmp_path)
    (raw / "behaviors.tsv").write_bytes(b"\xef\xbb\xbf" + (raw / "behaviors.tsv").read_bytes())
    (tmp_path / "plain").mkdir()
    plain = _write(tmp_path / "plain")
    _prepare(tmp_path, raw)
    _prepare(tmp_path / "plain", plain)
    for table in ("sequences", "items", "users"):
        with_bom = pl.read_parquet(tmp_path / "prepared" / f"{table}.parquet")
        assert with_bom.height > 0
        assert with_bom.equals(
            pl.read_parquet(tmp_path / "plain" / "prepared" / f"{table}.parquet")
        )


def test_a_table_in_two_files_is_refused_not_guessed(tmp_path):
    # behaviors.tsv beside an older behaviors.parquet: the Parquet file was read, silently.
    raw = _write(tmp_path)
    pl.DataFrame(GOOD[:2], schema=["user_id", "timestamp", "text"], orient="row").write_parquet(
        raw / "behaviors.parquet"
    )
    with pytest.raises(
        DataError,
        match=r"behaviors.parquet and behaviors.tsv both hold table 'behaviors' .*keep one",
    ):
        ingest(source="generic", path=str(raw), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
