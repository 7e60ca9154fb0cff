"""Tuning on a real PostgreSQL server (tests/tune/conftest.py): `tune.storage` URLs are checked
when params load, `ptum tune --worker I` on two "machines" shares one study to its exact budget,
heartbeats fail dead trials by the server's clock, optuna-dashboard reads the study from the
URL, and a database that cannot be used is one line naming the URL without its password."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from ptum.config import ConfigError, TuneConfig
from ptum.io import atomic_write_text
from ptum.stages.tune import study_spec
from ptum.tune import (
    DONE,
    StorageUnreachable,
    StudyDamaged,
    StudySpec,
    check_store,
    check_values,
    open_study,
    run_trials,
)
from ptum.tune.database import connecting
from ptum.tune.storage import creation_lock
from tests.faults.harness import PARAMS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quiet_optuna():
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(before)


def _spec(url: str, **kw) -> StudySpec:
    """params.yaml's tune section with a study "s" at `url`."""
    spec = study_spec(TuneConfig(), study_name="s")
    return replace(spec, **{"storage": url, "n_trials": 4, "seed": 3, "pruner": "none", **kw})


def _open(spec: StudySpec, worker: int | None = 0) -> optuna.Study:
    return open_study(spec, directions=["maximize"], attrs={"arch": "x"}, epochs=1, worker=worker)


def _x(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def _plain(url: str) -> str:
    """The URL as a user writes it most often: postgresql://, no driver."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


# ---------------------------------------------------------------- tune.storage at params load


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///data/tune/optuna.db",
        "sqlite:////srv/tune/optuna.db",
        "postgresql://ptum@db-host/optuna",
        "postgresql+psycopg2://ptum@db-host:5433/optuna?sslmode=require",
        "postgresql:///optuna?host=/run/postgresql",
    ],
)
def test_sqlite_and_postgresql_urls_are_accepted(url):
    assert TuneConfig(storage=url).storage == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://ptum:s3cret@db-host/optuna", "mysql://ptum:***@db-host/optuna"),
        ("postgres://ptum:s3cret@db-host/optuna", "SQLAlchemy refuses postgres://"),
        ("postgresql+asyncpg://ptum@db-host/optuna", "postgresql+psycopg2://"),
        ("sqlite:///:memory:", "not in memory"),
        ("sqlite://", "sqlite:///PATH"),
        ("data/tune/optuna.db", "sqlite:///PATH"),
    ],
)
def test_other_storage_urls_are_refused_in_one_line_without_the_password(url, says):
    with pytest.raises(ConfigError) as err:
        TuneConfig(storage=url)
    message = str(err.value)
    assert message.startswith("tune.storage = ") and says in message
    assert "\n" not in message and "s3cret" not in message


# ---------------------------------------------------------------- a database that cannot be used


def _env() -> dict[str, str]:
    """A `ptum` subprocess's environment: one thread, errors as users see them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("PTUM_DEBUG", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_ends_ptum_tune_with_one_line(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    url = f"postgresql://ptum:s3cret@/tune?host={tmp_path}/no-server"
    run = subprocess.run(
        [sys.executable, "-m", "ptum", "tune", "--set", f"tune.storage={url}"],
        cwd=proj,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    (line,) = [s for s in run.stderr.splitlines() if s.strip()]
    assert line.startswith(
        f"ptum tune: error: tune.storage postgresql://ptum:***@/tune?host={tmp_path}/no-server: "
        "cannot use the PostgreSQL database (connection to server on socket"
    ), line
    assert "No such file or directory" in line and "check that the server is running" in line
    assert "s3cret" not in run.stderr + run.stdout


def test_each_connection_failure_says_what_to_do(postgres_url):
    base, _, query = postgres_url.partition("?")
    server = base.rpartition("/")[0]  # postgresql+psycopg2://postgres:@
    cases = [
        (
            f"postgresql://ptum:s3cret@127.0.0.1:{_free_port()}/tune",
            "Connection refused",
            "check that the server is running",
        ),
        (f"{server}/no_such_db?{query}", 'database "no_such_db" does not exist', "createdb"),
        (
            f"{server.replace('postgres:@', 'nobody:s3cret@')}/postgres?{query}",
            'role "nobody" does not exist',
            "createuser",
        ),
        ("postgresql://ptum@db-host:port/tune", "not a valid database URL", "postgresql"),
    ]
    for url, what, fix in cases:
        with pytest.raises(StorageUnreachable) as err:
            check_store(url)
        message = str(err.value)
        assert message.startswith("tune.storage postgresql"), message
        assert what in message and fix in message and "\n" not in message, message
        assert "s3cret" not in message
        # Opening the study says the same, for a library caller that skipped check_store.
        with pytest.raises(StorageUnreachable, match="tune.storage"):
            _open(_spec(url))


def test_a_database_lost_during_the_study_is_one_line_and_the_study_resumes(postgres_url):
    base, _, query = postgres_url.partition("?")
    db = base.rpartition("/")[2]
    admin = sqlalchemy.create_engine(
        f"{base.rpartition('/')[0]}/postgres?{query}", isolation_level="AUTOCOMMIT"
    )

    def access(allowed: bool) -> None:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS {allowed}'))
            if not allowed:  # and drop the study's open connections: the server went away
                con.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": db},
                )

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:
            access(False)
        return _x(trial)

    spec = _spec(postgres_url, n_trials=3)
    try:
        with pytest.raises(StorageUnreachable) as err, connecting(spec.storage):
            run_trials(_open(spec), objective, n_trials=spec.n_trials)
        message = str(err.value)
        assert message.startswith("tune.storage postgresql+psycopg2://postgres:***@/"), message
        assert "not currently accepting connections" in message and "rerun" in message
        assert "\n" not in message
        access(True)
        study = optuna.load_study(study_name="s", storage=postgres_url)
        assert study.trials[0].state == TrialState.COMPLETE
    finally:
        access(True)
        admin.dispose()


# ---------------------------------------------------------------- a study on PostgreSQL


def test_a_study_resumes_and_optuna_dashboard_reads_it(postgres_url):
    spec = _spec(_plain(postgres_url), n_trials=3)
    run_trials(_open(spec), _x, n_trials=spec.n_trials)
    run_trials(_open(spec, worker=1), _x, n_trials=spec.n_trials)  # resumed: nothing to add
    raise_budget = replace(spec, n_trials=5)
    run_trials(_open(raise_budget), _x, n_trials=raise_budget.n_trials)
    study = optuna.load_study(study_name="s", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert study._storage.get_study_system_attrs(study._study_id)["ptum:worker_starts"] == 3
    # optuna-dashboard on the same URL, through its WSGI app (no port bound).
    app = optuna_dashboard.wsgi(postgres_url)
    (summary,) = _get(app, "/api/studies")["study_summaries"]
    assert summary["study_name"] == "s" and summary["directions"] == ["maximize"]
    detail = _get(app, f"/api/studies/{summary['study_id']}")
    assert len(detail["trials"]) == 5
    assert {a["key"]: a["value"] for a in detail["user_attrs"]}["arch"] == "x"
    assert max(t["values"][0] for t in detail["trials"]) == pytest.approx(study.best_value)


def test_an_impossible_stored_value_gets_the_databases_fixes_not_a_files(postgres_url):
    spec = _spec(_plain(postgres_url), n_trials=1)
    run_trials(_open(spec), lambda t: _x(t) + 25206.0, n_trials=1)
    check_store(spec.storage)  # no file to check: it connects, and that is all
    with pytest.raises(StudyDamaged) as err:
        check_values(_open(spec, worker=None), spec.storage, ["demo_valid_acc"])
    message = str(err.value)
    assert message.startswith("postgresql://postgres:***@/"), message
    assert "outside [0, 1]; a stored row was damaged or edited" in message
    assert "optuna delete-study --storage postgresql+psycopg2://postgres:***@/" in message
    assert ".damaged" not in message and "dvc checkout" not in message


def _get(app, path: str) -> dict:
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], (status, body[:300])
    return json.loads(body)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_dead_trials_are_failed_by_the_server_clock_and_retried(postgres_url):
    spec = _spec(postgres_url, n_trials=3, heartbeat_interval=1, grace_period=2)
    study = _open(spec)
    storage = study._storage
    # A trial whose process died after beating, and one killed before its first beat.
    beat = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    storage.record_heartbeat(beat._trial_id)
    silent = study.ask()
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.begin() as con:
        con.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = now() - interval '1 hour'")
        )
        con.execute(
            sqlalchemy.text("UPDATE trials SET datetime_start = datetime_start - interval '1 hour'")
        )
    engine.dispose()
    run_trials(_open(spec, worker=1), _x, n_trials=spec.n_trials)
    trials = optuna.load_study(study_name="s", storage=postgres_url).trials
    assert trials[beat.number].state == trials[silent.number].state == TrialState.FAIL
    assert sum(t.state in DONE for t in trials) == 3
    # The dead trial that had parameters is retried with them (tune.retry_killed = 1).
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == beat.number]
    assert retry.params == beat.params and retry.state == TrialState.COMPLETE


def test_study_creation_is_serialised_across_processes_by_an_advisory_lock(postgres_url):
    """What the lock file does for SQLite: a second opener (another machine) waits, in
    PostgreSQL, until the first has created the tables and counted its start."""
    entered = threading.Event()

    def second() -> None:
        with creation_lock(_plain(postgres_url)):
            entered.set()

    engine = sqlalchemy.create_engine(postgres_url)
    waiting = sqlalchemy.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    try:
        with creation_lock(postgres_url):
            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.monotonic() + 60
            with engine.connect() as con:
                while con.execute(waiting).scalar_one() == 0:
                    assert not entered.is_set(), "the second opener did not wait"
                    assert time.monotonic() < deadline, "the second opener never asked"
                    time.sleep(0.05)
            assert not entered.is_set()  # it waits for the lock...
        thread.join(timeout=60)
        assert entered.is_set()  # ...and takes it once released
    finally:
        engine.dispose()


_RACE_CHILD = """
import sys, time
from dataclasses import replace
from pathlib import Path
import optuna
from ptum.config import TuneConfig
from ptum.stages.tune import study_spec
from ptum.tune import open_study, run_trials
optuna.logging.set_verbosity(optuna.logging.WARNING)
tmp, url = Path(sys.argv[1]), sys.argv[2]
(tmp / f"ready-{sys.argv[3]}").touch()
while not (tmp / "go").exists():
    time.sleep(0.001)
go = float((tmp / "go").read_text())
while time.time() < go:
    time.sleep(0.0005)
def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.05)
    return x
spec = replace(study_spec(TuneConfig(), study_name="s"), storage=url, n_trials=5, pruner="none")
# Same worker index, as for `ptum tune` started twice by hand: the start count sets them apart.
study = open_study(spec, directions=["maximize"], attrs={"arch": "x"}, epochs=1, worker=0)
run_trials(study, objective, n_trials=spec.n_trials)
"""


@pytest.mark.slow
def test_processes_started_at_once_on_a_new_database_share_one_study(postgres_url, tmp_path):
    n_procs = 3
    (tmp_path / "child.py").write_text(_RACE_CHILD)
    url = _plain(postgres_url)
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), str(tmp_path), url, str(i)],
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_procs)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < n_procs:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, [p.stderr.read() for p in dead if p.stderr]
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.05)
        atomic_write_text(tmp_path / "go", str(time.time() + 0.5))
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * n_procs, "\n".join(errors)
    study = optuna.load_study(study_name="s", storage=postgres_url)
    done = study.get_trials(states=DONE)
    assert len(done) == 5, [t.state for t in study.trials]
    # Each start claimed its own count (under the advisory lock, tested above): no two
    # processes drew the same points.
    assert len({t.params["x"] for t in done}) == 5
    assert study._storage.get_study_system_attrs(study._study_id)["ptum:worker_starts"] == 3


# ---------------------------------------------------------------- two machines, one study


def _machine(path: Path, data: Path, url: str) -> Path:
    """A project directory as on one machine: the tiny params, tune.storage = `url`, and the
    shared data (the same prepared files, hence the same default study name)."""
    params = {**PARAMS, "tune": {**PARAMS["tune"], "n_trials": 4, "storage": url}}
    (path / "data").mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for d in ("prepared", "tokenized"):
        (path / "data" / d).symlink_to(data / d)
    return path


def _ptum_tune(proj: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ptum", "tune", *args],
        cwd=proj,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "OperationalError" not in err, err[-3000:]
    return err


def _best(proj: Path) -> dict:
    return json.loads((proj / "reports" / "tune" / "best_params.json").read_text())


@pytest.mark.slow
def test_two_ptum_tune_workers_share_one_postgresql_study(tiny_pipeline, postgres_url, tmp_path):
    # Two machines: one writes postgresql://, the other names the driver; the same database.
    machines = [
        _machine(tmp_path / "m0", tiny_pipeline, _plain(postgres_url)),
        _machine(tmp_path / "m1", tiny_pipeline, postgres_url),
    ]
    workers = [_ptum_tune(proj, "--worker", str(i)) for i, proj in enumerate(machines)]
    for w in workers:
        _finish(w)
    (name,) = optuna.get_all_study_names(postgres_url)  # both derived the same study name
    assert name.startswith("ptum-hsa-demo-acc-data")
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.trials
    # The exact budget over both machines; a worker that lost the race for the last place
    # created at most one more trial, FAIL before any work.
    assert sum(t.state in DONE for t in trials) == 4
    surplus = [t for t in trials if t.state not in DONE]
    assert len(surplus) <= 2
    assert all(t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in surplus)
    assert study._storage.get_study_system_attrs(study._study_id)["ptum:worker_starts"] == 2
    # Each machine wrote best_params.json from the trials finished when it stopped.
    for proj in machines:
        best = _best(proj)
        assert best["complete"] + best["pruned"] <= 4
        named = trials[best["trial"]]
        assert best["value"] == pytest.approx(named.value)
        assert {k: best[k] for k in ("k", "lam", "p", "lr")} == named.params
    # A rerun on either machine resumes the full study: it adds no trial and writes the final
    # best_params.json, which is the study's best trial as PostgreSQL holds it.
    _finish(_ptum_tune(machines[0]))
    assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == len(trials)
    best, top = _best(machines[0]), study.best_trial
    assert best["trial"] == top.number and best["value"] == pytest.approx(top.value)
    assert {k: best[k] for k in ("k", "lam", "p", "lr")} == top.params
    assert best["complete"] + best["pruned"] == 4 and best["surplus"] == len(surplus)
