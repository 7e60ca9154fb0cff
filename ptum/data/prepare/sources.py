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

from ptum.data import bad_rows, generic
from ptum.data.errors import DataError, shorten
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
        file, line, unit = bad_rows.locate(self.path, row, self.origin)
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
    origins = (manifest.get("origins") or {}) if manifest else {}
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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            path, None, f"not a readable ingest manifest ({e}); rerun `ptum ingest`"
        ) from None
    _check_shape(path, manifest)
    return manifest


def _check_shape(path: Path, manifest: object) -> None:
    """A DataError unless `manifest` has the shape `ptum ingest` writes: an object whose
    `files` (when present) maps plain file names to SHA-256 strings and whose `origins` (when
    present) maps plain file names to paths. A missing or empty `files` is left to verify_raw."""
    why = None
    if not isinstance(manifest, dict):
        why = f"a JSON {_json_type(manifest)}, not an object"
    else:
        for key, value_kind in (("files", "a SHA-256"), ("origins", "a path")):
            entries = manifest.get(key)
            if entries is None or (key == "files" and not entries):
                continue
            if not isinstance(entries, dict):
                why = f"{key!r} is a JSON {_json_type(entries)}, not an object"
                break
            bad = next(
                (
                    (name, value)
                    for name, value in entries.items()
                    if not _plain_name(name) or not isinstance(value, str) or not value
                ),
                None,
            )
            if bad is not None:
                name, value = bad
                why = (
                    f"{key} entry {name!r} is not a file name"
                    if not _plain_name(name)
                    else f"{key}[{name!r}] is {shorten(json.dumps(value), 60)}, not {value_kind}"
                )
                break
    if why is not None:
        raise DataError(
            path, None, f"not a manifest written by `ptum ingest` ({why}): rerun `ptum ingest`"
        )


def _plain_name(name: str) -> bool:
    """A file name directly inside the raw directory (no folder, no '..')."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _json_type(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else "boolean"
    return {list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def verify_raw(raw_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists has its recorded SHA-256, and every table file in raw_dir
    is listed; else a one-line error naming the file and saying to rerun `ptum ingest`."""
    where = raw_dir / "manifest.json"
    _check_shape(where, manifest)
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
