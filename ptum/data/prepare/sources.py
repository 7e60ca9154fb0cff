"""The tables `prepare` reads, checked against the ingest manifest (data/raw/manifest.json), and
where their rows came from.

The manifest records the SHA-256 of every file `ptum ingest` wrote: a raw file deleted, edited
or added since is an error that says to rerun `ptum ingest` (not a run on partial data). It also
names the file the user gave for each copied or converted file, so that messages point at that
file and its lines rather than at the copy under data/raw/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptum.data import generic
from ptum.data.errors import DataError
from ptum.hashing import verify_file

TABLES = ("behaviors", "labels", "impressions")


@dataclass(frozen=True)
class Source:
    """A table's file (`path`, what prepare reads) and the file the user gave (`origin`; the
    same file unless `ptum ingest` copied or converted it)."""

    path: Path
    origin: Path

    def where(self, row: dict) -> str:
        """`file:line` (or `file row N`) of a row of `path` as `generic.scan` reads it."""
        file, line, unit = generic.locate(self.path, row, self.origin)
        return f"{file}:{line}" if unit == "line" else f"{file} row {line}"


@dataclass(frozen=True)
class Sources:
    """The tables of a raw directory: behaviors always, labels and impressions when present."""

    behaviors: Source
    labels: Source | None
    impressions: Source | None


def find_sources(raw_dir: Path) -> Sources:
    """Each table's Source in `raw_dir` (None: no such table), its files verified against the
    ingest manifest when there is one. Raises if there are no behaviors."""
    manifest = read_manifest(raw_dir)
    if manifest is not None:
        verify_raw(raw_dir, manifest)
    origins = manifest.get("origins", {}) if manifest else {}
    found: dict[str, Source | None] = {}
    for table in TABLES:
        path = generic.find_table(raw_dir, table)
        found[table] = None if path is None else Source(path, Path(origins.get(path.name, path)))
    behaviors = found["behaviors"]
    if behaviors is None:
        raise DataError(raw_dir, None, "no behaviors table (behaviors.parquet or behaviors.tsv)")
    return Sources(behaviors, labels=found["labels"], impressions=found["impressions"])


def read_manifest(raw_dir: Path) -> dict | None:
    """data/raw/manifest.json as written by `ptum ingest`, or None when there is none (a
    directory of generic tables prepared directly)."""
    path = raw_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            path, None, f"not a readable ingest manifest ({e}); rerun `ptum ingest`"
        ) from None


def verify_raw(raw_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists has its recorded SHA-256, and every table file in raw_dir
    is listed; else a one-line error naming the file and saying to rerun `ptum ingest`."""
    where = raw_dir / "manifest.json"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(where, None, "lists no files; rerun `ptum ingest`")
    for name, digest in sorted(files.items()):
        verify_file(raw_dir / name, digest, where, "`ptum ingest`")
    for path in sorted(raw_dir.iterdir()):
        if path.name.split(".")[0] in TABLES and path.name not in files:
            raise DataError(
                path,
                None,
                f"not written by `ptum ingest` (not in {where}); rerun `ptum ingest`, or remove "
                "the file",
            )
