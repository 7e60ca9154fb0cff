"""Bad input that once gave a traceback (or was silently accepted): each is now one DataError
naming the file, the line (or row) and what to do; valid input around it reads as before."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest

from ptum.config import PrepareConfig
from ptum.data.errors import DataError
from ptum.data.ingest import ingest, read_ptum_tsv
from ptum.data.prepare import prepare
from ptum.stages.prepare import prepare_options

SEP = "#|NTABN|#"
BEHAVIORS = "user_id\ttimestamp\ttext\na\t100\tred apple\na\t200\tgreen tea\nb\t150\tjazz night\n"


def _dir(tmp_path, files: dict, name: str = "raw"):
    """A directory holding `files` (name -> str, bytes or a DataFrame written as Parquet)."""
    d = tmp_path / name
    d.mkdir()
    for fname, data in files.items():
        if isinstance(data, pl.DataFrame):
            data.write_parquet(d / fname)
        else:
            (d / fname).write_bytes(data.encode() if isinstance(data, str) else data)
    return d


def _prepare(tmp_path, raw, out="prepared", **kw):
    opts = prepare_options(PrepareConfig(demo_split=(0.34, 0.33, 0.33), **kw))
    return prepare(raw, tmp_path / out, opts)


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _ml_1m(tmp_path, ratings: str):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "movies.dat").write_text("3::Movie (1999)::Comedy\n4::Other (2001)::Drama\n")
    (d / "users.dat").write_text("2::M::25::3::12345\n5::F::18::1::12345\n")
    (d / "ratings.dat").write_text(ratings)
    return d


# ------------------------------------------------------------ 1. timestamps beyond 64 bits


def test_a_ptum_tsv_timestamp_beyond_64_bits_names_file_and_line(tmp_path):
    f = tmp_path / "behavior.tsv"
    f.write_text(f"u1\tx\ta\t1\nu3\tx\ta{SEP}b\t1{SEP}99999999999999999999\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_ptum_tsv(f)
    assert (err.value.path, err.value.line) == (str(f), 2)
    assert "is not a non-negative integer that fits in 64 bits" in _one_line(err)


@pytest.mark.parametrize(
    ("rating", "field"),
    [("2::3::4::99999999999999999999", "timestamp"), ("2::3::99999999999999999999::5", "rating")],
)
def test_a_movielens_number_beyond_64_bits_names_file_and_line(tmp_path, rating, field):
    d = _ml_1m(tmp_path, f"2::3::4::978300000\n{rating}\n")
    with pytest.raises(DataError) as err:
        ingest(source="movielens", path=str(d), out_dir=tmp_path / "out")
    assert (err.value.path, err.value.line) == (str(d / "ratings.dat"), 2)
    assert _one_line(err).startswith(f"{d / 'ratings.dat'}:2: {field} ")
    assert "fits in 64 bits" in str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------ 2. a raw manifest of the wrong shape


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        "manifest",
        {"files": {"behaviors.tsv": 5}},
        {"files": ["behaviors.tsv"]},
        {"files": "DIGEST", "origins": [1]},
        {"files": "DIGEST", "origins": {"behaviors.tsv": 1}},
        {"files": "DIGEST", "origins": "behaviors.tsv"},
        {"files": {"../behaviors.tsv": "DIGEST"}},
    ],
)
def test_a_raw_manifest_of_the_wrong_shape_says_to_rerun_ingest(tmp_path, manifest):
    raw = _dir(tmp_path, {"behaviors.tsv": BEHAVIORS})
    digest = hashlib.sha256(BEHAVIORS.encode()).hexdigest()
    text = json.dumps(manifest).replace('"DIGEST"', json.dumps({"behaviors.tsv": digest}))
    text = text.replace("DIGEST", digest)
    (raw / "manifest.json").write_text(text)
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    msg = _one_line(err)
    assert msg.startswith(f"{raw / 'manifest.json'}: not a manifest written by `ptum ingest` (")
    assert msg.endswith("rerun `ptum ingest`")


def test_a_manifest_written_by_ingest_still_reads(tmp_path):
    src = _dir(tmp_path, {"behaviors.tsv": BEHAVIORS}, "src")
    ingest(source="generic", path=str(src), out_dir=tmp_path / "raw")
    assert _prepare(tmp_path, tmp_path / "raw")["behaviors"]["rows_kept"] == 3


# ------------------------------------- 3. extra columns whose names collide with ours are ignored


@pytest.mark.parametrize("extra", ["line", "reason", "__raw", "__fields", "__reason", "split"])
def test_an_extra_tsv_column_of_any_name_is_ignored(tmp_path, extra):
    """A behaviors column named like one of prepare's own neither breaks it nor moves the line
    its errors name; with the bad line gone, the outputs equal those of the file without it."""
    rows = ["a\t100\tred apple\t7", "a\tbad\tgreen tea\t7", "b\t150\tjazz night\t7"]
    raw = _dir(
        tmp_path, {"behaviors.tsv": f"user_id\ttimestamp\ttext\t{extra}\n" + "\n".join(rows)}
    )
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert _one_line(err).startswith(f"{raw / 'behaviors.tsv'}:3: timestamp is not")
    (raw / "behaviors.tsv").write_text(
        f"user_id\ttimestamp\ttext\t{extra}\n" + "\n".join(rows[:1] + rows[2:]) + "\n"
    )
    plain = _dir(
        tmp_path,
        {"behaviors.tsv": "user_id\ttimestamp\ttext\na\t100\tred apple\nb\t150\tjazz night\n"},
        "plain",
    )
    _prepare(tmp_path, raw, "with_extra")
    _prepare(tmp_path, plain, "without")
    for name in ("items.parquet", "sequences.parquet", "users.parquet"):
        assert (tmp_path / "with_extra" / name).read_bytes() == (
            tmp_path / "without" / name
        ).read_bytes()


@pytest.mark.parametrize("extra", ["line", "__reason", "reason"])
def test_an_extra_parquet_column_of_any_name_or_type_is_ignored(tmp_path, extra):
    df = pl.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "timestamp": [1, None, 3],
            "text": ["x", "y", "z"],
            extra: [[9], [9], [9]],  # a list column, under a name of ours
        }
    )
    raw = _dir(tmp_path, {"behaviors.parquet": df})
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert _one_line(err).startswith(f"{raw / 'behaviors.parquet'} row 2: timestamp is not")
    report = _prepare(tmp_path, raw, on_bad_rows="quarantine")
    assert report["behaviors"]["rows_kept"] == 2
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert q["line"].to_list() == [2]
    assert json.loads(q["raw"][0]) == {"user_id": "a", "timestamp": None, "text": "y", extra: [9]}


@pytest.mark.parametrize("column", ["line", "reason", "split", "train_20", "__x", "source_line"])
@pytest.mark.parametrize("suffix", ["tsv", "parquet"])
def test_a_label_column_named_like_ours_is_refused_with_the_fix(tmp_path, column, suffix):
    labels = pl.DataFrame({"user_id": ["a", "b"], "gender": ["F", "M"], column: ["1", "2"]})
    files: dict = {"behaviors.tsv": BEHAVIORS}
    if suffix == "tsv":
        files["labels.tsv"] = "user_id\tgender\t" + column + "\na\tF\t1\nb\tM\t2\n"
    else:
        files["labels.parquet"] = labels
    raw = _dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    where = f"{raw / f'labels.{suffix}'}" + (":1" if suffix == "tsv" else "")
    assert _one_line(err).startswith(f"{where}: label column(s) [{column!r}] have a name")
    assert str(err.value).endswith("rename them")


# ------------------------------------------------------------------------ 4. the byte 0x1F


@pytest.mark.parametrize("bad", [b"c\t300\ta\x1fb\n", b"c\t300\tab\x1f\n", b"c\t300\t\x1f\x1fab\n"])
def test_the_control_byte_0x1f_names_file_and_line(tmp_path, bad):
    raw = _dir(tmp_path, {"behaviors.tsv": BEHAVIORS.encode() + bad + b"d\t400\tlast\n"})
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert (err.value.path, err.value.line) == (str(raw / "behaviors.tsv"), 5)
    assert "contains the control byte 0x1F, which ptum cannot read: remove it" in _one_line(err)
    report = _prepare(tmp_path, raw, on_bad_rows="quarantine")
    assert report["behaviors"]["rows_dropped"] == {"control_byte": 1}
    assert report["behaviors"]["rows_kept"] == 4  # the line after it reads as ever
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert q["line"].to_list() == [5] and q["raw"].to_list() == [bad.rstrip(b"\n")]


def test_the_control_byte_0x1f_in_the_header_names_line_1(tmp_path):
    raw = _dir(tmp_path, {"behaviors.tsv": b"user_id\ttimestamp\ttext\tx\x1fy\na\t1\tb\tc\n"})
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert (err.value.line, "0x1F" in _one_line(err)) == (1, True)


# ------------------------------------------------------------- 5. U+FFFD written as itself


def test_a_valid_replacement_character_is_text_not_bad_bytes(tmp_path):
    raw = _dir(tmp_path, {"behaviors.tsv": BEHAVIORS + "c\t300\ta \ufffd b\n"})
    report = _prepare(tmp_path, raw)
    assert report["behaviors"]["rows_kept"] == 4
    items = pl.read_parquet(tmp_path / "prepared" / "items.parquet")
    assert "a \ufffd b" in items["text"].to_list()


def test_bad_bytes_are_still_refused_beside_a_valid_replacement_character(tmp_path):
    data = BEHAVIORS.encode() + "c\t300\ta \ufffd b\n".encode() + b"d\t400\tbad \xff \xef\xbf\xbd\n"
    raw = _dir(tmp_path, {"behaviors.tsv": data})
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert (err.value.line, "[bad_utf8]" in _one_line(err)) == (6, True)


# --------------------------------------------------------------- 6. Parquet column types


@pytest.mark.parametrize(
    ("table", "column", "values", "expected"),
    [
        ("behaviors", "text", [["x"], ["y"]], "expected a string (or integer) column"),
        ("behaviors", "user_id", [{"a": 1}, {"a": 2}], "expected a string (or integer) column"),
        ("behaviors", "timestamp", [1.5, 2.0], "expected an integer column"),
        ("impressions", "clicked", [[1], [0]], "expected an integer column (0 or 1)"),
        ("labels", "gender", [[1], [2]], "expected a string (or integer) column"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_names_file_column_and_type(
    tmp_path, table, column, values, expected
):
    base = {
        "behaviors": {"user_id": ["a", "b"], "timestamp": [1, 2], "text": ["x", "y"]},
        "impressions": {
            "user_id": ["a", "b"],
            "timestamp": [3, 4],
            "text": ["x", "y"],
            "clicked": [1, 0],
        },
        "labels": {"user_id": ["a", "b"], "gender": ["F", "M"]},
    }[table]
    files: dict = {"behaviors.tsv": BEHAVIORS}
    files[f"{table}.parquet"] = pl.DataFrame({**base, column: values})
    if table == "behaviors":
        del files["behaviors.tsv"]
    raw = _dir(tmp_path, files)
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    msg = _one_line(err)
    assert msg.startswith(f"{raw / f'{table}.parquet'}: column {column!r} has type ")
    assert expected in msg


def test_binary_text_that_is_not_utf8_names_file_and_row(tmp_path):
    df = pl.DataFrame(
        {"user_id": ["a", "a", "b"], "timestamp": [1, 2, 3], "text": [b"x", b"y \xff", b"z"]}
    )
    raw = _dir(tmp_path, {"behaviors.parquet": df})
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, raw)
    assert _one_line(err).startswith(f"{raw / 'behaviors.parquet'} row 2: bytes that are not")
    report = _prepare(tmp_path, raw, on_bad_rows="quarantine")
    assert report["behaviors"]["rows_dropped"] == {"bad_utf8": 1}
    q = pl.read_parquet(tmp_path / "prepared" / "quarantine" / "behaviors.parquet")
    assert json.loads(q["raw"][0])["text"] == "y \\xff"


def test_binary_text_that_is_utf8_reads_as_strings(tmp_path):
    df = pl.DataFrame({"user_id": ["a", "b"], "timestamp": [1, 2], "text": ["é".encode(), b"z"]})
    raw = _dir(tmp_path, {"behaviors.parquet": df})
    assert _prepare(tmp_path, raw)["behaviors"]["rows_kept"] == 2
    items = pl.read_parquet(tmp_path / "prepared" / "items.parquet")
    assert sorted(items["text"].to_list()) == ["z", "é"]


# ------------------------------------------- 7. MovieLens-1M errors name ratings.dat and its line


def test_movielens_1m_errors_name_the_line_of_ratings_dat(tmp_path):
    """ml-1m is converted to Parquet at ingest; prepare's errors name ratings.dat and its line
    (blank lines counted), not a row of the converted copy."""
    d = _ml_1m(tmp_path, "2::3::4::978300000\n\n5::4::2::978300001\n2::3::4::-4\n")
    ingest(source="movielens", path=str(d), out_dir=tmp_path / "raw")
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tmp_path / "raw")
    assert _one_line(err).startswith(f"{d / 'ratings.dat'}:4: timestamp is not")


# ------------------------------------------------------- the chunked path reads them the same


@pytest.mark.parametrize("suffix", ["tsv", "parquet"])
def test_chunked_prepare_flags_the_same_rows_as_in_memory(tmp_path, suffix):
    """0x1F, U+FFFD written as itself, bad bytes and an extra column named `line`: prepare in
    chunks of about one user flags, quarantines and keeps exactly what the in-memory path does."""
    from tests.data.test_prepare import _same_outputs

    lines = [f"u{u}\t{100 * u + k}\ttext {u} {k}\t0" for u in range(6) for k in range(4)]
    lines[2] = "u0\t102\ta \ufffd b\t0"  # valid
    if suffix == "tsv":
        body = "\n".join(lines).encode()
        body = body.replace(b"text 3 1", b"text\x1f3 1").replace(b"text 4 2", b"text \xff 4 2")
        files = {"behaviors.tsv": b"user_id\ttimestamp\ttext\tline\n" + body + b"\n"}
        expected = {"bad_utf8": 1, "control_byte": 1}
    else:
        texts = [line.split("\t")[2].encode() for line in lines]
        texts[17] = b"text \xff 4 1"
        frame = {
            "user_id": [line.split("\t")[0] for line in lines],
            "timestamp": [int(line.split("\t")[1]) for line in lines],
            "text": texts,
            "line": [[0]] * len(lines),
        }
        files = {"behaviors.parquet": pl.DataFrame(frame)}
        expected = {"bad_utf8": 1}
    imps = "".join(f"u{u}\t{1000 + u}\tad {u}\t{u % 2}\n" for u in range(6))
    files["impressions.tsv"] = "user_id\ttimestamp\ttext\tclicked\n" + imps
    raw = _dir(tmp_path, files)
    opts = dict(max_behaviors=5, ctr_train_frac=0.3, ctr_test_frac=0.3, on_bad_rows="quarantine")
    for out, chunk_rows in (("whole", 10**6), ("chunked", 5)):
        prepare(raw, tmp_path / out, prepare_options(PrepareConfig(**opts, chunk_rows=chunk_rows)))
    _same_outputs(tmp_path / "whole", tmp_path / "chunked")
    report = json.loads((tmp_path / "chunked" / "report.json").read_text())
    assert report["behaviors"]["rows_dropped"] == expected
    a = pl.read_parquet(tmp_path / "whole" / "quarantine" / "behaviors.parquet")
    b = pl.read_parquet(tmp_path / "chunked" / "quarantine" / "behaviors.parquet")
    assert a.equals(b) and a.height == len(expected)
