"""The tables `prepare` reads, and where their rows came from: the ingest manifest
(data/raw/manifest.json) names the file the user gave for each ingested file, so messages point
at that file and its lines rather than at the copy under data/raw/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptum.data import generic
from ptum.data.errors import DataError

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


def find_sources(raw_dir: Path) -> dict[str, Source | None]:
    """Each table's Source in `raw_dir` (None: no such table). Raises if there are no
    behaviors."""
    manifest = read_manifest(raw_dir)
    origins = manifest.get("origins", {}) if manifest else {}
    sources: dict[str, Source | None] = {}
    for table in TABLES:
        path = generic.find_table(raw_dir, table)
        origin = Path(origins[path.name]) if path is not None and path.name in origins else path
        sources[table] = Source(path, origin) if path is not None else None
    if sources["behaviors"] is None:
        raise DataError(raw_dir, None, "no behaviors table (behaviors.parquet or behaviors.tsv)")
    return sources


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
