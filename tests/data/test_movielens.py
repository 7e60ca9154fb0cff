"""MovieLens readers: the real 100K end to end, a 1M-format sample, and the checksummed download."""

from __future__ import annotations

import shutil
import zipfile

import polars as pl
import pytest

from ptum.config import PrepareConfig
from ptum.data import movielens
from ptum.data.errors import DataError
from ptum.data.ingest import ingest
from ptum.data.prepare import prepare
from ptum.stages.prepare import prepare_options
from ptum.tokenize import tokenize
from tests.conftest import MOVIELENS_100K

needs_ml100k = pytest.mark.skipif(
    not (MOVIELENS_100K / "u.data").exists(), reason="../shared/data/movielens-100k not present"
)


def _distinct_texts_independently() -> tuple[int, int]:
    """Count movie ids and distinct 'title | genres' texts with plain Python (not ptum code)."""
    genres = [
        line.split("|")[0]
        for line in (MOVIELENS_100K / "u.genre").read_text(encoding="latin-1").splitlines()
        if line
    ]
    texts = {}
    for line in (MOVIELENS_100K / "u.item").read_text(encoding="latin-1").splitlines():
        f = line.split("|")
        texts[f[0]] = f[1] + " | " + ", ".join(g for g, x in zip(genres, f[5:]) if x == "1")
    return len(texts), len(set(texts.values()))


@needs_ml100k
@pytest.mark.slow
def test_movielens_100k_end_to_end(tmp_path):
    info = ingest(source="movielens", path=str(MOVIELENS_100K), out_dir=tmp_path / "raw")
    assert info["variant"] == "ml-100k"
    report = prepare(tmp_path / "raw", tmp_path / "prepared", prepare_options(PrepareConfig()))
    n_ids, n_texts = _distinct_texts_independently()
    assert (n_ids, n_texts) == (1682, 1664)
    b = report["behaviors"]
    assert b["users"] == 943
    assert b["rows_read"] == b["rows_kept"] == 100_000
    assert b["items"] == n_texts  # items are keyed by text
    labels = pl.read_parquet(tmp_path / "prepared" / "labels.parquet")
    assert labels.height == 943
    assert dict(labels.group_by("gender").len().iter_rows()) == {"M": 670, "F": 273}
    imps = pl.read_parquet(tmp_path / "prepared" / "impressions.parquet")
    # clicked = rating >= 4, from the raw file.
    raw_clicks = sum(
        int(line.split("\t")[2]) >= 4
        for line in (MOVIELENS_100K / "u.data").read_text().splitlines()
    )
    raw_imps = pl.read_parquet(tmp_path / "raw" / "impressions.parquet")
    assert int(raw_imps["clicked"].sum()) == raw_clicks
    # Global windows: the test window is the last 10% of ratings in time, after every
    # CTR-train impression; on ML-100K that is 10,000 impressions of 166 users.
    test = imps.filter(pl.col("window") == "test")
    assert test["timestamp"].min() > imps.filter(pl.col("window") != "test")["timestamp"].max()
    assert (test.height, test["user_id"].n_unique()) == (10_000, 166)
    rep = tokenize(
        tmp_path / "prepared" / "items.parquet",
        tmp_path / "tok",
        vocab_size=4000,
        model_type="unigram",
        byte_fallback=True,
        max_tokens=30,
        character_coverage=0.9995,
        seed=1,
    )
    assert rep["items"] == n_texts


@needs_ml100k
def test_age_buckets_and_text():
    beh, labels, imps = movielens.read(MOVIELENS_100K, 4, (25, 35, 45))
    assert beh.height == imps.height == 100_000
    first = labels.row(0, named=True)  # user 1: 24, M
    assert first == {"user_id": "1", "gender": "M", "age": "<25"}
    toy = beh.filter(pl.col("item_id") == "1")["text"][0]
    assert toy == "Toy Story (1995) | Animation, Children's, Comedy"
    assert movielens.age_bucket(45, (25, 35, 45)) == ">=45"
    assert movielens.age_bucket(30, (25, 35, 45)) == "25-35"


def test_movielens_1m_format(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n",
        encoding="latin-1",
    )
    (d / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::4::978300000\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    beh, labels, imps = movielens.read(d, 4, (18, 35))
    assert (
        beh.sort("timestamp")["text"].to_list()[0]
        == "Toy Story (1995) | Animation, Children's, Comedy"
    )
    assert imps["clicked"].to_list() == [1, 0, 1]
    assert labels.rows() == [("1", "F", "<18"), ("2", "M", ">=35")]
    (d / "ratings.dat").write_text("1::1::5\n")
    with pytest.raises(DataError, match=r"ratings.dat:1: expected 4 '::'-separated fields"):
        movielens.read(d, 4, (18, 35))


def test_not_a_movielens_directory(tmp_path):
    with pytest.raises(DataError, match="not a MovieLens directory"):
        ingest(source="movielens", path=str(tmp_path), out_dir=tmp_path / "out")


@needs_ml100k
def test_download_verifies_checksums(tmp_path):
    """Download from a file:// URL (no network in tests) and check the SHA-256 gate."""
    zpath = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for name in ("u.data", "u.item", "u.user"):
            z.write(MOVIELENS_100K / name, f"ml-100k/{name}")
    out = movielens.download("ml-100k", tmp_path / "dl", url=zpath.as_uri())
    assert (out / "u.data").read_bytes() == (MOVIELENS_100K / "u.data").read_bytes()

    bad = tmp_path / "bad" / "ml-100k"
    bad.mkdir(parents=True)
    for name in ("u.data", "u.item", "u.user"):
        shutil.copy(MOVIELENS_100K / name, bad / name)
    with (bad / "u.data").open("a") as f:
        f.write("1\t1\t5\t1\n")
    zbad = tmp_path / "bad.zip"
    with zipfile.ZipFile(zbad, "w") as z:
        for name in ("u.data", "u.item", "u.user"):
            z.write(bad / name, f"ml-100k/{name}")
    with pytest.raises(DataError, match="u.data: SHA-256 .* does not match the GroupLens release"):
        movielens.download("ml-100k", tmp_path / "dl2", url=zbad.as_uri())


# ---------------------------------------------------------------- download (a fake fetch: no network)


def _zip_of(members: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"ml-100k/{name}", data)
    return buf.getvalue()


@pytest.fixture
def fake_grouplens(monkeypatch):
    """ml-100k pinned to three small fake members; fetch returns what the test puts in `served`
    and records its calls."""
    import hashlib

    members = {"u.data": b"1\t1\t5\t100\n", "u.item": b"1|Toy|x|y|z\n", "u.user": b"1|24|M|x|1\n"}
    pins = {n: hashlib.sha256(b).hexdigest() for n, b in members.items()}
    monkeypatch.setitem(movielens.SHA256, "ml-100k", pins)
    served = {"blob": _zip_of(members | {"README": b"extra"}), "calls": []}

    def fetch(url, timeout_s):
        served["calls"].append((url, timeout_s))
        return served["blob"]

    monkeypatch.setattr(movielens, "_fetch", fetch)
    return members, served


def test_download_unpacks_only_verified_members(tmp_path, fake_grouplens):
    members, served = fake_grouplens
    out = movielens.download("ml-100k", tmp_path / "dl", timeout_s=7)
    assert out == tmp_path / "dl" / "ml-100k"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == members  # README not kept
    assert served["calls"] == [(movielens.URLS["ml-100k"], 7)]
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["ml-100k"]  # no temp dir left


def test_a_corrupt_download_writes_nothing(tmp_path, fake_grouplens):
    members, served = fake_grouplens
    good = movielens.download("ml-100k", tmp_path / "dl")
    served["blob"] = _zip_of(members | {"u.user": b"1|24|F|x|1\n"})
    with pytest.raises(DataError, match=r"u.user: SHA-256 .* nothing was written"):
        movielens.download("ml-100k", tmp_path / "dl")
    # The earlier good copy is untouched and no partial directory is left.
    assert {p.name: p.read_bytes() for p in good.iterdir()} == members
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["ml-100k"]
    served["blob"] = b"not a zip"
    with pytest.raises(DataError, match="not a zip file"):
        movielens.download("ml-100k", tmp_path / "dl")


def test_ml_1m_download_is_refused_without_pinned_hashes(tmp_path, fake_grouplens):
    _, served = fake_grouplens
    with pytest.raises(DataError, match=r"ml-1m is not downloaded: .* set data.path") as err:
        movielens.download("ml-1m", tmp_path / "dl")
    assert "ratings.dat, movies.dat, users.dat" in str(err.value)
    assert served["calls"] == [] and not (tmp_path / "dl").exists()


def test_fetch_has_a_timeout(tmp_path, monkeypatch):
    """The real fetch passes its timeout to urlopen and turns a timeout into a DataError."""

    def urlopen(url, timeout):
        assert timeout == 3
        raise TimeoutError("timed out")

    monkeypatch.setattr(movielens.urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError, match=r"download failed \(timed out after 3 s\)"):
        movielens._fetch("https://example.invalid/ml-100k.zip", 3)
