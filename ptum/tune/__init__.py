"""Tuning: an Optuna search over the pre-training hyper-parameters K, λ, P and the lr.

One trial = one short pre-training of a user model (default HSA, the paper's Demo model) with
sampled K, λ, P and learning rate, then a brief fine-tuning on the demographic task, scored on
validation only. The modules, one job each:

- `trial`: the search space and the trial set-up (`SearchSpace`, `TrialSetup`);
- `objective`: one trial's score, and the intermediate value the pruner sees (they differ);
- `database`: which database a storage URL names (SQLite, PostgreSQL), connecting to it, and
  its failures as one line;
- `storage`: the RDB storage, safe to open from simultaneous workers, with heartbeats;
- `integrity`: the checks of a study read back (a damaged file, impossible stored values);
- `study`: study name and user attrs, pruner, opening the study from a worker;
- `budget`: running trials to the exact `n_trials` over any number of workers, progress bar;
- `outputs`, `plots`: best_params.json and the PNG figures of a finished study;
- `search`: `tune`, the whole search (worker processes, then the outputs).
"""

from ptum.tune.budget import CLAIMED, DONE, run_trials
from ptum.tune.database import StorageUnreachable
from ptum.tune.integrity import StudyDamaged, check_store, check_values
from ptum.tune.objective import load_data, make_objective
from ptum.tune.outputs import write_outputs
from ptum.tune.plots import write_plots
from ptum.tune.search import WorkerFailed, run_worker, tune
from ptum.tune.storage import make_storage
from ptum.tune.study import (
    PRUNERS,
    StudySpec,
    default_study_name,
    make_pruner,
    open_setup_study,
    open_study,
    study_attrs,
)
from ptum.tune.trial import SearchSpace, TrialSetup

__all__ = [
    "CLAIMED",
    "DONE",
    "PRUNERS",
    "SearchSpace",
    "StudyDamaged",
    "StorageUnreachable",
    "StudySpec",
    "TrialSetup",
    "WorkerFailed",
    "check_store",
    "check_values",
    "default_study_name",
    "load_data",
    "make_objective",
    "make_pruner",
    "make_storage",
    "open_setup_study",
    "open_study",
    "run_trials",
    "run_worker",
    "study_attrs",
    "tune",
    "write_outputs",
    "write_plots",
]
