"""Optuna's RDB storage, safe to open from several processes at once, with trial heartbeats.

An RDB URL (`ptum.tune.database`: SQLite by default, PostgreSQL for several machines).
Creating the tables and the study is serialised between processes by a lock: a lock file next
to a SQLite database, PostgreSQL's advisory lock for a PostgreSQL one (it holds across
machines); a creation race lost anyway (another program on the database) is retried, so
workers may start at the same instant. Trials record a heartbeat (the database server's clock
for PostgreSQL); a trial whose process died (SIGKILL, lost machine) stops beating and is
marked FAIL by the next process that starts a trial on the study, after `grace_period` seconds
(and re-queued with the same parameters once when `retry_killed` > 0). A trial that
never beat at all (killed within milliseconds of its creation) is failed the same way, by
`fail_silent_trials`.

RDBStorage rather than JournalStorage because only RDB storages implement Optuna's heartbeat,
and optuna-dashboard opens the same URL directly. SQLite copes with a few local workers (trials
take seconds to minutes, writes are rare; a 60 s busy timeout absorbs lock contention) but not
with a network filesystem: across machines, use one PostgreSQL URL and start `ptum tune` on each
machine with the same study name; that is Optuna's own distributed mode.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages._rdb import models  # the heartbeat table; no public query for it
from optuna.trial import FrozenTrial, TrialState

from ptum.tune.database import (
    advisory_lock,
    connecting,
    engine_kwargs,
    is_postgresql,
    sqlalchemy_url,
    sqlite_file,
)
from ptum.tune.trial import log

# The advisory lock of ptum's study creation in a PostgreSQL database (a bigint of our own).
_PG_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ptum.tune.creation").digest()[:8], "big", signed=True
)


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on `<db>.lock` next to a SQLite database (creating its
    directory), or PostgreSQL's advisory lock on the database; no-op for other URLs.

    Two processes that open a new database at the same instant both create Optuna's tables and
    stamp its schema version, and one of them fails (`table studies already exists`, `UNIQUE
    constraint failed: alembic_version`); two that start on one study both read the same
    count of worker starts (`ptum.tune.study`). Neither lock nests (flock is per open file, an
    advisory lock per connection), so do not nest this.
    """
    if is_postgresql(url):
        with advisory_lock(url, _PG_LOCK_KEY):
            yield
        return
    path = sqlite_file(url)
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
    """The storage of `url` (`ptum.tune.database`: SQLite's busy timeout, PostgreSQL through
    psycopg2 with a connect timeout), with heartbeats and the stale-trial callback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API is experimental
        callback = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry_killed)
            if retry_killed > 0
            else _report_stale
        )
        return optuna.storages.RDBStorage(
            sqlalchemy_url(url),
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=callback,
        )


def make_storage(
    url: str, *, heartbeat_interval: int = 60, grace_period: int = 180, retry_killed: int = 1
) -> optuna.storages.RDBStorage:
    """RDB storage with trial heartbeats, safe to create from several processes at once (see
    `creation_lock`, `retry_race`).

    A RUNNING trial without a heartbeat for `grace_period` seconds is marked FAIL (its process
    died) just before this storage's next trial starts; with `retry_killed` > 0 its parameters
    are queued again (as a new trial) up to that many times.
    """
    with connecting(url), creation_lock(url):
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


def _rdb(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The study's RDB storage (Optuna wraps it in a cache), or None for another storage."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def fail_silent_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials that are older than the grace period and never recorded a
    heartbeat; returns their numbers.

    Optuna fails a trial whose heartbeat went stale, but a trial without any heartbeat row
    (its process was killed between creating it and its first beat, milliseconds) stays
    RUNNING for good, holding a place of the budget (`ptum.tune.budget`). A live trial of
    `study.optimize` beats at once, so one that is silent after the grace period is dead.
    The storage's stale-trial callback then runs for it, as for any stale trial (a retry).
    """
    rdb = _rdb(study)
    if rdb is None or rdb.heartbeat_interval is None:
        return []
    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    # datetime_start is the creating process's naive local time (Optuna's `datetime.now()`).
    old = {
        t._trial_id: t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and datetime.now() - t.datetime_start > grace
    }
    if not old:
        return []
    session = rdb.scoped_session()
    try:
        beating = {
            trial_id
            for (trial_id,) in session.query(models.TrialHeartbeatModel.trial_id).filter(
                models.TrialHeartbeatModel.trial_id.in_(list(old))
            )
        }
    finally:
        rdb.scoped_session.remove()
    failed = []
    for trial_id in sorted(set(old) - beating):
        try:
            if study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it ended, or another process failed it first
    callback = rdb.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        log(f"tune: trial {old[trial_id]} never recorded a heartbeat (its process died); FAIL")
        if callback is not None:
            callback(study, copy.deepcopy(study._storage.get_trial(trial_id)))
    return [old[i] for i in failed]
