"""What a finished study leaves behind: headline metrics, the detailed summary, the figures.

- `best_params.json` (the stage's DVC metric, at most a dozen numbers): the best trial's k, lam,
  p, lr, its number and value (multi-objective: the Pareto trial with the best mean of the
  objectives, and its value per objective), and the complete / pruned / failed / surplus trial
  counts (a surplus trial ended before any work: other workers had taken the budget, see
  `ptum.tune.budget`).
  `pretrain.use_tuned: true` pre-trains with its k, lam, p, lr.
- `study.json` beside the figures (a plain output): the same best trial with the study name,
  the objectives, the counts of every trial state, and in multi-objective mode the whole front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ptum.io import atomic_write_json
from ptum.pretrain.tuned import TUNED_KEYS
from ptum.tune.plots import write_plots

STUDY_JSON = "study.json"  # the detailed summary, written beside the figures


def _best(study: optuna.Study) -> tuple[FrozenTrial, list[FrozenTrial]]:
    if len(study.directions) == 1:
        return study.best_trial, [study.best_trial]
    front = study.best_trials  # the Pareto front
    return max(front, key=lambda t: (float(np.mean(t.values)), -t.number)), front


def _entry(t: FrozenTrial, names: list[str]) -> dict[str, Any]:
    values = dict(zip(names, t.values))
    return {
        "trial": t.number,
        **{k: t.params[k] for k in TUNED_KEYS},
        "value": float(np.mean(t.values)),
        "values": values,
    }


def write_outputs(
    study: optuna.Study, *, best_params_path: Path, reports_dir: Path, objective_names: list[str]
) -> dict[str, Any]:
    """best_params.json (headline), reports_dir/study.json (detail) and the history /
    importance (/ Pareto or intermediate values) PNGs of a finished study; returns the detail
    with the figures written."""
    counts = _counts(study)
    if counts["complete"] == 0:
        raise ValueError(
            f"tune: study {study.study_name!r} has no completed trial yet "
            f"({counts}); rerun to add trials"
        )
    best, front = _best(study)
    detail = {
        **_entry(best, objective_names),
        "study": study.study_name,
        "trials": counts,
        "objectives": objective_names,
    }
    if len(objective_names) > 1:
        detail["pareto_front"] = [_entry(t, objective_names) for t in front]
    _write_json(best_params_path, headline(detail))
    reports_dir.mkdir(parents=True, exist_ok=True)
    _write_json(reports_dir / STUDY_JSON, detail)
    return {**detail, "plots": write_plots(study, reports_dir, objective_names)}


def write_unavailable(why: str, *, best_params_path: Path, reports_dir: Path) -> dict[str, Any]:
    """best_params.json and study.json of a stage that had no task to score trials on (no study
    is run): they say so and why; `pretrain.use_tuned` refuses such a file. The tuned keys are
    there, null (dvc.yaml's pretrain stage declares them as params of this file)."""
    detail = {"available": False, "why_not": why}
    _write_json(best_params_path, {**detail, **dict.fromkeys(TUNED_KEYS)})
    reports_dir.mkdir(parents=True, exist_ok=True)
    _write_json(reports_dir / STUDY_JSON, detail)
    return detail


def _counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state; a surplus trial (`ptum.tune.budget`: FAIL by design, before any work,
    when other workers took the budget's last place) is counted apart from the failures."""
    trials = study.get_trials(deepcopy=False)
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in states}
    counts["surplus"] = sum(
        t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in trials
    )
    counts["fail"] -= counts["surplus"]
    for s in (TrialState.RUNNING, TrialState.WAITING):
        counts[s.name.lower()] = sum(t.state == s for t in trials)
    return counts


def headline(detail: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists for the stage: the best trial's parameters, number
    and value (per objective too when there are several), and the trial counts."""
    out = {k: detail[k] for k in ("trial", *TUNED_KEYS, "value")}
    if len(detail["values"]) > 1:
        out["values"] = detail["values"]
    counts = detail["trials"]
    return {**out, **{n: counts[n] for n in ("complete", "pruned", "fail", "surplus")}}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: two `ptum tune` processes on one study may finish at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=1)
