"""Stage `embed`: user vectors (and demographic predictions) from a behavior log, torch-free.

Reads a behaviors table in the generic format (TSV or Parquet, see `ptum.data.generic`), validates
it like `prepare` does (the first bad row stops the run with a DataError naming file:line),
builds each user's sequence exactly as prepare + pretrain do, and runs the ONNX export of
`ptum.export` with onnxruntime:

    order       by (timestamp, line) per user; the last max_behaviors are kept
    gaps        seconds since the user's previous behavior (0 for the first), computed before
                truncation, bucketed floor(log2(gap + 1)) clamped to [0, 31]
    positions   recency rank, 0 = most recent
    tokens      SentencePiece ids of the stripped text (the exported spm.model), first max_tokens
    item_ids    hybrid behavior encoder only: the text's id in the exported id_vocab.json
                (texts[i] -> i + 2); a text it does not hold (rare in pre-training, or new) gets
                the shared UNKNOWN id 1, so a new item is its text vector plus the unknown vector

Writes a Parquet file sorted by user_id: user_id, vector list[float32], and for every
`demo_<label>.onnx` in the model dir: <label> (predicted class) and <label>_probs list[float32].

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
import sentencepiece as spm

from ptum.data import generic
from ptum.data.errors import DataError
from ptum.hashing import sha256_file
from ptum.tokenize import PAD_ID, encode

NUM_GAP_BUCKETS = 32
PAD_ID_ROW, UNKNOWN_ID = 0, 1  # ptum.models.behavior.PAD_ROW / UNKNOWN_ROW (no torch import here)
_THRESHOLDS = 2 ** np.arange(1, NUM_GAP_BUCKETS, dtype=np.int64)  # 2, 4, ..., 2^31


def gap_buckets(gaps: np.ndarray) -> np.ndarray:
    """floor(log2(gap + 1)) clamped to [0, 31], integer-exact (NumPy twin of
    `ptum.models.layers.time_gap_bucket`): counts the powers of two 2..2^31 not above gap + 1.
    Negative gaps land in bucket 0."""
    x = np.clip(np.asarray(gaps, dtype=np.int64), 0, 2**62) + 1
    return np.searchsorted(_THRESHOLDS, x, side="right").astype(np.int64)


def read_behaviors(path: Path) -> pl.DataFrame:
    """Validated behaviors (line, user_id, timestamp, text); DataError on the first bad row.

    The same checks as `prepare` with on_bad_rows=error: row-level problems from
    `generic.scan`, then duplicate events; blank lines are skipped.
    """
    lf, _ = generic.scan(path, "behaviors")
    keys = ["user_id", "timestamp", "text"]
    if "source_item_id" in lf.collect_schema().names():
        keys.append("source_item_id")
    df = generic.mark_duplicates(
        lf.sort("line").collect(engine="streaming"), keys, "duplicate_event"
    )
    bad = df.filter(pl.col("reason").is_not_null() & (pl.col("reason") != "blank_line"))
    if bad.height:
        counts = {str(k): int(v) for k, v in bad.group_by("reason").len().iter_rows()}
        try:
            generic.raise_first(bad, path, counts)
        except DataError as e:
            # Same message as prepare, minus its advice to quarantine: embed has no such mode.
            problem = e.problem.split("; set prepare.on_bad_rows=quarantine")[0]
            problem += ")" if problem != e.problem else ""
            unit = "row" if path.suffix == ".parquet" else "line"
            raise DataError(e.path, e.line, problem, unit) from None
    good = df.filter(pl.col("reason").is_null())
    if good.height == 0:
        raise DataError(path, None, "no valid rows", "row" if path.suffix == ".parquet" else "line")
    return good.select("line", "user_id", "timestamp", "text")


@dataclass(frozen=True)
class Sequences:
    """Every user's kept behaviors as flat arrays (rows grouped by user, oldest first).

    user_ids: (U,) sorted; offsets: (U + 1,) row range of each user; texts: distinct texts,
    item i + 1 = texts[i] (0 = padding); items, gaps, positions: (R,) per kept behavior;
    n_total: (U,) behaviors before truncation.
    """

    user_ids: list[str]
    offsets: np.ndarray
    texts: list[str]
    items: np.ndarray
    gaps: np.ndarray
    positions: np.ndarray
    n_total: np.ndarray


def user_sequences(behaviors: pl.DataFrame, max_behaviors: int) -> Sequences:
    """Group, time-order and truncate users like `ptum.data.prepare.sequences` does."""
    df = behaviors.sort("user_id", "timestamp", "line").with_columns(
        item=pl.col("text").rank("dense").cast(pl.Int64)
    )  # 1-based, in sorted-text order
    users = df["user_id"].to_numpy()
    ts = df["timestamp"].to_numpy().astype(np.int64)
    n = len(ts)
    first = np.ones(n, dtype=bool)
    first[1:] = users[1:] != users[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    owner = np.cumsum(first) - 1  # user ordinal of each row
    gaps = np.zeros(n, dtype=np.int64)
    gaps[1:] = ts[1:] - ts[:-1]
    gaps = np.where(first, 0, np.maximum(gaps, 0))  # before truncation: the first kept gap is true
    recency = ends[owner] - 1 - np.arange(n)  # 0 = most recent
    keep = recency < max_behaviors
    kept_per_user = np.minimum(ends - starts, max_behaviors)
    return Sequences(
        user_ids=[str(u) for u in users[starts]],
        offsets=np.concatenate([[0], np.cumsum(kept_per_user)]),
        texts=df["text"].unique().sort().to_list(),
        items=df["item"].to_numpy()[keep],
        gaps=gaps[keep],
        positions=recency[keep],
        n_total=ends - starts,
    )


def text_ids(texts: list[str], vocab_texts: list[str]) -> np.ndarray:
    """(len(texts) + 1,) int64: the exported id of each log item (0 = padding item), i.e.
    i + 2 where texts[j] == vocab_texts[i], UNKNOWN_ID where the vocabulary lacks the text."""
    vocab = pl.DataFrame({"text": vocab_texts, "id": np.arange(2, len(vocab_texts) + 2)})
    found = (
        pl.DataFrame({"text": texts})
        .with_row_index("j")
        .join(vocab, on="text", how="left")
        .sort("j")  # joins do not promise row order
    )
    ids = found["id"].fill_null(UNKNOWN_ID).to_numpy().astype(np.int64)
    return np.concatenate([[PAD_ID_ROW], ids]).astype(np.int64)


def read_id_vocab(model_dir: Path, sha256: str) -> list[str]:
    """The texts of an export's id_vocab.json, checked against the ONNX metadata's hash."""
    path = model_dir / "id_vocab.json"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{path}: not the id vocabulary the ONNX model was exported with "
            "(sha256 differs from its metadata); re-run `ptum export`"
        )
    return json.loads(data)["texts"]


def batch_inputs(
    seqs: Sequences,
    token_matrix: np.ndarray,
    token_lengths: np.ndarray,
    lo: int,
    hi: int,
    *,
    max_behaviors: int | None,
    max_tokens: int | None,
    item_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Model inputs for users lo..hi-1, right-padded.

    max_behaviors / max_tokens: pad L / T to this size (a static dim of the export), or None to
    pad to the batch's longest.
    item_ids: (len(texts) + 1,) the exported id of each log item (`text_ids`), for a hybrid
    encoder's export; None for the others.

    Returns tokens (B, L, T) int64, token_mask (B, L, T) bool, mask (B, L) bool,
    positions (B, L) int64, gap_buckets (B, L) int64, and with `item_ids` item_ids (B, L) int64.
    """
    r0, r1 = seqs.offsets[lo], seqs.offsets[hi]
    lengths = np.diff(seqs.offsets[lo : hi + 1])  # (B,)
    B = hi - lo
    L = max_behaviors or max(int(lengths.max()), 1)
    owner = np.repeat(np.arange(B), lengths)  # (R,)
    slot = np.arange(r1 - r0) - (seqs.offsets[lo:hi] - r0)[owner]  # index within the user
    items = np.zeros((B, L), dtype=np.int64)
    items[owner, slot] = seqs.items[r0:r1]
    positions = np.zeros((B, L), dtype=np.int64)
    positions[owner, slot] = seqs.positions[r0:r1]
    buckets = np.zeros((B, L), dtype=np.int64)
    buckets[owner, slot] = gap_buckets(seqs.gaps[r0:r1])
    T = max_tokens or max(int(token_lengths[items].max()), 1)
    tokens = token_matrix[items][..., :T].astype(np.int64)  # (B, L, T); item 0 = all pad
    out = dict(
        tokens=tokens,
        token_mask=tokens != PAD_ID,
        mask=np.arange(L) < lengths[:, None],
        positions=positions,
        gap_buckets=buckets,
    )
    if item_ids is not None:
        out["item_ids"] = item_ids[items]  # (B, L); item 0 -> padding id 0
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


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
    session = _session(model_dir / "user_model.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("behavior_encoder") == "id":
        raise ValueError(
            f"{model_dir}: an item-id behavior encoder cannot embed new logs (its "
            "ids are the prepare stage's); export a text-encoder model"
        )
    spm_path = model_dir / "spm.model"
    if sha256_file(spm_path) != meta["spm_sha256"]:
        raise ValueError(
            f"{spm_path}: not the SentencePiece model the ONNX model was exported "
            "with (sha256 differs from its metadata)"
        )
    max_behaviors, max_tokens = int(meta["max_behaviors"]), int(meta["max_tokens"])
    static_l, static_t = meta["behaviors_dim"] == "static", meta["tokens_dim"] == "static"
    heads = {}
    if demo:
        for p in sorted(model_dir.glob("demo_*.onnx")):
            s = _session(p)
            heads[p.stem.removeprefix("demo_")] = (
                s,
                json.loads(s.get_modelmeta().custom_metadata_map["classes"]),
            )

    seqs = user_sequences(read_behaviors(behaviors_path), max_behaviors)
    t_read = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    token_matrix, token_lengths, truncated = encode(sp, seqs.texts, max_tokens)
    ids = None
    if meta.get("behavior_encoder") == "hybrid":
        ids = text_ids(seqs.texts, read_id_vocab(model_dir, meta["id_vocab_sha256"]))
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
