"""CellOptions and params.yaml's finetune section cannot drift apart: every option that the
section holds has no default of its own and takes the value of its key (by name, one stated
alias); the options the section does not hold are named here."""

from __future__ import annotations

from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest
import yaml

from ptum.config import FinetuneConfig, load_params
from ptum.finetune.options import CellOptions
from ptum.stages.finetune import cell_options, grid_options
from tests.finetune.conftest import SPLIT

ROOT = Path(__file__).resolve().parents[2]
CONFIG_KEY = {"bias_lr_scale": "ctr_bias_lr_scale"}  # option -> finetune key, where they differ
NOT_IN_PARAMS = {"ctr_users_per_batch", "class_weight"}  # class_weight: set per run by the grid
# A valid value other than params.yaml's for every option the finetune section holds.
OTHER = {
    "lr": 0.5,
    "batch_size": 7,
    "max_epochs": 3,
    "patience": 2,
    "head_hidden": 5,
    "weight_decay": 0.25,
    "encoder_lr_scale": 0.7,
    "ctr_scoring": "dot",
    "bias_lr_scale": 3.0,
    "demo_wide": False,
}


def _section() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["finetune"]


@pytest.mark.parametrize("field", fields(CellOptions), ids=lambda f: f.name)
def test_an_option_is_its_finetune_key_or_named_as_not_in_params(field):
    section = _section()
    key = CONFIG_KEY.get(field.name, field.name)
    if field.name in NOT_IN_PARAMS:
        assert key not in section, f"finetune.{key} exists: build CellOptions.{key} from it"
        assert field.default is not MISSING
        return
    assert key in section, f"CellOptions.{field.name}: params.yaml has no finetune.{key}"
    assert field.default is MISSING and field.default_factory is MISSING, (
        f"CellOptions.{field.name} has a default of its own beside params.yaml's finetune.{key}"
    )
    assert (
        getattr(cell_options(load_params(ROOT / "params.yaml").finetune), field.name)
        == (section[key])
    )


def test_every_option_follows_its_own_key():
    """A changed key changes its option and no other (a swapped mapping would show)."""
    backed = {f.name for f in fields(CellOptions)} - NOT_IN_PARAMS
    assert set(OTHER) == backed
    base_cfg = FinetuneConfig()
    base = cell_options(base_cfg)
    for name, value in OTHER.items():
        changed = cell_options(replace(base_cfg, **{CONFIG_KEY.get(name, name): value}))
        assert changed == replace(base, **{name: value}), name


def test_grid_options_take_the_sections_values():
    cfg = replace(
        FinetuneConfig(),
        seed=7,
        demo_select="macro_f1",
        class_weights=("balanced",),
        workers=3,
        executor="dask",
        scheduler_address="tcp://h:8786",
    )
    g = grid_options(
        cfg,
        split=SPLIT,
        prepared=Path("p"),
        tokenized=Path("t"),
        max_behaviors=9,
        ckpt_root=Path("c"),
        cache_dir=Path("k"),
    )
    assert (g.seed, g.demo_select, g.class_weights, g.workers) == (7, "macro_f1", ("balanced",), 3)
    assert (g.executor, g.scheduler_address) == ("dask", "tcp://h:8786")
    assert g.cell == cell_options(cfg) and g.split == SPLIT and g.max_behaviors == 9
