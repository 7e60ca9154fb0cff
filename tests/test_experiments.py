"""Committed experiment pipelines stay in step with the root dvc.yaml and load as valid params."""

import importlib.util
from pathlib import Path

import pytest

from ptum.config import load_params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.parent for p in (ROOT / "experiments").glob("*/params.yaml"))


def _make_dvc():
    spec = importlib.util.spec_from_file_location("make_dvc", ROOT / "experiments" / "make_dvc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_dvc_yaml_is_generated_from_root(exp):
    assert (exp / "dvc.yaml").read_text() == _make_dvc().render(exp.name), (
        f"run: python experiments/make_dvc.py {exp.name}"
    )


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_params_are_valid(exp):
    p = load_params(exp / "params.yaml")
    assert p.data.source in ("movielens", "synthetic", "generic", "ptum_tsv")


def test_there_is_a_movielens_experiment():
    assert any(p.name == "movielens-100k" for p in EXPERIMENTS)
