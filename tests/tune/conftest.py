"""A real PostgreSQL server for the tuning tests: pgserver's binaries (a dev dependency, no
network), one server per session in a temporary directory, listening on a Unix socket only;
each test that asks for `postgres_url` gets a new database on it.

The tests that use it are skipped, with the reason, only when the server cannot be started
(pgserver missing, or its start failing); as root, pgserver runs the server as its own system
user `pgserver`.
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

_DATABASES = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """pgserver's PostgresServer on a new data directory, stopped and deleted at the end of the
    session. Not under pytest's own temporary directory: as root, pgserver opens the path's
    parents to its system user, and pytest closes its directory again when a session starts."""
    pgdata = Path(tempfile.mkdtemp(prefix="ptum-postgres-"))
    with warnings.catch_warnings():
        # platformdirs, for pgserver's lock file: no XDG_RUNTIME_DIR under root in CI.
        warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR is not set")
        try:
            import pgserver
        except ImportError as exc:
            pytest.skip(f"no PostgreSQL server for the tests: pgserver is not installed ({exc})")
        try:
            server = pgserver.get_server(pgdata, cleanup_mode="delete")
        except Exception as exc:  # initdb or pg_ctl failing, a missing system user, ...
            shutil.rmtree(pgdata, ignore_errors=True)
            pytest.skip(
                f"no PostgreSQL server for the tests: pgserver could not start one in {pgdata} "
                f"({type(exc).__name__}: {exc})"
            )
    try:
        # A throw-away server: no fsync, so that creating databases and stopping it (a
        # checkpoint) take a second, not a quarter of a minute on a slow disk.
        _admin(server, [f"ALTER SYSTEM SET {k} = off" for k in _DURABILITY] + _RELOAD)
        yield server
    finally:
        server.cleanup()


_DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")
_RELOAD = ["SELECT pg_reload_conf()"]


def _admin(server: Any, statements: list[str]) -> None:
    """Run `statements` on the server's `postgres` database, outside any transaction."""
    admin = sqlalchemy.create_engine(_psycopg2(server.get_uri()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as con:
            for statement in statements:
                con.execute(sqlalchemy.text(statement))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL (psycopg2, Unix socket) of a new, empty database on the session's server."""
    name = f"t{next(_DATABASES)}_" + re.sub(r"\W+", "_", request.node.name.lower())[:40]
    _admin(postgres_server, [f'CREATE DATABASE "{name}"'])
    return _psycopg2(postgres_server.get_uri(name))


def _psycopg2(uri: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; ptum installs psycopg2."""
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1)
