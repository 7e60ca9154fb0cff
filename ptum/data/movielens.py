"""MovieLens-100K and MovieLens-1M readers, and the checksummed GroupLens download (100K only).

Behaviors are rated movies ordered by time; a behavior's text is the movie title plus its genres
("Toy Story (1995) | Animation, Children's, Comedy"). Labels are gender and an age bucket
(edges are a parameter). Impressions are the same ratings with clicked = rating >= threshold;
`prepare` keeps only those in the CTR time windows.

Items are keyed by *text* downstream (ptum.data.prepare): on MovieLens-100K the 1,682 movie ids
carry 1,664 distinct texts, because a few movies appear twice under two ids with the same title.
The behavior encoder only sees text, so two ids with one text are the same item to the model;
keying by text keeps such twins from ever being each other's negative. The source's movie id is
kept in the `item_id` column so that two genuine ratings of the twins at the same second are not
mistaken for a duplicated event.

The MovieLens license forbids redistribution: nothing here is ever written into the repository;
ingest writes to data/raw/ (ignored by git, versioned by DVC locally).
"""

from __future__ import annotations

import io
import time
import urllib.request
import zipfile
from pathlib import Path

import polars as pl

from ptum.data.errors import INT64_MAX, INT64_MIN, DataError, shorten
from ptum.data.generic import SOURCE_LINE
from ptum.hashing import sha256_bytes, sha256_file
from ptum.io import atomic_dir

GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# ML-1M users.dat codes its ages as the lower edge of a bucket: 1 = "under 18", 18 = 18-24, ...
URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
# SHA-256 of the member files of the canonical ml-100k.zip (unmodified GroupLens release).
SHA256_100K = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}
# Pinned SHA-256 of the member files a download is checked against. ml-1m has none yet (they
# could not be computed here, offline), so ml-1m is never downloaded: the user unpacks it.
SHA256 = {"ml-100k": SHA256_100K, "ml-1m": {}}
MEMBERS = {"ml-100k": tuple(SHA256_100K), "ml-1m": ("ratings.dat", "movies.dat", "users.dat")}
DOWNLOAD_TIMEOUT_S = 120.0
# The file of a variant that each converted table comes from, when its rows carry the line of
# that file (SOURCE_LINE): ingest records it in the manifest so that prepare's messages name
# it. ml-100k records none: its files are checked against the release's SHA-256 at ingest,
# and its converted tables stay byte for byte what they were.
ORIGINS = {
    "ml-100k": {},
    "ml-1m": {"behaviors.parquet": "ratings.dat", "impressions.parquet": "ratings.dat"},
}


def detect_variant(path: Path) -> str:
    """'ml-100k' if the directory holds u.data, 'ml-1m' if ratings.dat; else a clear error."""
    if (path / "u.data").exists():
        return "ml-100k"
    if (path / "ratings.dat").exists():
        return "ml-1m"
    raise DataError(
        path, None, "not a MovieLens directory: neither u.data (100K) nor ratings.dat (1M) is there"
    )


def age_bucket(age: int, edges: tuple[int, ...]) -> str:
    """Bucket label for an age: '<25', '25-35', ..., '>=45' for edges (25, 35, 45)."""
    if age < edges[0]:
        return f"<{edges[0]}"
    for lo, hi in zip(edges, edges[1:]):
        if lo <= age < hi:
            return f"{lo}-{hi}"
    return f">={edges[-1]}"


def _lines(path: Path, encoding: str = "latin-1"):
    """(line number, text) for each non-empty line; missing file is a DataError."""
    if not path.exists():
        raise DataError(path, None, "file is missing")
    with path.open(encoding=encoding, newline="") as f:
        for n, raw in enumerate(f, start=1):
            text = raw.rstrip("\r\n")
            if text:
                yield n, text


def _int(path: Path, n: int, field: str, value: str) -> int:
    shown = shorten(value, 40)
    try:
        number = int(value)
    except ValueError:
        raise DataError(path, n, f"{field} {shown!r} is not an integer") from None
    if not INT64_MIN <= number <= INT64_MAX:
        # Negative timestamps fit: prepare's row checks flag (or quarantine) them.
        kind = "a non-negative integer" if field == "timestamp" else "an integer"
        raise DataError(path, n, f"{field} {shown!r} is not {kind} that fits in 64 bits")
    return number


def read_100k(path: Path, click_threshold: int, age_edges: tuple[int, ...]):
    """Read u.data / u.item / u.user into generic (behaviors, labels, impressions) frames."""
    texts: dict[int, str] = {}
    for n, line in _lines(path / "u.item"):
        f = line.split("|")
        if len(f) != 5 + len(GENRES_100K):
            raise DataError(
                path / "u.item",
                n,
                f"expected {5 + len(GENRES_100K)} '|'-separated fields, found {len(f)}",
            )
        genres = [g for g, flag in zip(GENRES_100K, f[5:]) if flag == "1"]
        texts[_int(path / "u.item", n, "movie id", f[0])] = f"{f[1]} | {', '.join(genres)}"
    users, items, ts, ratings = [], [], [], []
    for n, line in _lines(path / "u.data"):
        f = line.split("\t")
        if len(f) != 4:
            raise DataError(path / "u.data", n, f"expected 4 tab-separated fields, found {len(f)}")
        u, i, r, t = (
            _int(path / "u.data", n, name, v)
            for name, v in zip(("user id", "movie id", "rating", "timestamp"), f)
        )
        if i not in texts:
            raise DataError(path / "u.data", n, f"movie id {i} is not in u.item")
        users.append(str(u))
        items.append(i)
        ratings.append(r)
        ts.append(t)
    label_rows = []
    for n, line in _lines(path / "u.user"):
        f = line.split("|")
        if len(f) != 5:
            raise DataError(path / "u.user", n, f"expected 5 '|'-separated fields, found {len(f)}")
        age = _int(path / "u.user", n, "age", f[1])
        label_rows.append((f[0], f[2], age_bucket(age, age_edges)))
    return _frames(users, items, ts, ratings, texts, label_rows, click_threshold)


def read_1m(path: Path, click_threshold: int, age_edges: tuple[int, ...]):
    """Read ratings.dat / movies.dat / users.dat (MovieLens-1M, '::'-separated)."""
    texts: dict[int, str] = {}
    for n, line in _lines(path / "movies.dat"):
        f = line.split("::")
        if len(f) != 3:
            raise DataError(
                path / "movies.dat", n, f"expected 3 '::'-separated fields, found {len(f)}"
            )
        texts[_int(path / "movies.dat", n, "movie id", f[0])] = (
            f"{f[1]} | {', '.join(f[2].split('|'))}"
        )
    users, items, ts, ratings, lines = [], [], [], [], []
    for n, line in _lines(path / "ratings.dat"):
        f = line.split("::")
        if len(f) != 4:
            raise DataError(
                path / "ratings.dat", n, f"expected 4 '::'-separated fields, found {len(f)}"
            )
        u, i, r, t = (
            _int(path / "ratings.dat", n, name, v)
            for name, v in zip(("user id", "movie id", "rating", "timestamp"), f)
        )
        if i not in texts:
            raise DataError(path / "ratings.dat", n, f"movie id {i} is not in movies.dat")
        users.append(str(u))
        items.append(i)
        ratings.append(r)
        ts.append(t)
        lines.append(n)
    label_rows = []
    for n, line in _lines(path / "users.dat"):
        f = line.split("::")
        if len(f) != 5:
            raise DataError(
                path / "users.dat", n, f"expected 5 '::'-separated fields, found {len(f)}"
            )
        # ML-1M ages are already coarse codes (1, 18, 25, 35, 45, 50, 56): bucket the code.
        label_rows.append(
            (f[0], f[1], age_bucket(_int(path / "users.dat", n, "age", f[2]), age_edges))
        )
    return _frames(users, items, ts, ratings, texts, label_rows, click_threshold, lines)


def _frames(users, items, ts, ratings, texts, label_rows, click_threshold, lines=None):
    """The generic frames of parsed ratings; `lines` (when given): the line of the ratings file
    each rating came from, kept as SOURCE_LINE in behaviors and impressions."""
    ratings_df = pl.DataFrame(
        {"user_id": users, "timestamp": ts, "item_id": items, "rating": ratings},
        schema={
            "user_id": pl.String,
            "timestamp": pl.Int64,
            "item_id": pl.Int64,
            "rating": pl.Int64,
        },
    ).with_columns(text=pl.col("item_id").replace_strict(texts, return_dtype=pl.String))
    where = []
    if lines is not None:
        ratings_df = ratings_df.with_columns(pl.Series(SOURCE_LINE, lines, dtype=pl.Int64))
        where = [SOURCE_LINE]
    behaviors = ratings_df.select(
        "user_id", "timestamp", "text", pl.col("item_id").cast(pl.String), *where
    )
    impressions = ratings_df.select(
        "user_id",
        "timestamp",
        "text",
        (pl.col("rating") >= click_threshold).cast(pl.Int8).alias("clicked"),
        pl.col("item_id").cast(pl.String),
        *where,
    )
    labels = pl.DataFrame(label_rows, schema=["user_id", "gender", "age"], orient="row")
    return behaviors, labels, impressions


def read(path: Path, click_threshold: int = 4, age_edges: tuple[int, ...] = (25, 35, 45)):
    """Read a MovieLens directory (100K or 1M layout) into generic-format frames."""
    if list(age_edges) != sorted(set(age_edges)) or not age_edges:
        raise ValueError(f"age_edges must be strictly increasing and non-empty, got {age_edges}")
    variant = detect_variant(path)
    reader = read_100k if variant == "ml-100k" else read_1m
    return reader(path, click_threshold, age_edges)


def verify_100k(path: Path) -> None:
    """Check u.data/u.item/u.user against the canonical release's SHA-256 (a DataError if not)."""
    for name, expected in SHA256_100K.items():
        got = sha256_file(path / name)
        if got != expected:
            raise DataError(
                path / name,
                None,
                f"SHA-256 {got} does not match the GroupLens "
                f"release ({expected}): the file is corrupt or modified",
            )


def download(
    variant: str,
    dest: Path,
    url: str | None = None,
    *,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download a GroupLens zip and unpack its verified member files into dest/<variant>.

    The zip is read into memory (within `timeout_s` seconds in all) and its members are
    unpacked into a temporary directory beside the target; only once every pinned member has
    its SHA-256 (SHA256[variant]) are they moved into place, replacing an earlier copy. Nothing
    else from the zip is kept. A variant without pinned hashes (ml-1m: GroupLens publishes an
    MD5 only, served by the same server as the zip, which proves nothing) is refused: unpack
    it yourself and set data.path.
    """
    pinned = SHA256.get(variant)
    url = url or URLS[variant]
    if not pinned:
        raise DataError(
            url,
            None,
            f"{variant} is not downloaded: ptum has no pinned SHA-256 for its files to check "
            f"the download against; download and unpack it yourself and set data.path to the "
            f"directory with {', '.join(MEMBERS[variant])}",
        )
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / variant
    blob = _fetch(url, timeout_s)
    with atomic_dir(target, marker=MEMBERS[variant][0]) as tmp:
        _unpack_verified(blob, url, pinned, tmp)
    return target


def _fetch(url: str, timeout_s: float) -> bytes:
    """The bytes at `url`, read within `timeout_s` seconds in all (a DataError if not)."""
    deadline = time.monotonic() + timeout_s
    parts = []
    try:
        # A fixed https URL, or a file:// URL in tests.
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310
            while block := r.read(1 << 20):
                parts.append(block)
                if time.monotonic() > deadline:
                    raise TimeoutError
    except (TimeoutError, OSError) as e:
        why = f"timed out after {timeout_s:g} s" if isinstance(e, TimeoutError) else str(e)
        raise DataError(url, None, f"download failed ({why}); retry, or set data.path") from None
    return b"".join(parts)


def _unpack_verified(blob: bytes, url: str, pinned: dict[str, str], out: Path) -> None:
    """Write the pinned members of the zip `blob` into `out`, each checked against its SHA-256
    before it is written (a DataError naming the member otherwise)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        raise DataError(url, None, "not a zip file") from None
    with z:
        # Member names are reduced to their base name: no path in the zip reaches the disk.
        members = {Path(m).name: m for m in z.namelist() if not m.endswith("/")}
        for name, expected in pinned.items():
            if name not in members:
                raise DataError(url, None, f"the zip has no member {name}")
            data = z.read(members[name])
            got = sha256_bytes(data)
            if got != expected:
                raise DataError(
                    f"{url}:{name}",
                    None,
                    f"SHA-256 {got} does not match the GroupLens release ({expected}): the "
                    "download is corrupt or modified; nothing was written",
                )
            (out / name).write_bytes(data)
