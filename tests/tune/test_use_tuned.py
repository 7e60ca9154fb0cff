"""`pretrain.use_tuned`: what the pretrain stage reads from the tune stage is what DVC tracks.

The pretrain stage declares k, lam, p, lr of reports/tune/best_params.json as params (DVC has no
conditional dependencies, so always); with use_tuned true, the stage trains with those values,
so a change of the tuned file is a change DVC sees and the run follows.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import ptum.pretrain.run as run
from ptum import paths
from ptum.config import load_params
from ptum.pretrain.tuned import TUNED_KEYS, read_tuned
from ptum.stages.pretrain import pretrain_one

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: s.get("do", s) for name, s in spec["stages"].items()}


def _file_params(body: dict) -> dict[str, list[str]]:
    return {k: v for e in body.get("params") or [] if isinstance(e, dict) for k, v in e.items()}


def test_pretrain_declares_exactly_the_tuned_values_it_reads_and_tune_writes_them():
    pretrain, tune = _stages()["pretrain"], _stages()["tune"]
    declared = _file_params(pretrain)
    assert declared == {paths.BEST_PARAMS.as_posix(): list(TUNED_KEYS)}
    written = [next(iter(e)) if isinstance(e, dict) else e for e in tune["metrics"]]
    assert paths.BEST_PARAMS.as_posix() in written
    # No cycle: tune reads nothing pre-training writes.
    tune_deps = [next(iter(e)) if isinstance(e, dict) else e for e in tune["deps"]]
    assert not [d for d in tune_deps if d.startswith(paths.PRETRAIN_MODELS.as_posix())]


def _opts_of_a_run(tmp_path: Path, monkeypatch, *, use_tuned: bool, tuned: dict) -> object:
    """The TrainOptions the pretrain stage hands to the training loop (stopped right there)."""
    seen = {}

    def capture(**kw):
        seen["opts"] = kw["opts"]
        raise StopIteration

    monkeypatch.setattr(run, "load_inputs", lambda *a, **k: _Inputs())
    monkeypatch.setattr(run, "pretrain", capture)
    cfg = replace(load_params(ROOT / "params.yaml").pretrain, use_tuned=use_tuned)
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"trial": 3, "value": 0.5, **tuned}))
    with pytest.raises(StopIteration):
        pretrain_one(
            cfg,
            "hsa",
            prepared=tmp_path,
            tokenized=tmp_path,
            max_behaviors=20,
            out_dir=tmp_path / "ckpt",
            report_dir=tmp_path / "rep",
            tuned_path=best,
        )
    return seen["opts"]


class _Inputs:
    train = valid = config = id_vocab = None
    meta: dict = {}


def test_with_use_tuned_a_changed_tuned_file_changes_the_run(tmp_path, monkeypatch):
    a = {"k": 1, "lam": 0.5, "p": 3, "lr": 0.002}
    b = {"k": 4, "lam": 2.0, "p": 9, "lr": 0.0005}
    run_a = _opts_of_a_run(tmp_path, monkeypatch, use_tuned=True, tuned=a)
    run_b = _opts_of_a_run(tmp_path, monkeypatch, use_tuned=True, tuned=b)
    assert {k: getattr(run_a, k) for k in TUNED_KEYS} == a
    assert {k: getattr(run_b, k) for k in TUNED_KEYS} == b


def test_without_use_tuned_the_tuned_file_is_not_read(tmp_path, monkeypatch):
    cfg = load_params(ROOT / "params.yaml").pretrain
    a = {"k": 1, "lam": 0.5, "p": 3, "lr": 0.002}
    run = _opts_of_a_run(tmp_path, monkeypatch, use_tuned=False, tuned=a)
    assert {k: getattr(run, k) for k in TUNED_KEYS} == {k: getattr(cfg, k) for k in TUNED_KEYS}


def test_a_tuned_file_without_a_value_is_refused_naming_file_and_key(tmp_path):
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"k": 2, "lam": 1.0, "p": 4}))
    with pytest.raises(ValueError, match=r"best_params\.json: key 'lr' is None"):
        read_tuned(best)
    with pytest.raises(FileNotFoundError, match="run the tune stage first"):
        read_tuned(tmp_path / "missing.json")
