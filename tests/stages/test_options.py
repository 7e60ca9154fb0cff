"""One source for every default: the library's option dataclasses take the values of params.yaml.

Each options class is paired with the params keys it mirrors. A field with a params counterpart
has no default of its own (the stage builds it from the section), a field without one is named
here as library-only, and the stage's builder hands over the section's values: a field renamed on
one side, or a default added to an options class, fails here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ptum.config import Params, PrepareConfig, PretrainConfig, TuneConfig
from ptum.config.load import to_dict
from ptum.data.prepare import PrepareOptions
from ptum.finetune.options import CellOptions
from ptum.pretrain.options import TrainOptions
from ptum.stages.prepare import prepare_options
from ptum.stages.pretrain import train_options
from ptum.stages.tune import study_spec, trial_setup
from ptum.tune import SearchSpace, StudySpec, TrialSetup

# options class -> (its params counterparts: field -> "section.key" or "section", the fields
# that params.yaml does not hold)
PAIRS: dict[type, tuple[dict[str, str], tuple[str, ...]]] = {
    PrepareOptions: ({f: f"prepare.{f}" for f in PrepareOptions.__dataclass_fields__}, ()),
    TrainOptions: (
        {f: f"pretrain.{f}" for f in TrainOptions.__dataclass_fields__ if f != "max_steps"},
        ("max_steps",),
    ),
    StudySpec: (
        {
            f: f"tune.{f}"
            for f in StudySpec.__dataclass_fields__
            if f not in ("worker", "params_section")
        },
        ("worker", "params_section"),
    ),
    SearchSpace: ({f: f"tune.{f}" for f in ("k", "lam", "p", "lr")}, ()),
    TrialSetup: (
        {
            "max_behaviors": "prepare.max_behaviors",
            "arch": "tune.arch",
            "behavior_encoder": "pretrain.behavior_encoder",
            "model_sizes": "pretrain.model",
            "base": "pretrain",
            "space": "tune",
            "finetune": "finetune",
            "demo_select": "finetune.demo_select",
            "multi_objective": "tune.multi_objective",
            "device": "pretrain.device",
        },
        ("prepared", "tokenized", "demo_labels", "ratio", "prune_head_epochs", "work_dir"),
    ),
    CellOptions: (
        {
            **{
                f: f"finetune.{f}"
                for f in (
                    "lr",
                    "batch_size",
                    "max_epochs",
                    "patience",
                    "head_hidden",
                    "weight_decay",
                    "encoder_lr_scale",
                    "ctr_scoring",
                    "demo_wide",
                )
            },
            "bias_lr_scale": "finetune.ctr_bias_lr_scale",
        },
        ("ctr_users_per_batch", "class_weight"),
    ),
}


def _lookup(params: Params, key: str) -> Any:
    obj: Any = params
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_every_options_field_is_a_params_key_or_named_library_only(cls):
    shared, library_only = PAIRS[cls]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == set(shared) | set(library_only)
    for key in shared.values():
        _lookup(Params(), key)  # the key exists (AttributeError names it otherwise)


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_options_fields_with_a_params_key_have_no_default_of_their_own(cls):
    shared, _ = PAIRS[cls]
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name in shared
        and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    ]
    assert with_default == [], f"{cls.__name__}: defaults beside params.yaml's: {with_default}"


def _plain(value: Any) -> Any:
    return to_dict(value) if dataclasses.is_dataclass(value) else value


def _check_built(options: Any, params: Params, skip: tuple[str, ...] = ()) -> None:
    shared, _ = PAIRS[type(options)]
    for field, key in shared.items():
        if field not in skip and key.count(".") == 1:
            assert _plain(getattr(options, field)) == _plain(_lookup(params, key)), (field, key)


def test_the_stage_builders_hand_over_the_sections_values():
    p = Params()
    _check_built(prepare_options(p.prepare), p)
    _check_built(train_options(p.pretrain), p)
    _check_built(study_spec(p.tune, study_name="s"), p, skip=("study_name",))
    setup = trial_setup(p)
    _check_built(setup, p)
    _check_built(setup.space, p)
    assert setup.model_sizes == to_dict(p.pretrain.model)
    # A trial pre-trains tune.epochs with seed tune.seed, everything else as pretrain says.
    assert setup.base == dataclasses.replace(
        train_options(p.pretrain), epochs=p.tune.epochs, seed=p.tune.seed
    )
    assert setup.finetune.max_epochs == p.tune.finetune_epochs


def test_builders_take_a_changed_value_through():
    assert prepare_options(PrepareConfig(seed=99)).seed == 99
    assert train_options(PretrainConfig(negatives="uniform")).negatives == "uniform"
    assert train_options(PretrainConfig(), {"k": 3, "lr": 0.5}).k == 3
    assert study_spec(TuneConfig(grace_period=500), study_name="s").grace_period == 500
