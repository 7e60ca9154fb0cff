"""Ingestion: bring any source into the generic format under data/raw/.

- synthetic: generate (seeded) and write behaviors/labels/impressions.parquet; the behaviors
  are written in chunks of whole users (`synthetic.generate_chunks`), one at a time in memory.
- movielens: read a local 100K or 1M directory (or download and verify the GroupLens zip) and
  write the same three Parquet files. These are derivatives of licensed data: data/raw/ is
  ignored by git and only versioned in the local DVC cache.
- generic: copy the user's TSV/Parquet tables unchanged (so `prepare` reports true line numbers).
- ptum_tsv: convert the original PTUM `behavior.tsv` layout into a generic behaviors table.

A `manifest.json` records the source, its parameters, the SHA-256 of every output file (prepare
checks them) and, for a file copied or converted from the user's, that file (`origins`: prepare's
messages name it and its lines).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from ptum.data import generic, movielens, synthetic
from ptum.data.errors import INT64_MAX, INT64_MIN, DataError, shorten
from ptum.data.generic import SOURCE_LINE
from ptum.hashing import sha256_files
from ptum.io import atomic_dir

PTUM_SEP = "#|NTABN|#"


def read_ptum_tsv(path: Path) -> pl.DataFrame:
    """Original PTUM layout: user in column 0, texts joined by '#|NTABN|#' in column 2,
    integer timestamps joined the same way in column 3. Returns generic behaviors, with the line
    of `path` each came from (SOURCE_LINE) so that prepare's messages can name it."""
    users, stamps, texts, lines = [], [], [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    path, n, f"bytes that are not valid UTF-8 at offset {e.start}"
                ) from None
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 4:
                raise DataError(
                    path, n, f"expected at least 4 tab-separated columns, found {len(cols)}"
                )
            t = cols[2].split(PTUM_SEP)
            s = cols[3].split(PTUM_SEP)
            if len(t) != len(s):
                raise DataError(
                    path, n, f"{len(t)} texts but {len(s)} timestamps in columns 2 and 3"
                )
            for k, v in enumerate(s):
                try:
                    stamp = int(v)
                except ValueError:
                    raise DataError(
                        path, n, f"timestamp #{k + 1} {shorten(v, 40)!r} is not an integer"
                    ) from None
                if not INT64_MIN <= stamp <= INT64_MAX:
                    # Negative ones fit: prepare's row checks flag (or quarantine) them.
                    raise DataError(
                        path,
                        n,
                        f"timestamp #{k + 1} {shorten(v, 40)!r} is not a non-negative integer that "
                        "fits in 64 bits (seconds since the epoch): fix or remove it",
                    )
                stamps.append(stamp)
            users.extend([cols[0]] * len(t))
            texts.extend(t)
            lines.extend([n] * len(t))
    if not users:
        raise DataError(path, None, "no behaviors: the file is empty or has only blank lines")
    return pl.DataFrame(
        {"user_id": users, "timestamp": stamps, "text": texts, SOURCE_LINE: lines},
        schema={
            "user_id": pl.String,
            "timestamp": pl.Int64,
            "text": pl.String,
            SOURCE_LINE: pl.Int64,
        },
    )


def ingest(
    *,
    source: str,
    path: str,
    out_dir: Path,
    size: str = "small",
    seed: int = 7,
    click_threshold: int = 4,
    age_edges: tuple[int, ...] = (25, 35, 45),
    movielens_variant: str = "ml-100k",
    root: Path = Path("."),
) -> dict:
    """Write the generic tables of `source` into out_dir (replaced atomically); return manifest."""
    with atomic_dir(out_dir, marker="manifest.json") as tmp:
        info: dict = {"source": source, "path": path}
        src = (root / path).resolve() if path else None
        if source == "synthetic":
            beh, labels, imps = synthetic.generate_chunks(synthetic.spec_for(size), seed)
            write_chunks(beh, tmp / "behaviors.parquet")
            info.update(size=size, seed=seed)
            frames = {"labels": labels, "impressions": imps}
        elif source == "movielens":
            frames = _read_movielens(src, root, movielens_variant, click_threshold, age_edges, info)
        elif source == "ptum_tsv":
            if src is None or not src.is_file():
                raise DataError(
                    src or "data.path", None, "ptum_tsv needs data.path = a behavior.tsv file"
                )
            frames = {"behaviors": read_ptum_tsv(src)}
            info["origins"] = {"behaviors.parquet": str(src)}
        elif source == "generic":
            frames, info["origins"] = {}, _copy_generic(src, tmp)
        else:
            raise ValueError(f"unknown data.source {source!r}")
        for name, df in frames.items():
            df.write_parquet(tmp / f"{name}.parquet")
        info["files"] = sha256_files(tmp)
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def write_chunks(chunks: Iterator[pl.DataFrame], path: Path) -> None:
    """Write frames of one schema to one Parquet file, a row group (or more) each, holding one
    frame at a time. A single frame is written by Polars itself, so a log that fits one chunk
    gets the bytes `DataFrame.write_parquet` gives it."""
    first = next(chunks)
    second = next(chunks, None)
    if second is None:
        first.write_parquet(path)
        return
    table = first.to_arrow()
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        writer.write_table(table)
        del first, table
        for frame in itertools.chain([second], chunks):
            writer.write_table(frame.to_arrow())


def _read_movielens(
    src: Path | None,
    root: Path,
    variant: str,
    click_threshold: int,
    age_edges: tuple[int, ...],
    info: dict,
) -> dict[str, pl.DataFrame]:
    """The three tables of a MovieLens directory (downloaded into data/download when `src` is
    None); records the variant and the label parameters in `info`."""
    if src is None:
        src = movielens.download(variant, root / "data" / "download")
    elif not src.is_dir():
        raise DataError(src, None, "data.path must be a MovieLens directory")
    found = movielens.detect_variant(src)
    if found == "ml-100k":
        movielens.verify_100k(src)
    beh, labels, imps = movielens.read(src, click_threshold, age_edges)
    info.update(variant=found, click_threshold=click_threshold, age_edges=list(age_edges))
    if movielens.ORIGINS[found]:
        # Rows that carry their source line: prepare's messages name that file and line.
        info["origins"] = {out: str(src / name) for out, name in movielens.ORIGINS[found].items()}
    return {"behaviors": beh, "labels": labels, "impressions": imps}


def _copy_generic(src: Path | None, out: Path) -> dict[str, str]:
    """Copy the user's generic tables unchanged into `out`; returns {file name: its origin}."""
    if src is None or not src.is_dir():
        raise DataError(
            src or "data.path",
            None,
            "generic needs data.path = a directory with "
            "behaviors(.tsv|.parquet), optional labels and impressions",
        )
    origins = {}
    for table in ("behaviors", "labels", "impressions"):
        found = generic.find_table(src, table)
        if found is not None:
            shutil.copyfile(found, out / found.name)
            origins[found.name] = str(found)
            # Refuse what is not a table at all (garbage, an empty file, missing columns) now,
            # naming the user's file; the rows are checked by `ptum prepare`.
            generic.scan(out / found.name, table, origin=found)
    if generic.find_table(out, "behaviors") is None:
        raise DataError(src, None, "no behaviors.tsv or behaviors.parquet in this directory")
    return origins
