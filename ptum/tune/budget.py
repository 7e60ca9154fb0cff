"""Running trials to an exact budget, over any number of workers, with one progress bar.

`n_trials` is the number of complete + pruned trials the study ends with, whoever ran them.
Each trial, once created, counts the trials ahead of it (finished ones, and running or queued
ones with a smaller number); if the budget is already taken it ends as FAIL before any work
(user attr `surplus`) and its worker stops. Trial numbers follow creation order, so no number of
concurrent workers overshoots the budget; a run falls short only when a running trial fails,
and the next run adds the missing ones. Progress: over the study's finished trials (all
workers'), a tqdm bar on a terminal, a log line at most once a minute otherwise.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from ptum.progress import progress
from ptum.tune.storage import fail_silent_trials
from ptum.tune.trial import log

# Trials that count towards the study's n_trials (a FAIL is retried by the next run).
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that hold a place in the budget: finished, running, or queued to run.
CLAIMED = (*DONE, TrialState.RUNNING, TrialState.WAITING)


class _BudgetReached(Exception):
    """A trial created after the study's budget was taken; it ends FAIL before any work."""

    def __init__(self, number: int) -> None:
        super().__init__(f"trial {number}: the study's budget is taken")
        self.number = number


class _QuietSurplus(logging.Filter):
    """Optuna logs a trial ended by `_BudgetReached` as a failure, with a traceback; that is
    the normal end of a worker that lost the race for the last place, which `run_trials`
    reports in one line instead. On the logger of optuna.study._optimize (where the warnings
    come from); if Optuna moves them, they are merely shown again."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, _BudgetReached):
            self.numbers.add(exc.number)
            return False
        msg = record.getMessage()
        return not any(msg.startswith(f"Trial {n} failed with value None") for n in self.numbers)


def _places_ahead(study: optuna.Study, number: int) -> int:
    """Trials that hold a place in the budget before trial `number`: every finished one, and
    the running or queued ones created before it."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=CLAIMED)
        if t.number != number and (t.state in DONE or t.number < number)
    )


class Progress:
    """Progress of the study's finished trials, all workers' (an Optuna callback): a tqdm bar
    on a terminal, a log line at most once a minute otherwise (`ptum.progress`)."""

    def __init__(self, study: optuna.Study, total: int) -> None:
        self.study = study
        self.bar = progress(total=total, unit="trial", desc="tune trials")
        self.refresh()

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False, states=DONE)
        self.bar.n = len(trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        values = [t.values[0] for t in trials if t.state == TrialState.COMPLETE]
        best = {"best": f"{max(values):.4f}"} if values and len(self.study.directions) == 1 else {}
        self.bar.set_postfix(pruned=pruned, **best, refresh=False)
        self.bar.refresh()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.refresh()

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    *,
    n_trials: int,
    max_trials: int | None = None,
    progress: bool = False,
) -> None:
    """Run trials of `objective` in this process until the study holds `n_trials` complete or
    pruned trials — counted over every worker of the study, never more (see "Budget" in the
    module docstring) — or this process has started `max_trials` (None = no limit).

    A trial whose place was taken by other workers ends FAIL (user attr `surplus`) before the
    objective runs. With `progress`, the study's progress on stderr (`Progress`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # A dead worker's RUNNING trial would hold a place until the first trial here starts;
        # one that died before its first heartbeat, for good.
        fail_silent_trials(study)
        optuna.storages.fail_stale_trials(study)
    busy = (*DONE, TrialState.RUNNING)
    if len(study.get_trials(deepcopy=False, states=busy)) >= n_trials:
        return

    def guarded(trial: optuna.Trial) -> Any:
        ahead = _places_ahead(study, trial.number)
        if ahead >= n_trials:
            why = f"{ahead} trials held the budget of {n_trials}"
            trial.set_user_attr("surplus", why)
            log(f"tune: trial {trial.number} not run, this worker stops: {why}")
            study.stop()
            raise _BudgetReached(trial.number)
        return objective(trial)

    # After each trial: stop once the finished and running trials fill the budget (the check
    # above catches the case where two workers pass this at the same moment).
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        optuna.study.MaxTrialsCallback(n_trials, states=busy)
    ]
    bar = Progress(study, n_trials) if progress else None
    if bar is not None:
        callbacks.append(bar)
    quiet, optuna_log = _QuietSurplus(), logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet)
    try:
        study.optimize(guarded, n_trials=max_trials, callbacks=callbacks, catch=(_BudgetReached,))
    finally:
        optuna_log.removeFilter(quiet)
        if bar is not None:
            bar.close()
