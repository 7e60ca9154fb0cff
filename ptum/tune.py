"""Stage `tune`: an Optuna search over the pre-training hyper-parameters K, λ, P and the lr.

One trial = one short pre-training of a user model (default HSA, the paper's Demo model) with
sampled K (next behaviors predicted), λ (NBP loss weight; 0 = MBP only), P (negatives per
positive) and learning rate, into a temporary checkpoint directory; then a brief fine-tuning on
the demographic task. Demographic test labels are hidden from every tuning cell; `run_ctr`
(multi-objective mode) always scores its test window too, and that score is dropped unread.
Tuning never selects on a test split.

- What a trial measures. Both numbers below are the same metric on the same split — the mean
  over the demographic labels of the *validation* `demo_select` (acc | macro_f1), label ratio
  `ratio` — but of two different models:
  * intermediate value, reported with `trial.report(value, epoch)` after each pre-training
    epoch (epoch = epochs completed, 1..`base.epochs`): a fresh head trained for
    `prune_head_epochs` epochs on the *frozen* user vectors of the model so far (cheap);
  * the trial's value: the final pre-trained model *fine-tuned* (encoder and head,
    `finetune` options, early stopping on validation) — usually higher than the last
    intermediate value, so the two are not interchangeable. Pruning compares intermediate
    values of different trials at the same epoch only, which is consistent.
  The study's user attrs spell this out (`value`, `intermediate_value`), with the data version,
  architecture, objectives and directions, so optuna-dashboard shows what a study measures.
- Pruning: the pruner (median | hyperband | none) may stop a trial after any epoch's report.
  Optuna's MedianPruner waits for `n_startup_trials` *complete* trials (pruned ones do not
  count) and then prunes a trial whose best value so far is below the median of the complete
  trials at the same epoch. Steps start at 1, so `n_warmup_steps` 0 and 1 both allow pruning
  after the first epoch. With a budget of n trials it can prune at most n - startup of them:
  the default `prune_startup_trials` = 2 lets a 4-trial study prune; 5 never could.
- Multi-objective mode: (Demo validation metric, CTR validation AUC), both maximised; the Pareto
  front is `study.best_trials`. Optuna does not prune multi-objective studies, so nothing is
  reported per epoch there.
- Storage: an RDB URL (SQLite by default, PostgreSQL for several machines) with
  `load_if_exists=True`, so a rerun resumes the study. Creating the tables and the study is
  serialised between processes by a lock file next to a SQLite database, and retried when
  another process won the race (PostgreSQL), so workers may start at the same instant. Trials
  record a heartbeat; a trial whose process died (SIGKILL, lost machine) stops beating and is
  marked FAIL by the next process that starts a trial on the study, after `grace_period`
  seconds (and re-queued with the same parameters once when `retry_killed` > 0). RDBStorage
  rather than JournalStorage because only RDB storages implement Optuna's heartbeat, and
  optuna-dashboard opens the same URL directly. SQLite copes with a few local workers (trials
  take seconds to minutes, writes are rare; a 60 s busy timeout absorbs lock contention) but
  not with a network filesystem: across machines, use one PostgreSQL URL and start `ptum tune`
  on each machine with the same study name; that is Optuna's own distributed mode.
- Budget: `n_trials` is the number of complete + pruned trials the study ends with, whoever
  ran them. Each trial, once created, counts the trials ahead of it (finished ones, and running
  or queued ones with a smaller number); if the budget is already taken it ends as FAIL before
  any work (user attr `surplus`) and its worker stops. Trial numbers follow creation order, so
  no number of concurrent workers overshoots the budget; a run falls short only when a running
  trial fails, and the next run adds the missing ones.
- Seeds: the sampler is `TPESampler(seed=seed + start + 7919 * worker)`, where `start` counts
  the worker starts on the study (claimed under the creation lock): a resumed study does not
  replay the draws of its first start, and workers started together do not draw alike. Trial i
  pre-trains and fine-tunes with seed `seed + i`. A single-worker study is reproducible: the
  same parameter sequence and values. With several workers the order in which trials finish
  is up to the OS, so it is not.
- Study names: `default_study_name` is readable — `ptum-ARCH-METRIC-dataHASH-cfgHASH` — and
  changes with the data and with what a trial measures (model, options, search space, seed),
  so such a change starts a new study in the same storage rather than mixing incomparable
  trials; an explicitly named study that records other data, architecture or objectives is
  refused.
- Progress: a tqdm bar over the study's finished trials (all workers'), on stderr only when it
  is a terminal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import sqlalchemy.exc
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from ptum import checkpoint
from ptum.finetune.grid import CtrTask, DemoTask, load_ctr, load_demo
from ptum.finetune.train import CellOptions, run_ctr, run_demo
from ptum.models.behavior import ID_MIN_COUNT
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.data import Corpus, file_digest, load_corpus, tokenizer_digest
from ptum.pretrain.id_vocab import IdVocab
from ptum.pretrain.stage import corpus_id_vocab
from ptum.pretrain.train import TrainOptions, pick_device, pretrain

PRUNERS = ("median", "hyperband", "none")
# Trials that count towards the study's n_trials (a FAIL is retried by the next run).
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that hold a place in the budget: finished, running, or queued to run.
CLAIMED = (*DONE, TrialState.RUNNING, TrialState.WAITING)


def _log(msg: str) -> None:
    # Through tqdm: a progress bar on the terminal is cleared, and redrawn below the line.
    tqdm.write(msg, file=sys.stderr)


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples: integer ranges are inclusive, lr is sampled log-uniformly."""

    k: tuple[int, int] = (1, 5)
    lam: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    p: tuple[int, int] = (1, 16)
    lr: tuple[float, float] = (1e-4, 1e-2)

    def __post_init__(self) -> None:
        if not 1 <= self.k[0] <= self.k[1]:
            raise ValueError(f"tune: k range {self.k} must satisfy 1 <= low <= high")
        if not 1 <= self.p[0] <= self.p[1]:
            raise ValueError(f"tune: p range {self.p} must satisfy 1 <= low <= high")
        if not 0 < self.lr[0] < self.lr[1]:
            raise ValueError(f"tune: lr range {self.lr} must satisfy 0 < low < high")
        if not self.lam or min(self.lam) < 0:
            raise ValueError(f"tune: lam choices {self.lam} must be non-empty and >= 0")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        # Choices as floats: a study reloaded with [0, 1] from YAML must see the same
        # categorical distribution as one created with [0.0, 1.0].
        return {
            "k": trial.suggest_int("k", *self.k),
            "lam": trial.suggest_categorical("lam", [float(v) for v in self.lam]),
            "p": trial.suggest_int("p", *self.p),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
        }


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial trains and scores except the sampled hyper-parameters.

    `base` holds the pre-training options that are not tuned (batch size, negatives, ...); its
    k / lam / p / lr / seed are replaced per trial and its `epochs` is the (short) pre-training
    length of a trial. `finetune` is the brief fine-tuning that gives the trial's value.
    """

    prepared: Path
    tokenized: Path
    max_behaviors: int
    arch: str = "hsa"
    behavior_encoder: str = ""  # "" = the architecture's own
    model_sizes: Mapping[str, int | float] = field(default_factory=dict)  # word_dim, dim, ...
    base: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=2))
    space: SearchSpace = field(default_factory=SearchSpace)
    finetune: CellOptions = field(default_factory=lambda: CellOptions(max_epochs=3))
    demo_select: str = "acc"  # acc | macro_f1
    demo_labels: tuple[str, ...] = ()  # () = every label column of the data
    ratio: float = 1.0  # label ratio of the fine-tuning (a prepare.label_ratios entry)
    prune_head_epochs: int = 5  # epochs of the frozen-vector head behind the pruning metric
    multi_objective: bool = False
    device: str = "auto"
    work_dir: Path | None = None  # parent of the per-trial checkpoint dirs (None = system tmp)


@dataclass
class _Data:
    """What a worker process loads once and every trial of it reuses."""

    train: Corpus
    valid: Corpus
    config: ModelConfig
    meta: dict[str, Any]
    demo: DemoTask
    labels: list[str]
    ctr: CtrTask | None
    id_vocab: IdVocab | None = None  # hybrid encoder: the corpus's item-id vocabulary


def _load(s: TrialSetup) -> _Data:
    train = load_corpus(s.prepared, s.tokenized, "train", s.max_behaviors)
    valid = load_corpus(s.prepared, s.tokenized, "valid", s.max_behaviors)
    vocab_size = int(json.loads((s.tokenized / "report.json").read_text())["vocab_size"])
    sizes = dict(s.model_sizes)
    id_vocab = None
    if s.behavior_encoder == "hybrid":  # as in the pretrain stage
        id_vocab = corpus_id_vocab(s.prepared, train, sizes.get("id_min_count", ID_MIN_COUNT))
    config = ModelConfig.for_architecture(
        s.arch,
        behavior_encoder=s.behavior_encoder,
        vocab_size=vocab_size,
        max_tokens=int(train.tokens.shape[1]),
        max_behaviors=s.max_behaviors,
        num_items=train.num_items + 1,
        id_vocab=id_vocab.size if id_vocab else 0,
        **sizes,
    )
    if config.behavior_encoder == "id":
        # As in the pretrain stage: the id encoder reads the item id itself as its one "token".
        ids = torch.arange(train.num_items + 1).unsqueeze(1)
        train = replace(train, tokens=ids)
        valid = replace(valid, tokens=ids)
    meta = {
        "architecture": s.arch,
        "tokenizer_sha256": tokenizer_digest(s.tokenized),
        "data_sha256": file_digest(
            [
                s.prepared / "sequences.parquet",
                s.prepared / "users.parquet",
                s.tokenized / "tokens.npy",
            ]
        ),
        "max_behaviors": s.max_behaviors,
    }
    demo = load_demo(s.prepared, s.tokenized, s.max_behaviors, [s.ratio])
    labels = list(s.demo_labels) or list(demo.labels)
    unknown = sorted(set(labels) - set(demo.labels))
    if unknown or not labels:
        raise ValueError(
            f"tune: demographic labels {unknown or labels} not in the data "
            f"(has {sorted(demo.labels)})"
        )
    # Hide the test labels: a tuning cell then never scores (let alone selects on) the test
    # split. run_demo scores the empty test set as NaN, which is never read.
    hidden = {
        lab: (np.where(demo.split == "test", -1, y), classes)
        for lab, (y, classes) in demo.labels.items()
    }
    demo = replace(demo, labels=hidden)
    ctr = None
    if s.multi_objective:
        ctr = load_ctr(s.prepared, s.tokenized, s.max_behaviors, [s.ratio])
    return _Data(train, valid, config, meta, demo, labels, ctr, id_vocab)


def _demo_value(
    model: UserModel,
    d: _Data,
    s: TrialSetup,
    *,
    mode: str,
    opts: CellOptions,
    seed: int,
    device: torch.device,
) -> tuple[float, dict[str, float]]:
    """Mean over labels of the validation metric of one demographic cell per label."""
    per_label = {}
    for lab in d.labels:
        y, classes = d.demo.labels[lab]
        rows = np.flatnonzero(d.demo.subsets[s.ratio] & (y >= 0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            res = run_demo(
                pretrained=model,
                corpus=d.demo.corpus,
                y=y,
                split=d.demo.split,
                train_rows=rows,
                n_classes=len(classes),
                mode=mode,
                seed=seed,
                opts=opts,
                select=s.demo_select,
                device=device,
            )
        per_label[lab] = float(res["valid"][s.demo_select])
    return float(np.mean(list(per_label.values()))), per_label


def _objective(d: _Data, s: TrialSetup) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    device = pick_device(s.device)
    prune_opts = replace(s.finetune, max_epochs=s.prune_head_epochs)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        hp = s.space.suggest(trial)
        seed = s.base.seed + trial.number
        opts = replace(s.base, seed=seed, **hp)
        trial.set_user_attr("seed", seed)

        def on_epoch(epoch: int, model: UserModel, metrics: dict) -> None:
            for key in ("valid_mbp_acc", "valid_nbp_acc", "valid_loss"):
                if key in metrics:
                    trial.set_user_attr(f"pretrain_{key}_e{epoch}", float(metrics[key]))
            if s.multi_objective:
                return  # Trial.report / should_prune are single-objective only
            value, _ = _demo_value(
                model, d, s, mode="frozen", opts=prune_opts, seed=seed, device=device
            )
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after pre-training epoch {epoch}: {value:.4f}")

        if s.work_dir is not None:
            s.work_dir.mkdir(parents=True, exist_ok=True)
        out_dir = Path(tempfile.mkdtemp(prefix=f"trial{trial.number}-", dir=s.work_dir))
        try:
            pretrain(
                train=d.train,
                valid=d.valid,
                config=d.config,
                opts=opts,
                out_dir=out_dir,
                meta={**d.meta, "tune_trial": trial.number},
                device=device,
                resume=False,
                log=lambda m: _log(f"trial {trial.number}: {m}"),
                on_epoch=on_epoch,
                progress=False,  # the study has its own bar
                id_vocab=d.id_vocab,
            )
            model = checkpoint.load(out_dir).model
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        demo, per_label = _demo_value(
            model, d, s, mode="finetune", opts=s.finetune, seed=seed, device=device
        )
        for lab, v in per_label.items():
            trial.set_user_attr(f"valid_{lab}_{s.demo_select}", v)
        if not s.multi_objective:
            return demo
        assert d.ctr is not None
        train_idx = np.flatnonzero(d.ctr.subsets[s.ratio])
        res = run_ctr(
            pretrained=model,
            data=d.ctr.data,
            train_idx=train_idx,
            mode="finetune",
            seed=seed,
            opts=s.finetune,
            device=device,
        )
        return demo, float(res["valid"]["auc"])  # res["test"] is never read

    return objective


# ---------------------------------------------------------------- storage


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///"))
    return None


@contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on `<db>.lock` next to a SQLite database (no-op for other URLs).

    Two processes that open a new database at the same instant both create Optuna's tables and
    stamp its schema version, and one of them fails (`table studies already exists`, `UNIQUE
    constraint failed: alembic_version`). flock is per open file, so do not nest this.
    """
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# What a database says when another process created the same table / row first.
_RACE_MESSAGES = ("already exists", "unique constraint", "duplicate key")
T = TypeVar("T")


def _retry_race(make: Callable[[], T], *, attempts: int = 5) -> T:
    """`make()`, again (up to `attempts` times) if it lost a creation race to another process:
    a database without a lock file (PostgreSQL) can see two workers create Optuna's tables at
    once; the second attempt finds them and goes on. Any other error is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return make()
        except sqlalchemy.exc.DBAPIError as e:
            lost_race = any(m in str(e).lower() for m in _RACE_MESSAGES)
            if not lost_race or attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _rdb_storage(
    url: str, *, heartbeat_interval: int, grace_period: int, retry_killed: int
) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat API is experimental
        callback = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry_killed)
            if retry_killed > 0
            else _report_stale
        )
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=callback,
        )


def make_storage(
    url: str, *, heartbeat_interval: int = 60, grace_period: int = 180, retry_killed: int = 1
) -> optuna.storages.RDBStorage:
    """RDB storage with trial heartbeats and a 60 s SQLite busy timeout, safe to create from
    several processes at once (see `_creation_lock`, `_retry_race`).

    A RUNNING trial without a heartbeat for `grace_period` seconds is marked FAIL (its process
    died) just before this storage's next trial starts; with `retry_killed` > 0 its parameters
    are queued again (as a new trial) up to that many times.
    """
    with _creation_lock(url):
        return _retry_race(
            lambda: _rdb_storage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                retry_killed=retry_killed,
            )
        )


def _report_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    _log(f"tune: trial {trial.number} of {study.study_name} lost its process; marked FAIL")


# ---------------------------------------------------------------- study


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


@dataclass(frozen=True)
class StudySpec:
    """Where the study lives and how its trials are drawn (see `tune` for each field)."""

    storage: str
    study_name: str
    n_trials: int = 20
    seed: int = 0
    pruner: str | optuna.pruners.BasePruner = "median"
    # Complete trials before the median pruner may prune (< n_trials, or it never prunes).
    prune_startup_trials: int = 2
    heartbeat_interval: int = 60
    grace_period: int = 180
    retry_killed: int = 1
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
    metric = "+".join(n.replace("_valid_", "-") for n in _objective_names(setup))
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
        "objectives": _objective_names(setup),
        "directions": _directions(setup),
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


def _directions(s: TrialSetup) -> list[str]:
    return ["maximize", "maximize"] if s.multi_objective else ["maximize"]


def _objective_names(s: TrialSetup) -> list[str]:
    demo = f"demo_valid_{s.demo_select}"
    return [demo, "ctr_valid_auc"] if s.multi_objective else [demo]


_STARTS = "ptum:worker_starts"


def open_study(
    spec: StudySpec,
    *,
    directions: list[str],
    attrs: Mapping[str, Any],
    epochs: int,
    worker: int | None = None,
) -> optuna.Study:
    """Create or load the study, safely from several processes at once.

    Records `attrs` as the study's user attrs (first start) and refuses a study whose recorded
    identity (`_IDENTITY`) or directions differ. The pruner follows `spec` (none for several
    objectives; `epochs` sizes hyperband). With `worker` (an index) the study gets a seeded
    TPE sampler for this worker's trials; without, it is only for reading.
    """
    with _creation_lock(spec.storage):
        storage = _retry_race(
            lambda: _rdb_storage(
                spec.storage,
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
                retry_killed=spec.retry_killed,
            )
        )
        study = _retry_race(
            lambda: optuna.create_study(
                storage=storage,
                study_name=spec.study_name,
                directions=directions,
                load_if_exists=True,
            )
        )
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
            # Under the lock (SQLite) two simultaneous starts get distinct numbers; across
            # machines `worker` keeps them apart.
            study_id = storage.get_study_id_from_name(spec.study_name)
            start = int(storage.get_study_system_attrs(study_id).get(_STARTS, 0))
            storage.set_study_system_attr(study_id, _STARTS, start + 1)
    if len(directions) > 1 or spec.pruner == "none":
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    elif isinstance(spec.pruner, str):
        pruner = make_pruner(spec.pruner, epochs=epochs, startup_trials=spec.prune_startup_trials)
        never = spec.pruner == "median" and spec.prune_startup_trials >= spec.n_trials
        if never and worker is not None:
            _log(
                f"tune: the median pruner never prunes here: it waits for "
                f"prune_startup_trials={spec.prune_startup_trials} complete trials and the "
                f"study holds n_trials={spec.n_trials}"
            )
    else:
        pruner = spec.pruner
    sampler = None
    if worker is not None:
        sampler = optuna.samplers.TPESampler(seed=spec.seed + start + 7919 * worker)
    return optuna.load_study(
        study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner
    )


def _open(spec: StudySpec, setup: TrialSetup, *, worker: int | None = None) -> optuna.Study:
    return open_study(
        spec,
        directions=_directions(setup),
        attrs=study_attrs(setup, spec),
        epochs=setup.base.epochs,
        worker=worker,
    )


# ---------------------------------------------------------------- budget and progress


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


class _Progress:
    """tqdm bar of the study's finished trials, all workers' (an Optuna callback); disabled
    when stderr is not a terminal, and then it never queries the storage."""

    def __init__(self, study: optuna.Study, total: int) -> None:
        self.study = study
        # disable=None: tqdm turns itself off when its stream (stderr) is not a TTY.
        self.bar = tqdm(total=total, unit="trial", desc="tune trials", disable=None)
        self.refresh()

    def refresh(self) -> None:
        if self.bar.disable:
            return
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
    objective runs. With `progress`, a tqdm bar on stderr (when it is a terminal).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # A dead worker's RUNNING trial would hold a place until the first trial here starts.
        optuna.storages.fail_stale_trials(study)
    busy = (*DONE, TrialState.RUNNING)
    if len(study.get_trials(deepcopy=False, states=busy)) >= n_trials:
        return

    def guarded(trial: optuna.Trial) -> Any:
        ahead = _places_ahead(study, trial.number)
        if ahead >= n_trials:
            why = f"{ahead} trials held the budget of {n_trials}"
            trial.set_user_attr("surplus", why)
            _log(f"tune: trial {trial.number} not run, this worker stops: {why}")
            study.stop()
            raise _BudgetReached(trial.number)
        return objective(trial)

    # After each trial: stop once the finished and running trials fill the budget (the check
    # above catches the case where two workers pass this at the same moment).
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        optuna.study.MaxTrialsCallback(n_trials, states=busy)
    ]
    bar = _Progress(study, n_trials) if progress else None
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


# ---------------------------------------------------------------- workers


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
    data = _load(setup)
    study = _open(spec, setup, worker=worker)
    run_trials(
        study,
        _objective(data, setup),
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
    writes `best_params_path` (k, lam, p, lr, value, trial number; in multi-objective mode the
    Pareto trial with the best mean of the objectives, plus the whole front) and PNG plots into
    `reports_dir`. Returns a summary: trial counts per state and the best trial.
    """
    if n_workers < 1:
        raise ValueError("tune: n_workers must be >= 1")
    study = _open(spec, setup)
    remaining = max(0, spec.n_trials - len(study.get_trials(deepcopy=False, states=DONE)))
    t0 = time.perf_counter()
    if remaining and n_workers == 1:
        run_worker(spec, setup, remaining, spec.worker, progress=True)
    elif remaining:
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
        bar = _Progress(study, spec.n_trials)  # one bar for all workers, fed from the storage
        for p in procs:
            while p.is_alive():
                p.join(timeout=1.0)
                bar.refresh()  # a no-op when stderr is not a terminal
        bar.close()
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"tune: worker(s) {failed} failed; rerun to resume the study")
    summary = write_outputs(
        study,
        best_params_path=best_params_path,
        reports_dir=reports_dir,
        objective_names=_objective_names(setup),
    )
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


# ---------------------------------------------------------------- outputs


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


def write_plots(study: optuna.Study, reports_dir: Path, objective_names: list[str]) -> dict:
    """Optimisation history and parameter importances per objective (+ Pareto front, +
    intermediate values) as PNG; a plot that cannot be drawn yet is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    reports_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(objective_names) > 1
    written: dict[str, str] = {}

    def save(name: str, draw: Callable[[], Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            # Its reminder that a `target` is minimised: `negated` below takes care of that.
            warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
            ax = draw()
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        fig.savefig(reports_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written[name] = str(reports_dir / f"{name}.png")

    for i, obj in enumerate(objective_names):
        suffix = f"_{obj}" if multi else ""

        def target(t: FrozenTrial, i: int = i) -> float:
            return t.values[i]

        def negated(t: FrozenTrial, i: int = i) -> float:
            return -t.values[i]

        tgt = target if multi else None
        save(
            f"optimization_history{suffix}",
            lambda tgt=tgt, obj=obj: ovm.plot_optimization_history(
                study, target=tgt, target_name=obj
            ),
        )
        # With a `target`, PED-ANOVA (Optuna's default evaluator) explains *low* target values,
        # whatever the study's direction; our objectives are maximised, so it gets -value.
        imp_tgt, imp_name = (negated, f"-{obj}") if multi else (None, obj)
        note = _importances_note(study, complete, imp_tgt)
        if note is None:
            (reports_dir / f"param_importances{suffix}.txt").unlink(missing_ok=True)
            save(
                f"param_importances{suffix}",
                lambda t=imp_tgt, n=imp_name: ovm.plot_param_importances(
                    study, target=t, target_name=n
                ),
            )
        else:
            (reports_dir / f"param_importances{suffix}.txt").write_text(note + "\n")
            (reports_dir / f"param_importances{suffix}.png").unlink(missing_ok=True)
            written[f"param_importances{suffix}"] = note
    if multi:
        save("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=objective_names))
    elif any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        save("intermediate_values", lambda: ovm.plot_intermediate_values(study))
    return written


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
