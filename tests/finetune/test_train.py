"""Fine-tuning cells: what each mode trains, and the test split is scored once, at the end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import ptum.finetune.ctr as ctr_cell
import ptum.finetune.demo as demo_cell
from ptum.config import FinetuneConfig
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.loop import optimizer
from ptum.finetune.metrics import accuracy, average_precision, roc_auc
from ptum.heads import BiasedCtrHead, log_popularity
from ptum.models.user_model import ModelConfig, UserModel
from ptum.stages.finetune import cell_options

# params.yaml's finetune options, shrunk for the tiny data.
OPTS = replace(
    cell_options(FinetuneConfig()), lr=3e-3, batch_size=16, max_epochs=3, patience=5, head_hidden=8
)


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
    return demo_cell.run_demo(
        pretrained=pretrained,
        corpus=demo.corpus,
        y=y,
        split=demo.split,
        train_rows=rows,
        n_classes=len(classes),
        mode=mode,
        seed=1,
        opts=OPTS,
        **kw,
    )


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_frozen_keeps_encoder_finetune_and_scratch_change_it(pretrained, demo):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    frozen = _demo(pretrained, demo, "frozen")
    assert _same(frozen.model, pretrained)
    tuned = _demo(pretrained, demo, "finetune")
    assert not _same(tuned.model, pretrained)
    scratch = _demo(pretrained, demo, "scratch")
    assert not _same(scratch.model, pretrained)
    # The shared pre-trained model itself is never modified by any cell.
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())
    for run in (frozen, tuned, scratch):
        # The reported test accuracy is that of the saved test predictions.
        res = run.result
        pred = res["pred"]
        assert res["n_test"] == len(pred["row"]) > 0
        assert res["test"]["acc"] == accuracy(np.array(pred["y"]), np.array(pred["pred"]))


def test_encoder_lr_scale_sets_the_encoder_learning_rate(pretrained):
    head = torch.nn.Linear(8, 2)
    opts = replace(OPTS, lr=1e-3, encoder_lr_scale=0.1)
    groups = optimizer(pretrained, head, "finetune", opts).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        p.numel() for p in pretrained.parameters()
    )
    # scratch learns everything at the full rate; frozen trains the head only.
    assert [
        g["lr"] for g in optimizer(pretrained, head, "scratch", opts).param_groups
    ] == pytest.approx([1e-3, 1e-3])
    assert len(optimizer(pretrained, head, "frozen", opts).param_groups) == 1


def test_finetune_with_a_smaller_encoder_lr_moves_the_encoder_less(pretrained, demo):
    def shift(scale: float) -> float:
        out = demo_cell.run_demo(
            pretrained=pretrained,
            corpus=demo.corpus,
            y=demo.labels["gender"][0],
            split=demo.split,
            train_rows=np.flatnonzero(demo.subsets[1.0] & (demo.labels["gender"][0] >= 0)),
            n_classes=2,
            mode="finetune",
            seed=1,
            opts=replace(OPTS, max_epochs=1, encoder_lr_scale=scale),
        )
        return sum(
            float((a - b).abs().sum())
            for a, b in zip(out.model.state_dict().values(), pretrained.state_dict().values())
        )

    assert 0 < shift(0.1) < shift(1.0)


def test_test_split_is_scored_once_after_training(pretrained, demo, monkeypatch):
    y, _ = demo.labels["gender"]
    test_rows = set(np.flatnonzero((demo.split == "test") & (y >= 0)).tolist())
    steps = {"n": 0}
    calls: list[tuple[int, set[int]]] = []
    orig_step = torch.optim.AdamW.step
    orig_vectors = demo_cell.user_vectors

    def step(self, *a, **k):
        steps["n"] += 1
        return orig_step(self, *a, **k)

    def vectors(model, corpus, rows, device):
        calls.append((steps["n"], set(np.asarray(rows).tolist())))
        return orig_vectors(model, corpus, rows, device)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(demo_cell, "user_vectors", vectors)
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
        run = ctr_cell.run_ctr(
            pretrained=pretrained,
            data=task.data,
            train_idx=train_idx,
            mode=mode,
            seed=0,
            opts=replace(OPTS, ctr_scoring="dot"),
        )
        res = run.result
        pred = res["pred"]
        assert sorted(pred["row"]) == np.flatnonzero(task.data.window == "test").tolist()
        assert res["test"]["auc"] == roc_auc(np.array(pred["y"]), np.array(pred["score"]))
        if mode == "frozen":
            assert _same(run.model, pretrained)
            # ... but the CTR head did train.
            assert not torch.equal(run.head.proj.weight, torch.eye(8))


def test_a_demo_head_with_a_wide_input_starts_from_it_exactly(pretrained, demo):
    y, classes = demo.labels["gender"]
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(len(y), len(classes))).astype(np.float32) * 5
    # lr ~ 0: nothing learns, so the cell predicts the wide input's argmax on every test row.
    opts = replace(OPTS, lr=1e-12, max_epochs=2)
    rows = np.flatnonzero(demo.subsets[1.0] & (y >= 0))
    r = demo_cell.run_demo(
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
    ).result
    test = np.array(r["pred"]["row"])
    assert r["pred"]["pred"] == wide[test].argmax(1).tolist()
    # Without it, the same cell predicts from the (random-head) user vectors instead.
    r0 = _demo(pretrained, demo, "frozen").result
    assert r0["pred"]["pred"] != r["pred"]["pred"]


def test_biased_ctr_head_trains_every_mode_and_scores_what_it_saves(pretrained, tiny_pipeline):
    d = tiny_pipeline
    task = load_ctr(d / "prepared", d / "tokenized", 20, [1.0])
    for mode in ("frozen", "finetune"):
        run = ctr_cell.run_ctr(
            pretrained=pretrained,
            data=task.data,
            train_idx=np.flatnonzero(task.subsets[1.0]),
            mode=mode,
            seed=0,
            opts=replace(OPTS, ctr_scoring="bias"),
        )
        assert isinstance(run.head, BiasedCtrHead)
        pred = run.result["pred"]
        assert run.result["test"]["auc"] == roc_auc(np.array(pred["y"]), np.array(pred["score"]))
        assert run.head.item_bias.weight.abs().sum() > 0  # the per-item offsets learnt


def test_biased_head_starts_as_the_dot_product_and_falls_back_to_popularity():
    torch.manual_seed(0)
    head = BiasedCtrHead(dim=4, num_items=5, num_users=3)
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    ids, users = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    pop = torch.from_numpy(log_popularity(np.array([0, 10, 1, 0, 0, 0])).astype(np.float32))
    assert torch.allclose(head.logits(u, c, users, ids, pop[ids]), (u * c).sum(-1))
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(20):  # item 1 is clicked, item 2 is not; item 3 is never shown
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head.logits(u[:2], c[:2], users[:2], ids[:2], pop[ids[:2]]), torch.tensor([1.0, 0.0])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = head.item_bias.weight.squeeze(-1).detach()
    assert b[1] > 0 > b[2]
    assert b[3] == 0 and b[0] == 0  # no training impression: bias = a * log popularity only
    assert head.pop_weight.item() != 0
    ub = head.user_bias.weight.squeeze(-1).detach()
    assert ub[0] > 0 > ub[1] and ub[2] == 0  # user 2 had no impression: the vector term only


def test_the_reported_validation_scores_are_those_of_the_selected_weights(
    pretrained, demo, tiny_pipeline
):
    """A cell keeps the best epoch's validation scores instead of scoring validation again
    after restoring that epoch's weights: the same numbers."""
    cpu = torch.device("cpu")
    y, classes = demo.labels["gender"]
    valid_rows = np.flatnonzero((demo.split == "valid") & (y >= 0))
    wide = np.random.default_rng(0).normal(size=(len(y), len(classes))).astype(np.float32)
    for kw in ({}, {"wide": wide}):
        run = _demo(pretrained, demo, "finetune", **kw)
        net = demo_cell._DemoNet.build(run.model, run.head, demo.corpus, False, kw.get("wide"), cpu)
        again = demo_cell._demo_scores(y[valid_rows], net.predict(valid_rows), len(classes))
        assert run.result["valid"] == again and run.result["epochs"] >= 1

    d = tiny_pipeline
    data = load_ctr(d / "prepared", d / "tokenized", 20, [1.0]).data
    train_idx = np.flatnonzero(data.window == "train")
    run = ctr_cell.run_ctr(
        pretrained=pretrained, data=data, train_idx=train_idx, mode="finetune", seed=0, opts=OPTS
    )
    net = replace(ctr_cell._ctr_net(run.model, data, "finetune", OPTS, cpu), head=run.head)
    idx, s = net.predict(np.flatnonzero(data.window == "valid"), False)
    again = {"auc": roc_auc(data.clicked[idx], s), "ap": average_precision(data.clicked[idx], s)}
    assert run.result["valid"] == again
