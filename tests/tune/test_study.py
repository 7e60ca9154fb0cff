"""The study machinery of ptum.tune with tiny objectives (no model): simultaneous starts on a new
database, an exact trial budget under concurrent workers, a pruner that prunes with few trials,
and the progress bar."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from ptum.config import TuneConfig
from ptum.io import atomic_write_text
from ptum.stages.tune import study_spec
from ptum.tune import DONE, StudySpec, open_study, run_trials
from ptum.tune.storage import fail_silent_trials, retry_race

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quiet_optuna():
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(before)


def _spec(tmp: Path, **kw) -> StudySpec:
    """params.yaml's tune section (20 trials) with a study in `tmp`."""
    spec = study_spec(TuneConfig(), study_name="s")
    return replace(
        spec, **{"storage": f"sqlite:///{tmp / 'optuna.db'}", "n_trials": 20, "seed": 3, **kw}
    )


def _open(spec: StudySpec, worker: int | None = 0, **attrs) -> optuna.Study:
    return open_study(
        spec, directions=["maximize"], attrs={"arch": "x", **attrs}, epochs=2, worker=worker
    )


def _states(spec: StudySpec) -> list[TrialState]:
    return [t.state for t in optuna.load_study(study_name="s", storage=spec.storage).trials]


def _sleepy(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.02)
    return x


# ---------------------------------------------------------------- simultaneous starts

_RACE_CHILD = """
import sys, time
from dataclasses import replace
from pathlib import Path
import optuna
from ptum.config import TuneConfig
from ptum.stages.tune import study_spec
from ptum.tune import open_study, run_trials
optuna.logging.set_verbosity(optuna.logging.WARNING)
tmp, rounds = Path(sys.argv[1]), int(sys.argv[2])
(tmp / f"ready-{sys.argv[3]}").touch()
while not (tmp / "go").exists():
    time.sleep(0.001)
t0 = float((tmp / "go").read_text())
def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.05)
    return x
for r in range(rounds):
    while time.time() < t0 + 1.5 * r:  # every process opens round r's new database at once
        time.sleep(0.0005)
    spec = replace(study_spec(TuneConfig(), study_name="s"),
                   storage=f"sqlite:///{tmp}/race{r}.db", n_trials=5, pruner="none")
    # Same worker index, as for two `ptum tune` commands started by hand.
    study = open_study(spec, directions=["maximize"], attrs={"arch": "x"}, epochs=1, worker=0)
    run_trials(study, objective, n_trials=spec.n_trials)
"""


@pytest.mark.slow
def test_processes_started_at_once_on_a_new_database_share_one_study(tmp_path):
    rounds, n_procs = 4, 3
    (tmp_path / "child.py").write_text(_RACE_CHILD)
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), str(tmp_path), str(rounds), str(i)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_procs)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < n_procs:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, [p.stderr.read() for p in dead]  # only theirs: read() would block
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.05)
        # Atomic: a child polling for "go" must never read it empty.
        atomic_write_text(tmp_path / "go", str(time.time() + 0.5))
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * n_procs, "\n".join(errors)
    for r in range(rounds):
        storage = f"sqlite:///{tmp_path}/race{r}.db"
        study = optuna.load_study(study_name="s", storage=storage)
        done = study.get_trials(states=DONE)
        assert len(done) == 5, (r, [t.state for t in study.trials])
        # Each start claimed its own sampler seed: no two processes drew the same points.
        assert len({t.params["x"] for t in done}) == 5, r
        assert study.user_attrs["arch"] == "x"


def test_a_lost_creation_race_is_retried_and_other_errors_are_not():
    calls = []

    def lost_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.ProgrammingError(
                "CREATE TABLE studies", {}, Exception('relation "studies" already exists')
            )
        return "storage"

    assert retry_race(lost_once) == "storage" and len(calls) == 2

    calls.clear()

    def wrong_password() -> str:
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception("password failed"))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        retry_race(wrong_password)
    assert len(calls) == 1


# ---------------------------------------------------------------- budget


def test_concurrent_workers_finish_exactly_n_trials_on_an_existing_study(tmp_path):
    spec = _spec(tmp_path, n_trials=9, pruner="none")
    # An existing study: 2 complete trials and one that failed.
    first = _open(spec)
    run_trials(first, _sleepy, n_trials=2)
    first.tell(first.ask(), state=TrialState.FAIL)

    def pruned_or_slow(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, 1)
        time.sleep(0.01 + 0.04 * x)  # trials of unequal length interleave the workers
        if trial.number % 3 == 0:
            raise optuna.TrialPruned()
        return x

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            # Each worker its own storage connection, as separate processes have.
            run_trials(_open(spec, worker=i), pruned_or_slow, n_trials=spec.n_trials)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    study = optuna.load_study(study_name="s", storage=spec.storage)
    assert len(study.get_trials(states=DONE)) == 9
    assert TrialState.PRUNED in _states(spec)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # Any trial beyond the budget ended before its objective ran, and says why.
    for t in study.get_trials(states=(TrialState.FAIL,))[1:]:
        assert "surplus" in t.user_attrs and not t.params


def test_a_trial_created_after_the_budget_was_taken_does_no_work(tmp_path, monkeypatch, capfd):
    spec = _spec(tmp_path, n_trials=2, pruner="none")
    ours, theirs = _open(spec, worker=0), _open(spec, worker=1)
    run_trials(ours, _sleepy, n_trials=1)  # trial 0 complete
    # The other worker creates trial 1 between our budget check and our next trial: the race
    # that a check before each trial alone cannot close.
    ask = ours.ask
    raced: list[optuna.Trial] = []

    def racing_ask(*args, **kwargs):
        if not raced:
            raced.append(theirs.ask())
        return ask(*args, **kwargs)

    monkeypatch.setattr(ours, "ask", racing_ask)
    ran: list[int] = []
    run_trials(ours, lambda t: ran.append(t.number) or 0.5, n_trials=2)
    theirs.tell(raced[0], 0.9)
    assert ran == [] and _states(spec) == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.FAIL,
    ]
    surplus = optuna.load_study(study_name="s", storage=spec.storage).trials[2]
    assert "2 trials held the budget of 2" in surplus.user_attrs["surplus"]
    err = capfd.readouterr().err
    assert "trial 2 not run, this worker stops" in err and "Traceback" not in err


def test_a_full_budget_starts_nothing_and_a_resumed_one_adds_the_missing(tmp_path):
    spec = _spec(tmp_path, n_trials=3, pruner="none")
    run_trials(_open(spec), _sleepy, n_trials=3)
    run_trials(_open(spec), _sleepy, n_trials=3)
    assert _states(spec) == [TrialState.COMPLETE] * 3
    run_trials(_open(spec), _sleepy, n_trials=5)
    assert _states(spec) == [TrialState.COMPLETE] * 5


# ---------------------------------------------------------------- pruning


def _two_epochs(bad: set[int]):
    """Reports an intermediate value after each of 2 "epochs"; trials in `bad` report clearly
    worse values than the others."""

    def objective(trial: optuna.Trial) -> float:
        v = 0.1 if trial.number in bad else 0.6 + 0.05 * (trial.number % 3)
        for epoch in (1, 2):
            trial.report(v + 0.01 * epoch, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v + 0.05

    return objective


def test_default_median_pruner_prunes_bad_trials_of_a_four_trial_study(tmp_path):
    spec = _spec(tmp_path, n_trials=4)  # params.yaml's: median, 2 startup trials
    run_trials(_open(spec), _two_epochs(bad={2, 3}), n_trials=spec.n_trials)
    trials = optuna.load_study(study_name="s", storage=spec.storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in trials[2:])  # stopped at epoch 1


def test_median_pruner_with_more_startup_trials_than_the_budget_never_prunes(tmp_path, capfd):
    spec = _spec(tmp_path, n_trials=4, prune_startup_trials=5)
    run_trials(_open(spec), _two_epochs(bad={2, 3}), n_trials=spec.n_trials)
    assert _states(spec) == [TrialState.COMPLETE] * 4
    assert "never prunes" in capfd.readouterr().err


# ---------------------------------------------------------------- study identity


def test_a_study_that_measures_something_else_is_refused(tmp_path):
    spec = _spec(tmp_path)
    study = _open(spec, data_sha256="aa", objectives=["demo_valid_acc"])
    assert study.user_attrs == {
        "arch": "x",
        "data_sha256": "aa",
        "objectives": ["demo_valid_acc"],
    }
    assert study.metric_names == ["demo_valid_acc"]
    _open(spec, data_sha256="aa", objectives=["demo_valid_acc"])  # the same: resumes
    with pytest.raises(ValueError, match="data_sha256: 'aa' in the study, 'bb' here"):
        _open(spec, data_sha256="bb", objectives=["demo_valid_acc"])


# ---------------------------------------------------------------- progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_on_a_terminal_log_lines_otherwise(tmp_path, monkeypatch, tty):
    spec = _spec(tmp_path, n_trials=3, pruner="none")
    study = _open(spec)
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    run_trials(study, _sleepy, n_trials=3, progress=True)
    out = stream.getvalue()
    if tty:
        assert "tune trials:" in out and "3/3" in out and "best=" in out, out
    else:  # whole lines (ptum.progress): the first and the last here, no bar
        lines = out.splitlines()
        assert lines[0] == "tune trials: 0/3 trials (0%), elapsed 0:00", out
        assert lines[-1].startswith("tune trials: 3/3 trials (100%), elapsed 0:0"), out
        assert "pruned=0" in lines[-1] and "best=" in lines[-1] and "\r" not in out


# ---------------------------------------------------------------- killed before a heartbeat


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_a_running_trial_that_never_beat_is_failed_after_the_grace_period(tmp_path, capfd):
    spec = _spec(tmp_path, n_trials=2, pruner="none", heartbeat_interval=1, grace_period=2)
    study = _open(spec)
    # `ask` creates a RUNNING trial with no heartbeat row: what a process killed between
    # creating its trial and its first heartbeat leaves behind.
    silent = study.ask()
    young = _open(spec, worker=1).ask()
    con = sqlite3.connect(tmp_path / "optuna.db")
    with con:  # created a minute ago, older than the grace period
        con.execute(
            "UPDATE trials SET datetime_start = ? WHERE number = ?",
            ((datetime.now() - timedelta(seconds=60)).isoformat(sep=" "), silent.number),
        )
    con.close()
    assert fail_silent_trials(study) == [silent.number]
    states = _states(spec)
    assert states[silent.number] == TrialState.FAIL
    assert states[young.number] == TrialState.RUNNING  # within the grace period: left alone
    assert f"trial {silent.number} never recorded a heartbeat" in capfd.readouterr().err
    # Its place in the budget is free again: the young trial and one new trial fill it.
    study.tell(young, 0.5)
    run_trials(study, _sleepy, n_trials=spec.n_trials)
    assert len(study.get_trials(states=DONE)) == 2
    assert fail_silent_trials(study) == []
