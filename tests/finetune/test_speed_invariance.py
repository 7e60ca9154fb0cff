"""What a grid worker computes once and shares between cells changes no cell's result: the Demo
wide input (once per label, ratio and repeat, not per mode), the frozen mode's vectors (once per
model) and the best epoch's validation scores (kept, not scored again)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ptum.finetune.cell as cell_module
import ptum.finetune.ctr as ctr_cell
import ptum.finetune.demo as demo_cell
from ptum import checkpoint
from ptum.config import FinetuneConfig
from ptum.data.corpus import tokenizer_digest
from ptum.finetune.baselines import tfidf_lr_logits
from ptum.finetune.cell import Worker
from ptum.finetune.cells import GridAxes
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.grid import run_grid
from ptum.finetune.loop import CellRun
from ptum.models.user_model import ModelConfig, UserModel
from ptum.stages.finetune import cell_options, grid_options
from tests.finetune.conftest import SPLIT

# params.yaml's finetune section, shrunk for the tiny data (both class weights, the wide input).
CFG = FinetuneConfig(max_epochs=3, patience=2, head_hidden=8, batch_size=16, workers=1)
OPTS = cell_options(CFG)


@pytest.fixture(scope="module")
def drop_ckpts(tiny_pipeline, tmp_path_factory) -> Path:
    """hsa and nativectr checkpoints of the tiny data with dropout, so the cells' random
    streams matter (the `ckpts` fixture's models have none)."""
    root = tmp_path_factory.mktemp("drop_ckpt")
    tokens = np.load(tiny_pipeline / "tokenized" / "tokens.npy")
    for arch in ("hsa", "nativectr"):
        torch.manual_seed(0)
        config = ModelConfig.for_architecture(
            arch,
            vocab_size=int(tokens.max()) + 1,
            max_tokens=tokens.shape[1],
            max_behaviors=20,
            word_dim=8,
            dim=8,
            heads=2,
            head_dim=4,
            attn_hidden=8,
            dropout=0.2,
        )
        meta = {
            "architecture": arch,
            "tokenizer_sha256": tokenizer_digest(tiny_pipeline / "tokenized"),
            "model_config": config.to_dict(),
        }
        checkpoint.save(root / arch, UserModel(config=config), meta)
    return root


def _model(ckpts: Path, arch: str) -> UserModel:
    return checkpoint.load(ckpts / arch).model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_worker_computes_a_wide_input_once_equal_to_a_fresh_one(tiny_pipeline):
    d = tiny_pipeline
    worker = Worker(load_demo(d / "prepared", d / "tokenized", 20, [0.2, 1.0]), {}, None)
    split = worker.split(101, SPLIT)
    wide = worker.wide(split, "gender", 0.2, 101, "acc")
    assert worker.wide(split, "gender", 0.2, 101, "acc") is wide  # memoized
    fresh = tfidf_lr_logits(split, "gender", 0.2, select="acc", seed=101)
    assert wide.dtype == fresh.dtype and np.array_equal(wide, fresh)
    # Another ratio, repeat or selection metric is another input.
    assert not np.array_equal(worker.wide(split, "gender", 1.0, 101, "acc"), wide)
    assert len(worker.wides) == 2


def test_given_frozen_vectors_give_a_demo_cell_the_result_it_computes_alone(
    tiny_pipeline, drop_ckpts
):
    d = tiny_pipeline
    demo = load_demo(d / "prepared", d / "tokenized", 20, [1.0])
    pretrained = _model(drop_ckpts, "hsa")
    pretrained.train()
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    vectors = demo_cell.demo_frozen_vectors(pretrained, demo.corpus)
    # The shared model is left as it was: weights and training mode.
    assert pretrained.training
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())
    y, classes = demo.labels["gender"]
    wide = tfidf_lr_logits(demo, "gender", 1.0, select="acc", seed=3)

    def run(**kw) -> CellRun:
        torch.manual_seed(999)  # what ran before must not matter either
        return demo_cell.run_demo(
            pretrained=pretrained,
            corpus=demo.corpus,
            y=y,
            split=demo.split,
            train_rows=np.flatnonzero(demo.subsets[1.0] & (y >= 0)),
            n_classes=len(classes),
            mode="frozen",
            seed=3,
            opts=replace(OPTS, class_weight="balanced"),
            wide=wide,
            **kw,
        )

    alone = run()
    rng_alone = torch.get_rng_state()
    shared = run(frozen_vectors=vectors)
    assert alone.result == shared.result and _same(alone.head, shared.head)
    assert torch.equal(torch.get_rng_state(), rng_alone)  # the same random draws


def test_given_frozen_vectors_give_a_ctr_cell_the_result_it_computes_alone(
    tiny_pipeline, drop_ckpts
):
    d = tiny_pipeline
    task = load_ctr(d / "prepared", d / "tokenized", 20, [1.0])
    pretrained = _model(drop_ckpts, "nativectr")
    vectors = ctr_cell.ctr_frozen_vectors(pretrained, task.data)
    runs = [
        ctr_cell.run_ctr(
            pretrained=pretrained,
            data=task.data,
            train_idx=np.flatnonzero(task.subsets[1.0]),
            mode="frozen",
            seed=5,
            opts=OPTS,
            **kw,
        )
        for kw in ({}, {"frozen_vectors": vectors})
    ]
    assert runs[0].result == runs[1].result and _same(runs[0].head, runs[1].head)


@pytest.mark.parametrize("task, model", [("demo", "hsa"), ("ctr", "nativectr")])
def test_a_grid_gives_each_cell_the_result_it_gets_alone(
    task, model, tiny_pipeline, drop_ckpts, tmp_path, monkeypatch
):
    """Every mode of two repeats in one process (sharing the worker's wide inputs and frozen
    vectors), then each neural cell in a grid of its own (a fresh worker): the same results."""
    calls: list[str] = []

    def counted(name: str, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        monkeypatch.setattr(cell_module, name, wrapped)

    for name in ("tfidf_lr_logits", "demo_frozen_vectors", "ctr_frozen_vectors"):
        counted(name, getattr(cell_module, name))

    def options(cache: str, seed: int = CFG.seed):
        return grid_options(
            replace(CFG, seed=seed),
            split=SPLIT,
            prepared=tiny_pipeline / "prepared",
            tokenized=tiny_pipeline / "tokenized",
            max_behaviors=20,
            ckpt_root=drop_ckpts,
            cache_dir=tmp_path / cache,
        )

    axes = GridAxes(
        task=task,
        labels=("gender",) if task == "demo" else None,
        models=(model,),
        modes=("scratch", "frozen", "finetune"),
        ratios=(0.2,),
        repeats=2,
        baselines=True,
    )
    together = run_grid(axes, options("together"))
    # One wide input per repeat (Demo), whatever the mode; the frozen vectors once.
    wides = ["tfidf_lr_logits"] * 2 if task == "demo" else []
    assert sorted(calls) == sorted([*wides, f"{task}_frozen_vectors"])

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "seconds"}

    neural = [r for r in together if r["mode"] != "baseline"]
    assert len(neural) == 6
    for i, r in enumerate(neural):
        one = replace(axes, modes=(r["mode"],), repeats=1, baselines=False)
        (alone,) = run_grid(one, options(f"alone{i}", seed=r["seed"]))
        assert strip(alone) == strip(r), f"{r['mode']} seed {r['seed']}"
