"""What a finished study leaves behind: the best trial's parameters and the study's counts.

`best_params.json`: the best trial's k, lam, p, lr, its value, its number, the study name and
the trial counts per state; in multi-objective mode the Pareto trial with the best mean of the
objectives, plus the whole front.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ptum.tune.plots import write_plots


def _best(study: optuna.Study) -> tuple[FrozenTrial, list[FrozenTrial]]:
    if len(study.directions) == 1:
        return study.best_trial, [study.best_trial]
    front = study.best_trials  # the Pareto front
    return max(front, key=lambda t: (float(np.mean(t.values)), -t.number)), front


def _entry(t: FrozenTrial, names: list[str]) -> dict[str, Any]:
    values = dict(zip(names, t.values))
    return {
        "trial": t.number,
        **{k: t.params[k] for k in ("k", "lam", "p", "lr")},
        "value": float(np.mean(t.values)),
        "values": values,
    }


def write_outputs(
    study: optuna.Study, *, best_params_path: Path, reports_dir: Path, objective_names: list[str]
) -> dict[str, Any]:
    """best_params.json and the history / importance (/ Pareto) PNGs of a finished study."""
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
        for s in (
            TrialState.COMPLETE,
            TrialState.PRUNED,
            TrialState.FAIL,
            TrialState.RUNNING,
            TrialState.WAITING,
        )
    }
    if counts["complete"] == 0:
        raise ValueError(
            f"tune: study {study.study_name!r} has no completed trial yet "
            f"({counts}); rerun to add trials"
        )
    best, front = _best(study)
    out = {
        **_entry(best, objective_names),
        "study": study.study_name,
        "trials": counts,
        "objectives": objective_names,
    }
    if len(objective_names) > 1:
        out["pareto_front"] = [_entry(t, objective_names) for t in front]
    best_params_path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: two `ptum tune` processes on one study may finish at the same time.
    tmp = best_params_path.with_name(f".{best_params_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, best_params_path)
    out["plots"] = write_plots(study, reports_dir, objective_names)
    return out
