"""Which database a `tune.storage` URL names, how ptum connects to it, and how its failures read.

Two kinds (params load refuses others, `ptum.config.tune`):

- `sqlite:///PATH`: one file, for workers on one machine. Its checks, its lock file and the
  "damaged database" messages are SQLite's alone (`ptum.tune.integrity`, `ptum.tune.storage`).
- `postgresql://USER@HOST[:PORT]/DB` (or `postgresql+psycopg2://`), for workers on several
  machines. SQLAlchemy 2.1 reads a plain `postgresql://` as psycopg 3, which ptum does not
  install: ptum connects with psycopg2, its dependency, whichever of the two is written (other
  programs on the same URL, optuna-dashboard included, need the `+psycopg2` form). A connection
  that cannot be made or is lost, a missing database or user, a refused password, a user who may
  not create Optuna's tables: one line (`StorageUnreachable`) naming the URL with its password
  masked, what failed and what to do, instead of a SQLAlchemy traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

_POSTGRESQL = ("postgresql", "postgresql+psycopg2")
# libpq waits for an unreachable host as long as the OS does (minutes); a URL's own
# `?connect_timeout=` wins.
CONNECT_TIMEOUT_S = 10


class StorageUnreachable(ValueError):
    """The study's PostgreSQL database cannot be used: no connection, no such database or
    user, a refused password, no right to create tables. The message names the URL (password
    masked), what failed and the fix."""


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URL (None for other databases and memory)."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///"))
    return None


def is_postgresql(url: str) -> bool:
    return url.partition("://")[0] in _POSTGRESQL


def store_name(url: str) -> str:
    """The SQLite file, or the URL with its password masked (`postgresql://u:***@h/db`):
    what a message names."""
    path = sqlite_file(url)
    if path is not None:
        return str(path)
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        shown = re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", url)
    base, sep, query = shown.partition("?")
    # ?host=/run/postgresql as it was written; libpq also takes ?password=
    return base + sep + re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", unquote(query))


def _parsed(url: str) -> URL:
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise StorageUnreachable(
            f"tune.storage {store_name(url)}: not a valid database URL "
            f"({_masked(_first_line(exc), url)}); write postgresql://USER@HOST[:PORT]/DB"
        ) from exc


def sqlalchemy_url(url: str) -> str:
    """The URL as SQLAlchemy must open it: a PostgreSQL URL with psycopg2 as its driver (the
    password kept: this string is for connecting, never for a message)."""
    if not is_postgresql(url):
        return url
    return _parsed(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite: a 60 s busy timeout (local workers contend for the file's lock). PostgreSQL: a
    connect timeout, and a ping before a pooled connection is reused (a trial takes minutes,
    and the server or a firewall may have dropped the idle connection meanwhile)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if is_postgresql(url):
        given = "connect_timeout" in _parsed(url).query
        connect = {} if given else {"connect_timeout": CONNECT_TIMEOUT_S}
        return {"pool_pre_ping": True, "connect_args": connect}
    return {}


# What to do, by what libpq or PostgreSQL said (lower case), first match wins.
_FIXES = (
    (
        ("password authentication failed", "no password supplied", "authentication failed"),
        "check the user and its password; keep the password out of params.yaml: in ~/.pgpass "
        "or PGPASSWORD on each machine (docs/tuning.md, PostgreSQL)",
    ),
    (
        ("database", "does not exist"),
        "create the database (`createdb -h HOST -U USER DB`) or correct its name in the URL",
    ),
    (("role", "does not exist"), "create the user (`createuser`) or correct it in the URL"),
    (("no pg_hba.conf entry",), "allow this machine and user in the server's pg_hba.conf"),
    (
        ("permission denied",),
        "let the user create tables in the database: make it the owner (`createdb -O USER DB`) "
        "or `GRANT ALL ON SCHEMA public TO USER`",
    ),
    (
        ("could not translate host name",),
        "correct the host name in the URL (or this machine's DNS)",
    ),
    (
        ("timeout expired",),
        f"the server did not answer within the connect timeout ({CONNECT_TIMEOUT_S} s unless the "
        "URL sets ?connect_timeout=): check the host, the port and any firewall between the "
        "machines",
    ),
)
_DEFAULT_FIX = (
    "check that the server is running and accepts connections from this machine (host, port, "
    "listen_addresses, pg_hba.conf), then rerun (a study keeps its finished trials)"
)


def _fix(text: str) -> str:
    low = text.lower()
    for needles, fix in _FIXES:
        if all(n in low for n in needles):
            return fix
    return _DEFAULT_FIX


def _failure(exc: BaseException | None) -> str | None:
    """What a connection-level failure said (its first line), or None for another error.
    Follows causes: Optuna wraps SQLAlchemy's errors in its own."""
    for _ in range(6):
        if exc is None:
            return None
        if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return _first_line(exc.orig if exc.orig is not None else exc)
        if isinstance(exc, sqlalchemy.exc.ProgrammingError) and "permission denied" in str(exc):
            return _first_line(exc.orig if exc.orig is not None else exc)
        if isinstance(exc, ImportError) and "psycopg" in str(exc.__cause__ or exc):
            return f"{_first_line(exc.__cause__ or exc)} (reinstall ptum: pip install -e .)"
        exc = exc.__cause__ or exc.__context__
    return None


def _first_line(exc: BaseException) -> str:
    lines = [" ".join(s.split()) for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


def _masked(text: str, url: str) -> str:
    """`text` without the URL's password (libpq does not quote it, but a server or a parser
    might): the user's, and a `?password=` of the query."""
    found = re.search(r"://[^:/@?]*:([^@/?]*)@", url)
    secrets = {found.group(1) if found else "", *re.findall(r"[?&]password=([^&]*)", url)}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


@contextmanager
def connecting(url: str) -> Iterator[None]:
    """Turn a PostgreSQL failure inside the block (connecting, or a connection lost later) into
    one `StorageUnreachable` line; other URLs and other errors pass unchanged."""
    if not is_postgresql(url):
        yield
        return
    try:
        yield
    except StorageUnreachable:
        raise
    except Exception as exc:
        what = _failure(exc)
        if what is None:
            raise
        raise StorageUnreachable(
            f"tune.storage {store_name(url)}: cannot use the PostgreSQL database "
            f"({_masked(what, url)}); {_fix(what)}"
        ) from exc


def check_reachable(url: str) -> None:
    """Connect to a PostgreSQL URL once (a `StorageUnreachable` if that fails); no-op for
    other URLs. Run before any work, so a wrong URL ends the run at once."""
    if not is_postgresql(url):
        return
    with connecting(url):
        engine = sqlalchemy.create_engine(
            sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool, **_connect_only(url)
        )
        try:
            with engine.connect() as con:
                con.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()


def _connect_only(url: str) -> dict[str, Any]:
    """`engine_kwargs` less the pool's: for a single connection."""
    return {k: v for k, v in engine_kwargs(url).items() if k == "connect_args"}


@contextmanager
def advisory_lock(url: str, key: int) -> Iterator[None]:
    """Hold PostgreSQL's session-level advisory lock `key` in the URL's database: the
    cross-machine counterpart of a lock file. Released on exit, or by the server when this
    process dies (its connection closes)."""
    engine = sqlalchemy.create_engine(
        sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool, **_connect_only(url)
    )
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            con.commit()
            try:
                yield
            finally:
                try:
                    con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    con.commit()
                except sqlalchemy.exc.DBAPIError:
                    pass  # the connection is gone, and the lock with it
    finally:
        engine.dispose()
