"""SentencePiece stage: deterministic model bytes, one token row per item, padding row 0, a
manifest of its outputs, and a checked item table."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import polars as pl
import pytest
import sentencepiece as spm

from ptum.data.verified import write_manifest
from ptum.hashing import HashMismatch
from ptum.tokenize import PAD_ID, tokenize


def _run(items, out, **kw):
    args = (
        dict(
            vocab_size=300,
            model_type="unigram",
            byte_fallback=True,
            max_tokens=16,
            character_coverage=1.0,
            seed=1,
        )
        | kw
    )
    return tokenize(items, out, **args)


def test_deterministic_model_bytes(tiny_pipeline, tmp_path):
    items = tiny_pipeline / "prepared" / "items.parquet"
    a = _run(items, tmp_path / "a")
    b = _run(items, tmp_path / "b")
    assert (tmp_path / "a" / "spm.model").read_bytes() == (
        tmp_path / "b" / "spm.model"
    ).read_bytes()
    assert a["spm_sha256"] == b["spm_sha256"]
    assert np.array_equal(
        np.load(tmp_path / "a" / "tokens.npy"), np.load(tmp_path / "b" / "tokens.npy")
    )


def test_token_matrix_layout(tiny_pipeline):
    tok = tiny_pipeline / "tokenized"
    tokens = np.load(tok / "tokens.npy")
    lengths = np.load(tok / "lengths.npy")
    items = pl.read_parquet(tiny_pipeline / "prepared" / "items.parquet")
    assert tokens.dtype == np.int32 and tokens.shape == (items.height + 1, 16)
    assert (tokens[0] == PAD_ID).all() and lengths[0] == 0
    sp = spm.SentencePieceProcessor(model_file=str(tok / "spm.model"))
    for item_id, text in items.select("item_id", "text").head(20).iter_rows():
        ids = sp.encode(text)[:16]
        assert tokens[item_id, : len(ids)].tolist() == ids
        assert lengths[item_id] == len(ids)
        assert (tokens[item_id, len(ids) :] == PAD_ID).all()
        # Real tokens are never the pad id, so the mask is exactly tokens != 0.
        assert (tokens[item_id, : len(ids)] != PAD_ID).all()


def test_truncation_and_byte_fallback(tmp_path):
    items = tmp_path / "items.parquet"
    texts = ["alpha beta gamma delta " * 10, "short", "naïve café ☕"] + [
        f"word{i}" for i in range(50)
    ]
    pl.DataFrame({"item_id": list(range(1, len(texts) + 1)), "text": texts}).with_columns(
        pl.col("item_id").cast(pl.Int32)
    ).write_parquet(items)
    write_manifest(tmp_path, "prepare")
    rep = _run(items, tmp_path / "tok", max_tokens=8, vocab_size=400)
    lengths = np.load(tmp_path / "tok" / "lengths.npy")
    assert lengths[1] == 8 and rep["truncated_share"] > 0
    assert rep["unk_share"] == 0.0  # byte fallback: no unknown pieces even for the emoji


def test_the_manifest_records_every_output(tiny_pipeline):
    tok = tiny_pipeline / "tokenized"
    manifest = json.loads((tok / "manifest.json").read_text())
    assert manifest["stage"] == "tokenize"
    names = {"spm.model", "spm.vocab", "tokens.npy", "lengths.npy", "report.json"}
    assert set(manifest["files"]) == names
    for name in names:
        assert manifest["files"][name] == hashlib.sha256((tok / name).read_bytes()).hexdigest()


def test_a_modified_item_table_is_refused(tiny_pipeline, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_pipeline / "prepared", prepared)
    items = pl.read_parquet(prepared / "items.parquet")
    items.with_columns(pl.col("text").str.to_uppercase()).write_parquet(prepared / "items.parquet")
    with pytest.raises(HashMismatch, match=r"items.parquet: SHA-256 .* `ptum prepare`"):
        _run(prepared / "items.parquet", tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
