"""The search: run (or resume) the study with one or several local workers, then write outputs.

The study lives in an RDB storage (`ptum.tune.storage`), so a rerun resumes it and workers on
other machines may join it (`ptum tune --worker I` with the same storage URL and study name).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from ptum.data.prepare.tasks import why_unavailable
from ptum.tune.budget import DONE, Progress, run_trials
from ptum.tune.database import connecting
from ptum.tune.integrity import check_values
from ptum.tune.objective import load_data, make_objective
from ptum.tune.outputs import write_outputs, write_unavailable
from ptum.tune.study import StudySpec, open_setup_study
from ptum.tune.trial import TrialSetup, objective_names


def run_worker(
    spec: StudySpec,
    setup: TrialSetup,
    n_trials: int,
    worker: int = 0,
    threads: int = 0,
    *,
    progress: bool = False,
) -> None:
    """Run up to `n_trials` trials in this process; stops early once the study's budget of
    `spec.n_trials` complete or pruned trials is taken, whoever ran them."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    data = load_data(setup)
    with connecting(spec.storage):  # a PostgreSQL connection lost mid-study: one line
        study = open_setup_study(spec, setup, worker=worker)
        run_trials(
            study,
            make_objective(data, setup),
            n_trials=spec.n_trials,
            max_trials=n_trials,
            progress=progress,
        )


def tune(
    *,
    setup: TrialSetup,
    spec: StudySpec,
    best_params_path: Path,
    reports_dir: Path,
    n_workers: int = 1,
) -> dict[str, Any]:
    """Run (or resume) the study until it holds `spec.n_trials` complete or pruned trials.

    `n_workers` > 1 runs that many processes against the same storage, each with its own
    sampler seed, taking trials until the budget is taken (a fast worker runs more). Then
    writes `best_params_path` (the headline metrics: the best k, lam, p, lr, trial and value,
    trial counts), and into `reports_dir` study.json (the detail; in multi-objective mode the
    whole Pareto front) and PNG plots (`ptum.tune.outputs`). Returns the detail.
    """
    if n_workers < 1:
        raise ValueError("tune: n_workers must be >= 1")
    why = _why_not_tunable(setup)
    if why is not None:  # a normal outcome (e.g. the PTUM layout): no trial can be scored
        print(f"tune: no study: {why}", file=sys.stderr)
        if setup.work_dir is not None:
            setup.work_dir.mkdir(parents=True, exist_ok=True)  # the stage's output exists
        return write_unavailable(why, best_params_path=best_params_path, reports_dir=reports_dir)
    with connecting(spec.storage):  # a PostgreSQL server that fails or goes away: one line
        return _search(
            setup=setup,
            spec=spec,
            best_params_path=best_params_path,
            reports_dir=reports_dir,
            n_workers=n_workers,
        )


def _search(
    *,
    setup: TrialSetup,
    spec: StudySpec,
    best_params_path: Path,
    reports_dir: Path,
    n_workers: int,
) -> dict[str, Any]:
    study = open_setup_study(spec, setup)
    remaining = max(0, spec.n_trials - len(study.get_trials(deepcopy=False, states=DONE)))
    t0 = time.perf_counter()
    if remaining and n_workers == 1:
        run_worker(spec, setup, remaining, spec.worker, progress=True)
    elif remaining:
        _run_workers(spec, setup, remaining, n_workers, study)
    _sweep_trial_dirs(study, setup.work_dir)
    # Again: workers on other machines may have added trials since the study was opened.
    check_values(study, spec.storage, objective_names(setup))
    summary = write_outputs(
        study,
        best_params_path=best_params_path,
        reports_dir=reports_dir,
        objective_names=objective_names(setup),
    )
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _why_not_tunable(setup: TrialSetup) -> str | None:
    """Why no trial can be scored (a trial is scored on Demo, and on CTR too when
    multi-objective), or None."""
    tasks = ("demo", "ctr") if setup.multi_objective else ("demo",)
    whys = [f"{t}: {w}" for t in tasks if (w := why_unavailable(t, setup.prepared)) is not None]
    return "; ".join(whys) or None


def _sweep_trial_dirs(study: optuna.Study, work_dir: Path | None) -> None:
    """Remove the work directories (`trial<N>-*`, pre-training checkpoints) of trials that are
    no longer running. A trial removes its own when it ends; a killed one cannot, and its
    directory would otherwise stay in the stage's output for good."""
    if work_dir is None or not work_dir.is_dir():
        return
    running = {
        t.number
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    }
    for d in work_dir.iterdir():
        number = d.name.removeprefix("trial").partition("-")[0]
        if d.is_dir() and d.name.startswith("trial") and number.isdigit():
            if int(number) not in running:
                shutil.rmtree(d, ignore_errors=True)


def _run_workers(
    spec: StudySpec, setup: TrialSetup, remaining: int, n_workers: int, study: optuna.Study
) -> None:
    """Up to `n_workers` spawned processes on the study, sharing the machine's CPUs; one bar,
    fed from the storage, follows them all."""
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    # spawn, not fork: a forked child of a process that already ran torch can deadlock.
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=run_worker,
            args=(spec, setup, remaining, spec.worker * n_workers + i, threads),
            name=f"tune-worker-{i}",
        )
        for i in range(min(n_workers, remaining))
    ]
    for p in procs:
        p.start()
    bar = Progress(study, spec.n_trials)  # one bar for all workers, fed from the storage
    for p in procs:
        while p.is_alive():
            p.join(timeout=1.0)
            bar.refresh()  # a no-op when stderr is not a terminal
    bar.close()
    failed = [_how_it_ended(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if failed:
        raise WorkerFailed(
            f"{'; '.join(failed)}; the study keeps every finished trial: rerun `ptum tune` "
            "to resume it"
        )


class WorkerFailed(RuntimeError):
    """A local tuning worker process ended with an error or was killed."""


def _how_it_ended(name: str, exitcode: int | None) -> str:
    """'tune-worker-1 was killed by SIGKILL' or 'tune-worker-0 failed (exit code 1, its error
    is above)'."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"{name} was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"{name} was killed by signal {-exitcode}"
    return f"{name} failed (exit code {exitcode}, its error is above)"
