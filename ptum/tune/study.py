"""The study: its name, what it records about itself, its pruner, and opening it from any worker.

- Pruning: the pruner (median | hyperband | none) may stop a trial after any epoch's report of
  its intermediate value (`ptum.tune.objective`). Optuna's MedianPruner waits for
  `n_startup_trials` *complete* trials (pruned ones do not count) and then prunes a trial whose
  best value so far is below the median of the complete trials at the same epoch. Steps start
  at 1, so `n_warmup_steps` 0 and 1 both allow pruning after the first epoch. With a budget of n
  trials it can prune at most n - startup of them: the default `prune_startup_trials` = 2 lets
  a 4-trial study prune; 5 never could.
- Seeds: the sampler is `TPESampler(seed=seed + start + 7919 * worker)`, where `start` counts the
  worker starts on the study (claimed under the creation lock): a resumed study does not replay
  the draws of its first start, and workers started together do not draw alike. A single-worker
  study is reproducible: the same parameter sequence and values. With several workers the order
  in which trials finish is up to the OS, so it is not.
- Study names: `default_study_name` is readable — `ptum-ARCH-METRIC-dataHASH-cfgHASH` — and
  changes with the data and with what a trial measures (model, options, search space, seed), so
  such a change starts a new study in the same storage rather than mixing incomparable trials;
  an explicitly named study that records other data, architecture or objectives is refused.
  The study's user attrs say what it measures (`study_attrs`), so optuna-dashboard shows it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from ptum.data.corpus import file_digest
from ptum.tune.database import connecting
from ptum.tune.integrity import check_store, check_values, read_all, reading_study
from ptum.tune.storage import creation_lock, rdb_storage, retry_race
from ptum.tune.trial import Direction, TrialSetup, directions, log, objective_names

PRUNERS = ("median", "hyperband", "none")


def make_pruner(name: str, *, epochs: int, startup_trials: int = 2) -> optuna.pruners.BasePruner:
    """median | hyperband | none; steps are pre-training epochs completed (1..epochs).

    Median: no pruning until `startup_trials` trials are *complete*; after that a trial is
    pruned after any epoch (warm-up 0: steps start at 1) whose best value so far is below the
    median of the complete trials at that epoch. Hyperband: one successive-halving bracket per
    power of 3 in `epochs` (one bracket for 2 epochs), first rung after epoch 1.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(epochs, 1), reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"tune: unknown pruner {name!r}; choose from {list(PRUNERS)}")


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """Where the study lives and how its trials are drawn: params.yaml's `tune.*` keys of the
    same names (`ptum.stages.tune.study_spec` builds it; no defaults of their own)."""

    storage: str
    study_name: str
    n_trials: int
    seed: int
    pruner: str | optuna.pruners.BasePruner
    # Complete trials before the median pruner may prune (< n_trials, or it never prunes).
    prune_startup_trials: int
    heartbeat_interval: int
    grace_period: int
    retry_killed: int
    # Index of this process among workers started by hand on several machines (distinct per
    # machine): it offsets the sampler seed so that simultaneous starts do not draw alike.
    worker: int = 0
    # The params.yaml section the study's settings come from, recorded in the study's attrs.
    params_section: str = "tune"


def _data_files(setup: TrialSetup) -> list[Path]:
    """The files whose bytes are the study's data version (labels included: they are scored)."""
    prepared = [
        setup.prepared / n for n in ("sequences.parquet", "users.parquet", "labels.parquet")
    ]
    return [*prepared, setup.tokenized / "tokens.npy"]


def _data_digest(setup: TrialSetup) -> str:
    return file_digest(_data_files(setup))


def _config(setup: TrialSetup, seed: int) -> dict[str, Any]:
    """What a trial measures besides the data, as JSON values (paths and device left out)."""
    what = {
        k: v
        for k, v in asdict(setup).items()
        if k not in ("prepared", "tokenized", "device", "work_dir")
    }
    return json.loads(json.dumps({**what, "sampler_seed": seed}, sort_keys=True, default=str))


def _config_digest(setup: TrialSetup, seed: int) -> str:
    return hashlib.sha256(json.dumps(_config(setup, seed), sort_keys=True).encode()).hexdigest()


def default_study_name(setup: TrialSetup, seed: int) -> str:
    """`ptum-ARCH-METRIC-dataHASH-cfgHASH`, e.g. `ptum-hsa-demo-acc-data3f2a1b9c-cfg9d0e1f`.

    dataHASH: the first 8 hex digits of the data version (`study_attrs`' data_sha256);
    cfgHASH: 6 of a hash over everything else a trial measures (model, options, search space,
    seed). Changing either starts a new study in the same storage instead of mixing
    incomparable trials, while raising n_trials (or restarting) resumes the same one.
    """
    metric = "+".join(n.replace("_valid_", "-") for n in objective_names(setup))
    data, cfg = _data_digest(setup), _config_digest(setup, seed)
    return f"ptum-{setup.arch}-{metric}-data{data[:8]}-cfg{cfg[:6]}"


def study_attrs(setup: TrialSetup, spec: StudySpec) -> dict[str, Any]:
    """What the study measures, stored as its user attrs (optuna-dashboard shows them)."""
    labels = list(setup.demo_labels) or "every label column of the data"
    metric = f"validation {setup.demo_select}, mean over the demographic labels"
    value = (
        f"{metric}, after fine-tuning the final pre-trained model (encoder and head, up to "
        f"{setup.finetune.max_epochs} epochs, early stopping on validation), label ratio "
        f"{setup.ratio}"
    )
    if setup.multi_objective:
        value += "; and the CTR validation AUC after the same fine-tuning"
        intermediate = "none (Optuna does not prune multi-objective studies)"
    else:
        intermediate = (
            f"{metric}, of a head trained for {setup.prune_head_epochs} epochs on the frozen "
            f"user vectors after each pre-training epoch (step = epochs completed, "
            f"1..{setup.base.epochs}); not the fine-tuned value"
        )
    return {
        "task": "pre-training hyper-parameters k, lam, p, lr (ptum tune)",
        "params_section": spec.params_section,
        "arch": setup.arch,
        "behavior_encoder": setup.behavior_encoder or "the architecture's own",
        "data_sha256": _data_digest(setup),
        "data_files": [f.name for f in _data_files(setup)],
        "objectives": objective_names(setup),
        "directions": directions(setup),
        "demo_labels": labels,
        "value": value,
        "intermediate_value": intermediate,
        "pretrain_epochs": setup.base.epochs,
        "config": _config(setup, spec.seed),
        "config_sha256": _config_digest(setup, spec.seed),
    }


# A study that records other values of these measures something else: refuse to add to it.
_IDENTITY = ("arch", "data_sha256", "objectives", "directions")


def _record_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    have = study.user_attrs
    clash = [k for k in _IDENTITY if k in have and k in attrs and have[k] != attrs[k]]
    if clash:
        diff = "; ".join(f"{k}: {have[k]!r} in the study, {attrs[k]!r} here" for k in clash)
        raise ValueError(
            f"tune: study {study.study_name!r} measures something else ({diff}); "
            "choose another study name"
        )
    for k, v in attrs.items():
        if k not in have:  # first start (or a study from before these attrs)
            study.set_user_attr(k, v)


_STARTS = "ptum:worker_starts"


def _pruner(
    spec: StudySpec, *, n_objectives: int, epochs: int, warn: bool
) -> optuna.pruners.BasePruner:
    """The pruner `spec` names (none for several objectives); with `warn`, a line when the
    median pruner cannot prune within the study's budget."""
    if n_objectives > 1 or spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if not isinstance(spec.pruner, str):
        return spec.pruner
    never = spec.pruner == "median" and spec.prune_startup_trials >= spec.n_trials
    if never and warn:
        log(
            f"tune: the median pruner never prunes here: it waits for "
            f"prune_startup_trials={spec.prune_startup_trials} complete trials and the "
            f"study holds n_trials={spec.n_trials}"
        )
    return make_pruner(spec.pruner, epochs=epochs, startup_trials=spec.prune_startup_trials)


def _create(
    spec: StudySpec, directions: list[Direction]
) -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    """The storage and the study (created if new), with every stored row decoded once: a
    damaged database fails here with a `StudyDamaged` naming it (`ptum.tune.integrity`)."""
    check_store(spec.storage)
    with reading_study(spec.storage):
        storage = retry_race(
            lambda: rdb_storage(
                spec.storage,
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
                retry_killed=spec.retry_killed,
            )
        )
        study = retry_race(
            lambda: optuna.create_study(
                storage=storage,
                study_name=spec.study_name,
                directions=directions,
                load_if_exists=True,
            )
        )
    read_all(study, spec.storage)
    return storage, study


def open_study(
    spec: StudySpec,
    *,
    directions: list[Direction],
    attrs: Mapping[str, Any],
    epochs: int,
    worker: int | None = None,
) -> optuna.Study:
    """Create or load the study, safely from several processes at once.

    Records `attrs` as the study's user attrs (first start) and refuses a study whose recorded
    identity (`_IDENTITY`) or directions differ. The pruner follows `spec` (none for several
    objectives; `epochs` sizes hyperband). With `worker` (an index) the study gets a seeded
    TPE sampler for this worker's trials; without, it is only for reading. A damaged database
    is refused with a `StudyDamaged` naming it and the fix (`ptum.tune.integrity`), a
    PostgreSQL database that cannot be used with a `StorageUnreachable` (`ptum.tune.database`).
    """
    with connecting(spec.storage):
        return _open_study(spec, directions=directions, attrs=attrs, epochs=epochs, worker=worker)


def _open_study(
    spec: StudySpec,
    *,
    directions: list[Direction],
    attrs: Mapping[str, Any],
    epochs: int,
    worker: int | None,
) -> optuna.Study:
    with creation_lock(spec.storage):
        storage, study = _create(spec, directions)
        if [d.name.lower() for d in study.directions] != list(directions):
            raise ValueError(
                f"tune: study {spec.study_name!r} exists with other objectives; "
                "choose another study name"
            )
        _record_attrs(study, attrs)
        if "objectives" in attrs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(list(attrs["objectives"]))
        start = 0
        if worker is not None:
            # Under the lock two simultaneous starts get distinct numbers (on PostgreSQL
            # across machines too); `worker` keeps machines apart besides.
            study_id = storage.get_study_id_from_name(spec.study_name)
            start = int(storage.get_study_system_attrs(study_id).get(_STARTS, 0))
            storage.set_study_system_attr(study_id, _STARTS, start + 1)
    pruner = _pruner(spec, n_objectives=len(directions), epochs=epochs, warn=worker is not None)
    sampler = None
    if worker is not None:
        sampler = optuna.samplers.TPESampler(seed=spec.seed + start + 7919 * worker)
    return optuna.load_study(
        study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner
    )


def open_setup_study(
    spec: StudySpec, setup: TrialSetup, *, worker: int | None = None
) -> optuna.Study:
    """`open_study` for the trials of `setup`: its directions, user attrs and epochs. Refuses
    a study holding a value its objectives cannot take (`ptum.tune.integrity.check_values`)."""
    study = open_study(
        spec,
        directions=directions(setup),
        attrs=study_attrs(setup, spec),
        epochs=setup.base.epochs,
        worker=worker,
    )
    check_values(study, spec.storage, objective_names(setup))
    return study
