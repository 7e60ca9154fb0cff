"""Serving heads: trained for the tasks the data allows, skipped with one line otherwise."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest
import torch

from ptum import checkpoint
from ptum.config import FinetuneConfig, PrepareConfig
from ptum.data.ingest import ingest
from ptum.data.prepare import prepare
from ptum.heads import BiasedCtrHead
from ptum.models.user_model import ModelConfig, UserModel
from ptum.serving.embed import embed
from ptum.serving.export import export
from ptum.serving.training import serving_heads
from ptum.stages.finetune import cell_options
from ptum.stages.prepare import prepare_options
from ptum.tokenize import tokenize
from tests.serving.conftest import MAX_BEHAVIORS, TINY

CFG = replace(FinetuneConfig(), max_epochs=2, patience=1)
OPTS = cell_options(CFG)


def _pipeline(root: Path, raw: Path, tables: tuple[str, ...]) -> Path:
    """ingest (generic, only `tables` of the tiny raw data) -> prepare -> tokenize, then a random
    HSA checkpoint on that tokenizer; returns root."""
    src = root / "src"
    src.mkdir(parents=True)
    for t in tables:
        shutil.copyfile(raw / f"{t}.parquet", src / f"{t}.parquet")
    ingest(source="generic", path=str(src), out_dir=root / "raw")
    opts = prepare_options(
        PrepareConfig(max_behaviors=MAX_BEHAVIORS, ctr_train_frac=0.3, ctr_test_frac=0.2)
    )
    prepare(root / "raw", root / "prepared", opts)
    tokenize(
        root / "prepared" / "items.parquet",
        root / "tokenized",
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        max_tokens=16,
        character_coverage=1.0,
        seed=1,
    )
    rep = json.loads((root / "tokenized" / "report.json").read_text())
    cfg = ModelConfig.for_architecture(
        "hsa",
        vocab_size=rep["vocab_size"],
        max_tokens=rep["max_tokens"],
        max_behaviors=MAX_BEHAVIORS,
        **TINY,
    )
    torch.manual_seed(0)
    meta = {"architecture": "hsa", "tokenizer_sha256": rep["spm_sha256"]}
    checkpoint.save(root / "ckpt", UserModel(config=cfg), meta | {"model_config": cfg.to_dict()})
    return root


def _heads(root: Path, seed: int = 0):
    return serving_heads(
        root / "ckpt",
        prepared=root / "prepared",
        tokenized=root / "tokenized",
        max_behaviors=MAX_BEHAVIORS,
        opts=OPTS,
        demo_select=CFG.demo_select,
        seed=seed,
    )


@pytest.mark.parametrize(
    "tables, demo, ctr",
    [
        (("behaviors",), [], False),
        (("behaviors", "labels"), ["age", "gender"], False),
        (("behaviors", "impressions"), [], True),
    ],
)
def test_export_without_labels_or_impressions(
    tables: tuple[str, ...], demo: list[str], ctr: bool, tiny_pipeline: Path, tmp_path, capsys
) -> None:
    """The user model is exported and embeds; a head the data cannot train is skipped with one
    stderr line (was: polars SchemaError)."""
    root = _pipeline(tmp_path, tiny_pipeline / "raw", tables)
    demo_heads, ctr_head = _heads(root)
    lines = capsys.readouterr().err.splitlines()
    assert sorted(demo_heads) == demo and (ctr_head is not None) == ctr
    skipped = [ln for ln in lines if ln.startswith("export: no ")]
    assert len(skipped) == (not demo) + (not ctr), lines
    if not demo:
        assert any(ln.startswith("export: no demographic heads: no label columns") for ln in lines)
    if not ctr:
        assert any(ln.startswith("export: no CTR head") and "impressions" in ln for ln in lines)
    report = export(
        root / "ckpt",
        root / "onnx",
        spm_model=root / "tokenized" / "spm.model",
        data_version="t",
        params={},
        demo_heads=demo_heads,
        ctr_head=ctr_head,
    )
    assert sorted(k for k in report["parity"] if k.startswith("demo_")) == [
        f"demo_{d}" for d in demo
    ]
    out = embed(
        root / "raw" / "behaviors.parquet", root / "onnx", tmp_path / "u.parquet", demo=True
    )
    assert out["users"] > 50 and out["demographic_labels"] == demo


def test_trained_bias_head_serves_like_pytorch(tiny_pipeline: Path, tmp_path) -> None:
    """finetune.ctr_scoring bias: the exported ctr_head.onnx scores real impressions' items
    (and unknown ones) as the trained head does for a user without an offset."""
    root = _pipeline(tmp_path, tiny_pipeline / "raw", ("behaviors", "labels", "impressions"))
    _, head = _heads(root)
    assert isinstance(head, BiasedCtrHead)
    export(
        root / "ckpt",
        root / "onnx",
        spm_model=root / "tokenized" / "spm.model",
        data_version="t",
        params={},
        demo_heads={},
        ctr_head=head,
    )
    session = ort.InferenceSession(str(root / "onnx" / "ctr_head.onnx"))
    items = torch.from_numpy(
        pl.read_parquet(root / "prepared" / "impressions.parquet")["item_id"].to_numpy()[:64].copy()
    ).long()
    ids = torch.cat([items, torch.tensor([0, head.item_bias.num_embeddings + 2])])
    b = len(ids)
    user, cand, lp = torch.randn(b, 16), torch.randn(b, 16), -torch.rand(b) * 8
    # PyTorch for a user without an offset (minus row 0's), an unknown id as row 0 (no
    # impression has item id 0, so its bias never trained: the popularity term alone).
    assert head.item_bias.weight[0, 0] == 0
    safe = torch.where((ids >= 1) & (ids < head.item_bias.num_embeddings), ids, 0)
    zero = torch.zeros(b, dtype=torch.long)
    with torch.no_grad():
        logit = head.logits(user, cand, zero, safe, lp) - head.user_bias.weight[0, 0]
    got = session.run(
        None,
        {
            "user": user.numpy(),
            "candidate": cand.numpy(),
            "item_id": ids.numpy(),
            "log_pop": lp.numpy(),
        },
    )[0]
    np.testing.assert_allclose(got, torch.sigmoid(logit).numpy(), rtol=1e-4, atol=1e-5)
    assert head.item_bias.weight[items].abs().max() > 0  # trained item biases are served


def test_heads_are_the_same_whatever_the_torch_threads(tiny_pipeline: Path, tmp_path) -> None:
    """The exported heads are a DVC output: OMP_NUM_THREADS or the core count must not change a
    byte of them (several threads sum floats in another order)."""
    root = _pipeline(tmp_path, tiny_pipeline / "raw", ("behaviors", "labels", "impressions"))
    before = torch.get_num_threads()
    states = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        try:
            demo, ctr = _heads(root)
        finally:
            torch.set_num_threads(before)
        assert torch.get_num_threads() == before
        heads = {label: head for label, (head, _) in demo.items()} | {"ctr": ctr}
        states.append({f"{k}.{n}": t for k, h in heads.items() for n, t in h.state_dict().items()})
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
