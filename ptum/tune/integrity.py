"""What the tune stage checks in the study it reads: the database, then every stored value.

A study is read back by every run (to resume it, to sample from it, to choose best_params.json)
and its SQLite file is a DVC output, so it can be damaged on disk or edited like any input:

- the database: a SQLite file's header and SQLite's `PRAGMA integrity_check` before Optuna
  opens it, then anything Optuna cannot decode while it reads the study (the JSON of
  distributions and attrs, dates, text): a `StudyDamaged` naming the file and what to do, not
  a SQLAlchemy traceback. A PostgreSQL database is the server's to keep sound: it is only
  connected to once before any work (`ptum.tune.database.check_reachable`), and a row Optuna
  cannot decode is named as an edited or damaged row, with PostgreSQL's fixes, never as a
  damaged file;
- the values (either database): each objective is a validation metric with a known range
  (`objective_range`: accuracy, macro-F1, AUC, all in [0, 1]); a stored trial value or
  intermediate value outside it, or not finite (two flipped bytes of a float give 25206.15),
  is refused with the trial's number, never sampled from nor written to best_params.json.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError

from ptum.tune.database import check_reachable, sqlalchemy_url, sqlite_file, store_name
from ptum.tune.trial import objective_range

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
# What SQLite says about a file that is not (or no longer) a database Optuna can read.
_DAMAGE_MESSAGES = (
    "malformed",
    "not a database",
    "could not decode",
    "disk image",
    "encrypted",
    "no such column",  # a damaged schema: the columns of this Optuna version are missing
    "no such table",
)

_DECODING = (
    json.JSONDecodeError,
    UnicodeDecodeError,
    LookupError,
    ValueError,
    TypeError,
    AssertionError,
)


class StudyDamaged(ValueError):
    """The study's storage cannot be trusted: a damaged file or an impossible stored value."""


def _damaged(url: str) -> str:
    """What a study that does not decode or holds impossible values means, in this database:
    a SQLite file can be damaged on disk; a PostgreSQL server keeps its own files sound."""
    what = "the database" if sqlite_file(url) is not None else "a stored row"
    return f"{what} was damaged or edited"


def _fix(url: str) -> str:
    path = sqlite_file(url)
    if path is None:
        return (
            "restore the database from a backup, or delete the study to start it over "
            f"(`optuna delete-study --storage {store_name(sqlalchemy_url(url))} --study-name "
            "NAME`), or set "
            "another tune.study_name"
        )
    return (
        f"move it aside (`mv {path} {path}.damaged`) and rerun to start the study over, or "
        f"restore a good copy (`dvc checkout {path.parent}` when DVC tracks it)"
    )


def check_store(url: str) -> None:
    """Check the study's database before any work: refuse a SQLite file that is not a database
    or fails `PRAGMA integrity_check`; connect to a PostgreSQL database once (a
    `StorageUnreachable` line when that fails).

    No-op for a SQLite file that does not exist yet or is empty (a new study).
    """
    check_reachable(url)
    path = sqlite_file(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        why = f"not a SQLite database (it starts with {head[:16]!r})"
        raise StudyDamaged(f"{path}: {why}; the study cannot be read: {_fix(url)}")
    try:
        con = sqlite3.connect(path, timeout=60)
        try:
            # Damaged text must not fail the decoding of SQLite's own report of it.
            con.text_factory = lambda b: b.decode(errors="replace")
            rows = con.execute("PRAGMA integrity_check").fetchall()
        finally:
            con.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        if "locked" in str(exc):
            raise  # busy for 60 s: not damage
        rows = [(str(exc),)]
    if rows != [("ok",)]:
        why = "; ".join(str(r[0]) for r in rows[:2])
        raise StudyDamaged(
            f"{path}: a damaged SQLite database (integrity check: {why}); the study cannot be "
            f"read: {_fix(url)}"
        )


def _damage(exc: BaseException | None, *, sqlite: bool) -> str | None:
    """What `exc` (or its cause) says when the stored study cannot be decoded; None for other
    errors (a connection refused, a lock held too long). SQLite's own errors are damage only
    for a SQLite file: PostgreSQL's are the server's (`ptum.tune.database.connecting`)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, sqlalchemy.exc.DBAPIError):
            text = str(exc.orig)
            damaged = sqlite and any(m in text.lower() for m in _DAMAGE_MESSAGES)
            return text if damaged else None
        if isinstance(exc, sqlite3.DatabaseError):
            text = str(exc)
            return text if any(m in text.lower() for m in _DAMAGE_MESSAGES) else None
        # Optuna decoding a stored row: JSON, dates, enum names, an assert on a value's type.
        if isinstance(exc, _DECODING):
            text = str(exc).strip()
            return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        if not isinstance(exc, StorageInternalError):
            return None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextmanager
def reading_study(url: str) -> Iterator[None]:
    """Turn an error from decoding the stored study inside the block into a `StudyDamaged`
    naming the storage and the fix. Wrap only Optuna's reads in it: any ValueError inside is
    taken for stored data that does not decode."""
    try:
        yield
    except StudyDamaged:
        raise
    except Exception as exc:
        why = _damage(exc, sqlite=sqlite_file(url) is not None)
        if why is None:
            raise
        what = "the database is damaged" if sqlite_file(url) is not None else _damaged(url)
        raise StudyDamaged(
            f"{store_name(url)}: the study cannot be read ({why}); {what}: {_fix(url)}"
        ) from exc


def read_all(study: optuna.Study, url: str) -> list[optuna.trial.FrozenTrial]:
    """Every trial and attr of the study, decoded now (a damaged row fails here, named)."""
    with reading_study(url):
        _ = study.user_attrs, study.directions
        return study.get_trials(deepcopy=False)


def check_values(study: optuna.Study, url: str, objectives: list[str]) -> None:
    """Refuse a stored trial value (objective i: `objectives[i]`) or intermediate value (the
    first objective's metric, after each epoch) outside its metric's range or not finite."""
    for t in read_all(study, url):
        stored = [(f"value of {name}", v, name) for name, v in zip(objectives, t.values or [])] + [
            (f"intermediate value of {objectives[0]} at epoch {step}", v, objectives[0])
            for step, v in sorted(t.intermediate_values.items())
            if objectives
        ]
        for what, v, name in stored:
            low, high = objective_range(name)
            if math.isfinite(v) and low <= v <= high:
                continue
            raise StudyDamaged(
                f"{store_name(url)}: study {study.study_name!r}, trial {t.number} ({t.state.name}) "
                f"holds {what} = {v!r}, outside [{low:g}, {high:g}]; {_damaged(url)} and its "
                f"trials cannot be trusted: {_fix(url)}"
            )
