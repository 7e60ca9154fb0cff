"""Stage `tune`: the Optuna search over K, λ, P and the pre-training lr (data/tune, reports/tune)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ptum import paths
from ptum.config import Params, to_dict
from ptum.finetune.stage import cell_options
from ptum.pretrain.stage import train_options
from ptum.stages.errors import reading
from ptum.tune import (
    SearchSpace,
    StudySpec,
    TrialSetup,
    check_store,
    default_study_name,
    tune,
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
    t = p.tune
    check_store(t.storage)  # a damaged study file is named before the data are hashed
    setup = TrialSetup(
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
    spec = StudySpec(
        storage=t.storage,
        study_name=t.study_name or default_study_name(setup, t.seed),
        n_trials=t.n_trials,
        seed=t.seed,
        pruner=t.pruner,
        prune_startup_trials=t.prune_startup_trials,
        heartbeat_interval=t.heartbeat_interval,
        grace_period=t.grace_period,
        retry_killed=t.retry_killed,
        worker=worker,
    )
    with reading(prepared, paths.TOKENIZED):
        summary = tune(
            setup=setup,
            spec=spec,
            best_params_path=out / paths.BEST_PARAMS.name,
            reports_dir=out / paths.TUNE_FIGURES.name,
            n_workers=workers or t.workers,
        )
    return {k: v for k, v in summary.items() if k != "pareto_front"}
