"""One trial's score: a short pre-training with the sampled K, λ, P, lr, then brief fine-tuning.

Both numbers a single-objective trial produces are the same metric on the same split — the mean
over the demographic labels of the *validation* `demo_select` (acc | macro_f1), label ratio
`ratio` — but of two different models:

- intermediate value, reported with `trial.report(value, epoch)` after each pre-training epoch
  (epoch = epochs completed, 1..`base.epochs`): a fresh head trained for `prune_head_epochs`
  epochs on the *frozen* user vectors of the model so far (cheap). The pruner reads only these.
- the trial's value: the final pre-trained model *fine-tuned* (encoder and head, `finetune`
  options, early stopping on validation), usually higher than the last intermediate value, so
  the two are not interchangeable. Pruning compares intermediate values of different trials at
  the same epoch only, which is consistent.

Multi-objective mode returns (that value, the CTR validation AUC after the same fine-tuning)
and reports nothing per epoch (Optuna does not prune multi-objective studies).

Demographic test labels are hidden from every tuning cell; `run_ctr` always scores its test
window too, and that score is dropped unread. Tuning never selects on a test split. Trial i
pre-trains and fine-tunes with seed `base.seed + i`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import torch

from ptum import checkpoint
from ptum.finetune.ctr import run_ctr
from ptum.finetune.data import CtrTask, DemoTask, load_ctr, load_demo
from ptum.finetune.demo import run_demo
from ptum.finetune.options import CellOptions
from ptum.models.user_model import UserModel
from ptum.pretrain.options import TrainOptions, pick_device
from ptum.pretrain.setup import PretrainInputs, load_inputs
from ptum.pretrain.train import pretrain
from ptum.tune.trial import TrialSetup, log

Objective = Callable[[optuna.Trial], float | tuple[float, float]]


@dataclass
class TrialData:
    """What a worker process loads once and every trial of it reuses."""

    inputs: PretrainInputs  # corpora, model config, id vocabulary, checkpoint meta
    demo: DemoTask  # test labels hidden (-1)
    labels: list[str]  # the demographic labels a trial is scored on
    ctr: CtrTask | None  # multi-objective mode only


def load_data(s: TrialSetup) -> TrialData:
    """The pre-training inputs (as the pretrain stage builds them) and the fine-tuning tasks."""
    inputs = load_inputs(
        s.prepared,
        s.tokenized,
        s.max_behaviors,
        arch=s.arch,
        behavior_encoder=s.behavior_encoder,
        model_sizes=s.model_sizes,
    )
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
    ctr = (
        load_ctr(s.prepared, s.tokenized, s.max_behaviors, [s.ratio]) if s.multi_objective else None
    )
    return TrialData(inputs, demo, labels, ctr)


def demo_value(
    model: UserModel,
    d: TrialData,
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
        per_label[lab] = float(res.result["valid"][s.demo_select])
    return float(np.mean(list(per_label.values()))), per_label


def _pretrain_trial(
    trial: optuna.Trial,
    d: TrialData,
    s: TrialSetup,
    opts: TrainOptions,
    on_epoch: Callable[[int, UserModel, dict], None],
    device: torch.device,
) -> UserModel:
    """Pre-train into a temporary checkpoint directory (removed afterwards); the final model."""
    if s.work_dir is not None:
        s.work_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=f"trial{trial.number}-", dir=s.work_dir))
    try:
        pretrain(
            train=d.inputs.train,
            valid=d.inputs.valid,
            config=d.inputs.config,
            opts=opts,
            out_dir=out_dir,
            meta={**d.inputs.meta, "tune_trial": trial.number},
            device=device,
            resume=False,
            log=lambda m: log(f"trial {trial.number}: {m}"),
            on_epoch=on_epoch,
            progress=False,  # the study has its own bar
            id_vocab=d.inputs.id_vocab,
        )
        return checkpoint.load(out_dir).model
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def make_objective(d: TrialData, s: TrialSetup) -> Objective:
    """The Optuna objective of `s` over the data `d` (see the module docstring)."""
    device = pick_device(s.device)
    prune_opts = replace(s.finetune, max_epochs=s.prune_head_epochs)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        hp = s.space.suggest(trial)
        seed = s.base.seed + trial.number
        trial.set_user_attr("seed", seed)

        def on_epoch(epoch: int, model: UserModel, metrics: dict) -> None:
            for key in ("valid_mbp_acc", "valid_nbp_acc", "valid_loss"):
                if key in metrics:
                    trial.set_user_attr(f"pretrain_{key}_e{epoch}", float(metrics[key]))
            if s.multi_objective:
                return  # Trial.report / should_prune are single-objective only
            value, _ = demo_value(
                model, d, s, mode="frozen", opts=prune_opts, seed=seed, device=device
            )
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after pre-training epoch {epoch}: {value:.4f}")

        opts = replace(s.base, seed=seed, **hp)
        model = _pretrain_trial(trial, d, s, opts, on_epoch, device)
        demo, per_label = demo_value(
            model, d, s, mode="finetune", opts=s.finetune, seed=seed, device=device
        )
        for lab, v in per_label.items():
            trial.set_user_attr(f"valid_{lab}_{s.demo_select}", v)
        if not s.multi_objective:
            return demo
        assert d.ctr is not None
        res = run_ctr(
            pretrained=model,
            data=d.ctr.data,
            train_idx=np.flatnonzero(d.ctr.subsets[s.ratio]),
            mode="finetune",
            seed=seed,
            opts=s.finetune,
            device=device,
        )
        return demo, float(res.result["valid"]["auc"])  # its "test" is never read

    return objective
