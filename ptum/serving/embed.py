"""Stage `embed`: user vectors (and demographic predictions) from a behavior log, torch-free.

Reads a behaviors table in the generic format (TSV or Parquet, see `ptum.data.generic`), validates
it like `prepare` does (the first bad row stops the run with a DataError naming file:line),
builds each user's sequence exactly as prepare + pretrain do (`ptum.serving.sequences`), and runs
the ONNX export of `ptum.serving.export` with onnxruntime.

Writes a Parquet file sorted by user_id: user_id, vector list[float32], and for every
`demo_<label>.onnx` in the model dir: <label> (predicted class) and <label>_probs list[float32].

Only NumPy, Polars, SentencePiece and onnxruntime run here: this module must never import torch
(nor a ptum module that does), so serving needs no PyTorch install.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import sentencepiece as spm

from ptum.data.errors import DataError
from ptum.serving.artifacts import ExportDir, open_export
from ptum.serving.sequences import (
    UNKNOWN_ID,
    batch_inputs,
    read_behaviors,
    text_ids,
    user_sequences,
)
from ptum.tokenize import encode

SPM, ID_VOCAB = "spm.model", "id_vocab.json"


def _id_vocab(export: ExportDir, sha256: str) -> list[str]:
    """The texts of an export's id_vocab.json, checked against export.json and the ONNX
    metadata's hash."""
    data = export.read(ID_VOCAB)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            export.path / ID_VOCAB,
            None,
            "not the id vocabulary the ONNX model was exported with (sha256 differs from its "
            "metadata); rerun `ptum export`",
        )
    return json.loads(data)["texts"]


def _tokenizer(export: ExportDir, sha256: str) -> spm.SentencePieceProcessor:
    """The export's spm.model, checked against export.json and the ONNX metadata's hash."""
    data = export.read(SPM)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            export.path / SPM,
            None,
            "not the SentencePiece model the ONNX model was exported with (sha256 differs from "
            "its metadata); rerun `ptum export`",
        )
    return spm.SentencePieceProcessor(model_proto=data)


def embed(
    behaviors_path: Path,
    model_dir: Path,
    out_path: Path,
    *,
    batch_size: int = 256,
    demo: bool = False,
) -> dict:
    """Embed every user of `behaviors_path` with the ONNX export in `model_dir`.

    Args:
        behaviors_path: behaviors table (TSV or Parquet) in the generic format.
        model_dir: an out_dir of `ptum.export.export` (user_model.onnx, spm.model, demo_*.onnx).
        out_path: Parquet file to write (replaced atomically).
        batch_size: users per onnxruntime call.
        demo: also predict every demographic label with a `demo_<label>.onnx` in model_dir.

    Returns:
        A report: users, behaviors, truncated users, dim, timings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    export = open_export(model_dir)
    session = export.session("user_model.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("behavior_encoder") == "id":
        raise ValueError(
            f"{model_dir}: an item-id behavior encoder cannot embed new logs (its "
            "ids are the prepare stage's); export a text-encoder model"
        )
    sp = _tokenizer(export, meta["spm_sha256"])
    max_behaviors, max_tokens = int(meta["max_behaviors"]), int(meta["max_tokens"])
    static_l, static_t = meta["behaviors_dim"] == "static", meta["tokens_dim"] == "static"
    heads = {}
    if demo:
        for name in export.demo_heads():
            s = export.session(name)
            heads[name.removeprefix("demo_").removesuffix(".onnx")] = (
                s,
                json.loads(s.get_modelmeta().custom_metadata_map["classes"]),
            )

    seqs = user_sequences(read_behaviors(behaviors_path), max_behaviors)
    t_read = time.perf_counter()
    token_matrix, token_lengths, truncated = encode(sp, seqs.texts, max_tokens)
    ids = None
    if meta.get("behavior_encoder") == "hybrid":
        ids = text_ids(seqs.texts, _id_vocab(export, meta["id_vocab_sha256"]))
    U = len(seqs.user_ids)
    vectors = np.zeros((U, int(meta["output_dim"])), dtype=np.float32)
    for lo in range(0, U, batch_size):
        hi = min(lo + batch_size, U)
        feed = batch_inputs(
            seqs,
            token_matrix,
            token_lengths,
            lo,
            hi,
            max_behaviors=max_behaviors if static_l else None,
            max_tokens=max_tokens if static_t else None,
            item_ids=ids,
        )
        vectors[lo:hi] = session.run(["user"], feed)[0]
    t_model = time.perf_counter()

    columns: dict[str, pl.Series] = {
        "user_id": pl.Series("user_id", seqs.user_ids, dtype=pl.String),
        "vector": pl.Series("vector", vectors).cast(pl.List(pl.Float32)),
    }
    for label, (s, classes) in heads.items():
        probs = (
            np.concatenate(
                [
                    s.run(["probs"], {"user": vectors[lo : lo + batch_size]})[0]
                    for lo in range(0, U, batch_size)
                ]
            )
            if U
            else np.zeros((0, 0))
        )
        columns[label] = pl.Series(
            label, [classes[i] for i in probs.argmax(axis=1)], dtype=pl.String
        )
        columns[f"{label}_probs"] = pl.Series(f"{label}_probs", probs.astype(np.float32)).cast(
            pl.List(pl.Float32)
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    pl.DataFrame(columns).write_parquet(tmp)
    tmp.replace(out_path)
    elapsed = time.perf_counter() - t0
    return {
        "users": U,
        "behaviors": int(seqs.n_total.sum()),
        "behaviors_used": len(seqs.items),
        "truncated_users": int((seqs.n_total > max_behaviors).sum()),
        "distinct_texts": len(seqs.texts),
        "unknown_id_texts": None if ids is None else int((ids[1:] == UNKNOWN_ID).sum()),
        "truncated_texts": truncated,
        "dim": vectors.shape[1],
        "demographic_labels": sorted(heads),
        "architecture": meta.get("architecture"),
        "read_s": round(t_read - t0, 3),
        "model_s": round(t_model - t_read, 3),
        "total_s": round(elapsed, 3),
        "users_per_s": round(U / max(t_model - t_read, 1e-9), 1),
        "out": str(out_path),
    }
