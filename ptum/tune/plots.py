"""PNG figures of a study: optimisation history and parameter importances per objective, plus the
Pareto front (several objectives) or the intermediate values (one objective)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState


def write_plots(study: optuna.Study, reports_dir: Path, objective_names: list[str]) -> dict:
    """Optimisation history and parameter importances per objective (+ Pareto front, +
    intermediate values) as PNG; a plot that cannot be drawn yet is skipped with a note.
    Returns plot name -> its PNG path, or the note of a skipped one."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    reports_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(objective_names) > 1
    written: dict[str, str] = {}
    for i, obj in enumerate(objective_names):
        written |= _objective_plots(study, reports_dir, complete, i, obj, multi=multi)
    if multi:
        written["pareto_front"] = _save(
            reports_dir / "pareto_front.png",
            lambda: ovm.plot_pareto_front(study, target_names=objective_names),
        )
    elif any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        written["intermediate_values"] = _save(
            reports_dir / "intermediate_values.png", lambda: ovm.plot_intermediate_values(study)
        )
    return written


def _objective_plots(
    study: optuna.Study,
    reports_dir: Path,
    complete: list[FrozenTrial],
    i: int,
    obj: str,
    *,
    multi: bool,
) -> dict[str, str]:
    """Optimisation history and parameter importances (or the note saying why not) of
    objective `i`, named `obj`; the file names take a `_obj` suffix when there are several."""
    from optuna.visualization import matplotlib as ovm

    suffix = f"_{obj}" if multi else ""

    def target(t: FrozenTrial) -> float:
        return t.values[i]

    def negated(t: FrozenTrial) -> float:
        return -t.values[i]

    history, importances = f"optimization_history{suffix}", f"param_importances{suffix}"
    tgt = target if multi else None
    written = {
        history: _save(
            reports_dir / f"{history}.png",
            partial(ovm.plot_optimization_history, study, target=tgt, target_name=obj),
        )
    }
    # With a `target`, PED-ANOVA (Optuna's default evaluator) explains *low* target values,
    # whatever the study's direction; our objectives are maximised, so it gets -value.
    imp_tgt, imp_name = (negated, f"-{obj}") if multi else (None, obj)
    note = _importances_note(study, complete, imp_tgt)
    if note is None:
        (reports_dir / f"{importances}.txt").unlink(missing_ok=True)
        written[importances] = _save(
            reports_dir / f"{importances}.png",
            partial(ovm.plot_param_importances, study, target=imp_tgt, target_name=imp_name),
        )
    else:
        (reports_dir / f"{importances}.txt").write_text(note + "\n")
        (reports_dir / f"{importances}.png").unlink(missing_ok=True)
        written[importances] = note
    return written


def _save(path: Path, draw: Callable[[], Any]) -> str:
    """Draw one of Optuna's matplotlib plots and write it to `path` (PNG); returns the path."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # Its reminder that a `target` is minimised: `negated` above takes care of that.
        warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
        ax = draw()
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _importances_note(
    study: optuna.Study, complete: list[FrozenTrial], target: Callable[[FrozenTrial], float] | None
) -> str | None:
    """Why parameter importances cannot be estimated yet, or None when they can.

    PED-ANOVA compares the parameter density of the top 10% of completed trials with that of
    all of them; with too few trials (or ties at the top) both sets are the same and every
    importance comes out equal, which Optuna only says in a warning: a plot would mislead.
    """
    if len(complete) < 2:
        return f"skipped: importances need >= 2 completed trials (have {len(complete)})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optuna.importance.get_param_importances(study, target=target)
    for w in caught:
        if "importances will be equal" in str(w.message):
            return f"skipped ({len(complete)} completed trials): {w.message}"
    return None
