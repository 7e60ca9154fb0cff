"""Stage `tune`: the Optuna search over K, λ, P and the pre-training lr (data/tune, reports/tune)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ptum import paths
from ptum.config import Params, TuneConfig, to_dict
from ptum.stages.errors import StageError, reading
from ptum.stages.finetune import cell_options
from ptum.stages.pretrain import train_options
from ptum.tune import (
    SearchSpace,
    StudySpec,
    TrialSetup,
    WorkerFailed,
    check_store,
    default_study_name,
    tune,
)


def trial_setup(p: Params, *, prepared: Path = paths.PREPARED) -> TrialSetup:
    """What every trial trains and scores, from the tune, pretrain and finetune sections: the
    pretrain options with tune.epochs and tune.seed, the finetune options with
    tune.finetune_epochs."""
    t = p.tune
    return TrialSetup(
        prepared=prepared,
        tokenized=paths.TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        arch=t.arch,
        behavior_encoder=p.pretrain.behavior_encoder,
        model_sizes=to_dict(p.pretrain.model),
        base=replace(train_options(p.pretrain), epochs=t.epochs, seed=t.seed),
        space=SearchSpace(k=t.k, lam=t.lam, p=t.p, lr=t.lr),
        finetune=replace(cell_options(p.finetune), max_epochs=t.finetune_epochs),
        demo_select=p.finetune.demo_select,
        multi_objective=t.multi_objective,
        device=p.pretrain.device,
        work_dir=paths.TUNE_TRIALS,
    )


def study_spec(t: TuneConfig, *, study_name: str, worker: int = 0) -> StudySpec:
    """Where the study lives and how its trials are drawn, from the `tune:` section, under
    `study_name` (tune.study_name, or when that is "" the name derived from the set-up)."""
    return StudySpec(
        storage=t.storage,
        study_name=study_name,
        n_trials=t.n_trials,
        seed=t.seed,
        pruner=t.pruner,
        prune_startup_trials=t.prune_startup_trials,
        heartbeat_interval=t.heartbeat_interval,
        grace_period=t.grace_period,
        retry_killed=t.retry_killed,
        worker=worker,
    )


def run(
    p: Params,
    *,
    prepared: Path = paths.PREPARED,
    out: Path = paths.TUNE_REPORTS,
    workers: int = 0,
    worker: int = 0,
) -> dict:
    """Run (or resume) the study to tune.n_trials; write out/best_params.json and out/figures.

    `workers` (0: tune.workers) local processes; `worker` is this machine's index among machines
    running one study by hand. Returns the study's summary without its Pareto front.
    """
    check_store(p.tune.storage)  # a damaged study file is named before the data are hashed
    setup = trial_setup(p, prepared=prepared)
    name = p.tune.study_name or default_study_name(setup, p.tune.seed)
    spec = study_spec(p.tune, study_name=name, worker=worker)
    with reading(prepared, paths.TOKENIZED), _worker_failures():
        summary = tune(
            setup=setup,
            spec=spec,
            best_params_path=out / paths.BEST_PARAMS.name,
            reports_dir=out / paths.TUNE_FIGURES.name,
            n_workers=workers or p.tune.workers,
        )
    return {k: v for k, v in summary.items() if k != "pareto_front"}


@contextmanager
def _worker_failures() -> Iterator[None]:
    """A local worker that failed or was killed is a one-line error, not a bug: the study keeps
    its finished trials and a rerun resumes it (the worker's own error is printed above)."""
    try:
        yield
    except WorkerFailed as exc:
        raise StageError(f"tune: {exc}") from exc
