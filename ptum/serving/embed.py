"""Embedding: user vectors (and demographic predictions) from a behavior log, torch-free.

Reads a behaviors table in the generic format (TSV or Parquet, see `ptum.data.generic`), validates
it with `prepare`'s code (the first bad row stops the run with a DataError naming file:line; exact
duplicate events are dropped and counted, as prepare.on_duplicates=drop does), builds each user's
sequence with prepare's code too (`ptum.serving.sequences`), and runs the ONNX export of
`ptum.serving.export` with onnxruntime.

Writes a Parquet file sorted by user_id: user_id, vector list[float32], and for every
`demo_<label>.onnx` in the model dir: <label> (predicted class) and <label>_probs list[float32].

Memory is bounded: users are embedded and written in order, a bounded number at a time (each
onnxruntime call holds at most `batch_size` users and `max_token_slots` padded token slots, whose
activations dominate the peak), and the output is streamed to Parquet row group by row group.
What stays whole in memory is O(behaviors) of NumPy arrays and one token row per distinct text.

Only NumPy, Polars, SentencePiece and onnxruntime run here: this module must never import torch
(nor a ptum module that does), so serving needs no PyTorch install.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pyarrow.parquet as pq
import sentencepiece as spm

from ptum.data.errors import DataError
from ptum.progress import progress
from ptum.serving.artifacts import ExportDir, open_export
from ptum.serving.sequences import (
    UNKNOWN_ID,
    Behaviors,
    Sequences,
    batch_inputs,
    call_ranges,
    read_behaviors,
    text_ids,
    user_sequences,
)
from ptum.tokenize import encode

SPM, ID_VOCAB = "spm.model", "id_vocab.json"
# Padded token slots (users x L x T) per onnxruntime call. A call's activations grow with its
# slots: ~4 KB a slot for the CPU-default 64-d model, so ~250 MB here; speed is the same as
# with 256 full users a call (docs/benchmarks.md, "embed memory").
MAX_TOKEN_SLOTS = 65_536
ROWS_PER_GROUP = 8_192  # users per Parquet row group


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


@dataclass(frozen=True)
class Served:
    """A verified export ready to run: the user model, its tokenizer and input rules, heads."""

    session: ort.InferenceSession
    meta: dict[str, str]
    tokenizer: spm.SentencePieceProcessor
    heads: dict[str, tuple[ort.InferenceSession, list[str]]]  # label -> (session, classes)
    id_vocab: list[str] | None  # hybrid encoder: the texts of id_vocab.json

    @property
    def max_behaviors(self) -> int:
        return int(self.meta["max_behaviors"])

    @property
    def max_tokens(self) -> int:
        return int(self.meta["max_tokens"])

    @property
    def static_l(self) -> int | None:
        """L the graph is fixed to, or None where it is dynamic."""
        return self.max_behaviors if self.meta["behaviors_dim"] == "static" else None

    @property
    def static_t(self) -> int | None:
        """T the graph is fixed to, or None where it is dynamic."""
        return self.max_tokens if self.meta["tokens_dim"] == "static" else None


def load_served(model_dir: Path, *, demo: bool) -> Served:
    """The export in `model_dir`, every file verified (`ptum.serving.artifacts`); with `demo`
    also every demographic head it lists."""
    export = open_export(model_dir)
    session = export.session("user_model.onnx")
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("behavior_encoder") == "id":
        raise ValueError(
            f"{model_dir}: an item-id behavior encoder cannot embed new logs (its "
            "ids are the prepare stage's); export a text-encoder model"
        )
    heads = {}
    for name in export.demo_heads() if demo else []:
        s = export.session(name)
        classes = json.loads(s.get_modelmeta().custom_metadata_map["classes"])
        heads[name.removeprefix("demo_").removesuffix(".onnx")] = (s, classes)
    hybrid = meta.get("behavior_encoder") == "hybrid"
    return Served(
        session=session,
        meta=meta,
        tokenizer=_tokenizer(export, meta["spm_sha256"]),
        heads=heads,
        id_vocab=_id_vocab(export, meta["id_vocab_sha256"]) if hybrid else None,
    )


def _frame(user_ids: pl.Series, vectors: np.ndarray, served: Served) -> pl.DataFrame:
    """The output rows of some users: (B,) ids, (B, D) vectors, and each head's prediction."""
    columns = {
        "user_id": user_ids.cast(pl.String),
        "vector": pl.Series("vector", vectors).cast(pl.List(pl.Float32)),
    }
    for label, (s, classes) in served.heads.items():
        probs = s.run(["probs"], {"user": vectors})[0]  # (B, C)
        columns[label] = pl.Series(
            label, [classes[i] for i in probs.argmax(axis=1)], dtype=pl.String
        )
        columns[f"{label}_probs"] = pl.Series(f"{label}_probs", probs.astype(np.float32)).cast(
            pl.List(pl.Float32)
        )
    return pl.DataFrame(columns)


class ParquetRows:
    """A Parquet file written row group by row group (frames buffered up to `rows_per_group`
    rows), under a temporary name that replaces `path` on `close` (never a partial file)."""

    def __init__(self, path: Path, rows_per_group: int) -> None:
        self.path, self.rows_per_group = path, rows_per_group
        self.tmp = path.with_name(path.name + ".tmp")
        self.buffer: list[pl.DataFrame] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None

    def append(self, frame: pl.DataFrame) -> None:
        self.buffer.append(frame)
        self.buffered += frame.height
        if self.buffered >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        table = pl.concat(self.buffer).to_arrow()
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
        self.writer.write_table(table)
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        if self.buffer:
            self._flush()
        if self.writer is not None:
            self.writer.close()
            self.tmp.replace(self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _run_users(
    served: Served,
    seqs: Sequences,
    tokens: tuple[np.ndarray, np.ndarray],
    ids: np.ndarray | None,
    out: ParquetRows,
    *,
    batch_size: int,
    max_token_slots: int,
) -> None:
    """Embed every user of `seqs` in bounded onnxruntime calls, in order, into `out`.

    tokens: (token matrix (texts + 1, T), token lengths (texts + 1,)) of `seqs.texts`.
    """
    token_matrix, token_lengths = tokens
    shape = {"max_behaviors": served.static_l, "max_tokens": served.static_t}
    ranges = list(
        call_ranges(
            seqs, token_lengths, batch_size=batch_size, max_token_slots=max_token_slots, **shape
        )
    )
    with progress(total=len(seqs.user_ids), desc="embed", unit="user", leave=False) as bar:
        for lo, hi in ranges:
            feed = batch_inputs(seqs, token_matrix, token_lengths, lo, hi, item_ids=ids, **shape)
            vectors = served.session.run(["user"], feed)[0]  # (hi - lo, D)
            out.append(_frame(seqs.user_ids[lo:hi], vectors, served))
            bar.update(hi - lo)


def embed(
    behaviors_path: Path,
    model_dir: Path,
    out_path: Path,
    *,
    batch_size: int = 256,
    demo: bool = False,
    max_token_slots: int = MAX_TOKEN_SLOTS,
    on_duplicates: str = "drop",
) -> dict:
    """Embed every user of `behaviors_path` with the ONNX export in `model_dir`.

    Args:
        behaviors_path: behaviors table (TSV or Parquet) in the generic format.
        model_dir: an out_dir of `ptum.serving.export.export` (user_model.onnx, spm.model,
            demo_*.onnx, export.json); every file is checked against export.json.
        out_path: Parquet file to write (replaced atomically).
        batch_size: users per onnxruntime call, at most.
        demo: also predict every demographic label with a `demo_<label>.onnx` in model_dir.
        max_token_slots: padded token slots (users x L x T) per onnxruntime call, at most (one
            longer user still runs alone): bounds the memory of a call.
        on_duplicates: exact duplicate events are dropped and counted ("drop") or stop the run
            ("error"), as prepare.on_duplicates does in `prepare`.

    Returns:
        A report: users, behaviors, rows dropped per reason, truncated users, dim, timings.
    """
    if (slots := max_token_slots) < 1 or batch_size < 1:
        raise ValueError(f"batch_size and max_token_slots must be >= 1, got {batch_size}, {slots}")
    t0 = time.perf_counter()
    served = load_served(model_dir, demo=demo)
    behaviors = read_behaviors(behaviors_path, on_duplicates=on_duplicates)
    seqs = user_sequences(behaviors, served.max_behaviors)
    t_read = time.perf_counter()
    token_matrix, token_lengths, truncated = encode(served.tokenizer, seqs.texts, served.max_tokens)
    ids = None if served.id_vocab is None else text_ids(seqs.texts, served.id_vocab)
    out = ParquetRows(out_path, ROWS_PER_GROUP)
    try:
        tokens = (token_matrix, token_lengths)
        _run_users(served, seqs, tokens, ids, out, batch_size=batch_size, max_token_slots=slots)
        out.close()
    except BaseException:
        out.abort()
        raise
    t_model = time.perf_counter()
    report = _report(served, behaviors, seqs, ids, truncated)
    U = len(seqs.user_ids)
    return report | {
        "read_s": round(t_read - t0, 3),
        "model_s": round(t_model - t_read, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "users_per_s": round(U / max(t_model - t_read, 1e-9), 1),
        "out": str(out_path),
    }


def _report(
    served: Served, behaviors: Behaviors, seqs: Sequences, ids: np.ndarray | None, truncated: int
) -> dict:
    """What was embedded: users, behaviors, rows dropped, truncations, dim, labels."""
    return {
        "users": len(seqs.user_ids),
        "behaviors": int(seqs.n_total.sum()),
        "rows_dropped": behaviors.rows_dropped,
        "behaviors_used": len(seqs.items),
        "truncated_users": int((seqs.n_total > served.max_behaviors).sum()),
        "distinct_texts": len(seqs.texts),
        "unknown_id_texts": None if ids is None else int((ids[1:] == UNKNOWN_ID).sum()),
        "truncated_texts": truncated,
        "dim": int(served.meta["output_dim"]),
        "demographic_labels": sorted(served.heads),
        "architecture": served.meta.get("architecture"),
    }
