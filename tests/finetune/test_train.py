"""Fine-tuning cells: what each mode trains, and the test split is scored once, at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ptum.finetune.train as ft
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.metrics import accuracy, roc_auc
from ptum.models.user_model import ModelConfig, UserModel

OPTS = ft.CellOptions(lr=3e-3, batch_size=16, max_epochs=3, patience=5, head_hidden=8)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return UserModel(
        config=ModelConfig(
            behavior_encoder="cnn",
            user_encoder="hura",
            vocab_size=400,
            max_tokens=16,
            max_behaviors=20,
            word_dim=8,
            dim=8,
            attn_hidden=8,
            dropout=0.0,
        )
    )


@pytest.fixture(scope="module")
def demo(tiny_pipeline):
    d = tiny_pipeline
    return load_demo(d / "prepared", d / "tokenized", 20, [0.2, 0.5, 1.0])


def _demo(pretrained, demo, mode, **kw):
    y, classes = demo.labels["gender"]
    rows = np.flatnonzero(demo.subsets[1.0] & (y >= 0))
    return ft.run_demo(
        pretrained=pretrained,
        corpus=demo.corpus,
        y=y,
        split=demo.split,
        train_rows=rows,
        n_classes=len(classes),
        mode=mode,
        seed=1,
        opts=OPTS,
        return_models=True,
        **kw,
    )


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_frozen_keeps_encoder_finetune_and_scratch_change_it(pretrained, demo):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    frozen = _demo(pretrained, demo, "frozen")
    assert _same(frozen["model"], pretrained)
    tuned = _demo(pretrained, demo, "finetune")
    assert not _same(tuned["model"], pretrained)
    scratch = _demo(pretrained, demo, "scratch")
    assert not _same(scratch["model"], pretrained)
    # The shared pre-trained model itself is never modified by any cell.
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())
    for res in (frozen, tuned, scratch):
        # The reported test accuracy is that of the saved test predictions.
        pred = res["pred"]
        assert res["n_test"] == len(pred["row"]) > 0
        assert res["test"]["acc"] == accuracy(np.array(pred["y"]), np.array(pred["pred"]))


def test_encoder_lr_scale_sets_the_encoder_learning_rate(pretrained):
    head = torch.nn.Linear(8, 2)
    opts = ft.CellOptions(lr=1e-3, encoder_lr_scale=0.1)
    groups = ft._optimizer(pretrained, head, "finetune", opts).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        p.numel() for p in pretrained.parameters()
    )
    # scratch learns everything at the full rate; frozen trains the head only.
    assert [
        g["lr"] for g in ft._optimizer(pretrained, head, "scratch", opts).param_groups
    ] == pytest.approx([1e-3, 1e-3])
    assert len(ft._optimizer(pretrained, head, "frozen", opts).param_groups) == 1


def test_finetune_with_a_smaller_encoder_lr_moves_the_encoder_less(pretrained, demo):
    def shift(scale: float) -> float:
        out = ft.run_demo(
            pretrained=pretrained,
            corpus=demo.corpus,
            y=demo.labels["gender"][0],
            split=demo.split,
            train_rows=np.flatnonzero(demo.subsets[1.0] & (demo.labels["gender"][0] >= 0)),
            n_classes=2,
            mode="finetune",
            seed=1,
            return_models=True,
            opts=ft.CellOptions(
                lr=3e-3,
                batch_size=16,
                max_epochs=1,
                patience=5,
                head_hidden=8,
                encoder_lr_scale=scale,
            ),
        )
        return sum(
            float((a - b).abs().sum())
            for a, b in zip(out["model"].state_dict().values(), pretrained.state_dict().values())
        )

    assert 0 < shift(0.1) < shift(1.0)


def test_test_split_is_scored_once_after_training(pretrained, demo, monkeypatch):
    y, _ = demo.labels["gender"]
    test_rows = set(np.flatnonzero((demo.split == "test") & (y >= 0)).tolist())
    steps = {"n": 0}
    calls: list[tuple[int, set[int]]] = []
    orig_step = torch.optim.AdamW.step
    orig_vectors = ft.user_vectors

    def step(self, *a, **k):
        steps["n"] += 1
        return orig_step(self, *a, **k)

    def vectors(model, corpus, rows, device):
        calls.append((steps["n"], set(np.asarray(rows).tolist())))
        return orig_vectors(model, corpus, rows, device)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(ft, "user_vectors", vectors)
    _demo(pretrained, demo, "finetune")
    touching = [(s, rows) for s, rows in calls if rows & test_rows]
    assert touching, "the test split was never scored"
    assert all(s == steps["n"] for s, _ in touching), "test rows seen before training ended"
    assert set().union(*(r for _, r in touching)) == test_rows
    # Scored once: the test rows are covered by one pass, no row twice.
    seen = [row for _, rows in touching for row in rows & test_rows]
    assert len(seen) == len(test_rows)


def test_ctr_cell_runs_every_mode(pretrained, tiny_pipeline):
    d = tiny_pipeline
    task = load_ctr(d / "prepared", d / "tokenized", 20, [0.2, 1.0])
    # Histories end before their window: train/valid rows use before_train, test before_test.
    assert set(task.data.window) == {"train", "valid", "test"}
    train_idx = np.flatnonzero(task.subsets[1.0])
    for mode in ("scratch", "frozen", "finetune"):
        res = ft.run_ctr(
            pretrained=pretrained,
            data=task.data,
            train_idx=train_idx,
            mode=mode,
            seed=0,
            opts=OPTS,
            return_models=True,
        )
        pred = res["pred"]
        assert sorted(pred["row"]) == np.flatnonzero(task.data.window == "test").tolist()
        assert res["test"]["auc"] == roc_auc(np.array(pred["y"]), np.array(pred["score"]))
        if mode == "frozen":
            assert _same(res["model"], pretrained)
            # ... but the CTR head did train.
            assert not torch.equal(res["head"].proj.weight, torch.eye(8))


def test_a_demo_head_with_a_wide_input_starts_from_it_exactly(pretrained, demo):
    y, classes = demo.labels["gender"]
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(len(y), len(classes))).astype(np.float32) * 5
    # lr ~ 0: nothing learns, so the cell predicts the wide input's argmax on every test row.
    opts = OPTS.__class__(**{**OPTS.__dict__, "lr": 1e-12, "max_epochs": 2})
    rows = np.flatnonzero(demo.subsets[1.0] & (y >= 0))
    r = ft.run_demo(
        pretrained=pretrained,
        corpus=demo.corpus,
        y=y,
        split=demo.split,
        train_rows=rows,
        n_classes=len(classes),
        mode="frozen",
        seed=1,
        opts=opts,
        wide=wide,
    )
    test = np.array(r["pred"]["row"])
    assert r["pred"]["pred"] == wide[test].argmax(1).tolist()
    # Without it, the same cell predicts from the (random-head) user vectors instead.
    r0 = _demo(pretrained, demo, "frozen")
    assert r0["pred"]["pred"] != r["pred"]["pred"]
