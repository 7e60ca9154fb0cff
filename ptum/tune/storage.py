"""Optuna's RDB storage, safe to open from several processes at once, with trial heartbeats.

An RDB URL (SQLite by default, PostgreSQL for several machines). Creating the tables and the
study is serialised between processes by a lock file next to a SQLite database, and retried when
another process won the race (PostgreSQL), so workers may start at the same instant. Trials
record a heartbeat; a trial whose process died (SIGKILL, lost machine) stops beating and is
marked FAIL by the next process that starts a trial on the study, after `grace_period` seconds
(and re-queued with the same parameters once when `retry_killed` > 0).

RDBStorage rather than JournalStorage because only RDB storages implement Optuna's heartbeat,
and optuna-dashboard opens the same URL directly. SQLite copes with a few local workers (trials
take seconds to minutes, writes are rare; a 60 s busy timeout absorbs lock contention) but not
with a network filesystem: across machines, use one PostgreSQL URL and start `ptum tune` on each
machine with the same study name; that is Optuna's own distributed mode.
"""

from __future__ import annotations

import fcntl
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial

from ptum.tune.trial import log


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///"))
    return None


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on `<db>.lock` next to a SQLite database (no-op for other URLs).

    Two processes that open a new database at the same instant both create Optuna's tables and
    stamp its schema version, and one of them fails (`table studies already exists`, `UNIQUE
    constraint failed: alembic_version`). flock is per open file, so do not nest this.
    """
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# What a database says when another process created the same table / row first.
_RACE_MESSAGES = ("already exists", "unique constraint", "duplicate key")
T = TypeVar("T")


def retry_race(make: Callable[[], T], *, attempts: int = 5) -> T:
    """`make()`, again (up to `attempts` times) if it lost a creation race to another process:
    a database without a lock file (PostgreSQL) can see two workers create Optuna's tables at
    once; the second attempt finds them and goes on. Any other error is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return make()
        except sqlalchemy.exc.DBAPIError as e:
            lost_race = any(m in str(e).lower() for m in _RACE_MESSAGES)
            if not lost_race or attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def rdb_storage(
    url: str, *, heartbeat_interval: int, grace_period: int, retry_killed: int
) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API is experimental
        callback = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry_killed)
            if retry_killed > 0
            else _report_stale
        )
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=callback,
        )


def make_storage(
    url: str, *, heartbeat_interval: int = 60, grace_period: int = 180, retry_killed: int = 1
) -> optuna.storages.RDBStorage:
    """RDB storage with trial heartbeats and a 60 s SQLite busy timeout, safe to create from
    several processes at once (see `creation_lock`, `retry_race`).

    A RUNNING trial without a heartbeat for `grace_period` seconds is marked FAIL (its process
    died) just before this storage's next trial starts; with `retry_killed` > 0 its parameters
    are queued again (as a new trial) up to that many times.
    """
    with creation_lock(url):
        return retry_race(
            lambda: rdb_storage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                retry_killed=retry_killed,
            )
        )


def _report_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    log(f"tune: trial {trial.number} of {study.study_name} lost its process; marked FAIL")
