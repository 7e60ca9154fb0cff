"""Tokenization: train SentencePiece on the distinct item texts and encode each item once.

Outputs (in out_dir):
    spm.model, spm.vocab   the SentencePiece model (pad=0, unk=1, no bos/eos)
    tokens.npy             int32 (n_items + 1, max_tokens): row i = item_id i, row 0 = padding
    lengths.npy            int32 (n_items + 1,): real tokens per row (0 for the padding row)
    report.json            vocab size, token statistics, truncation share, model hash
    manifest.json          the SHA-256 of each file above, checked by every reader
                           (`ptum.data.verified`)

Behaviors stay integer item ids: tokens are stored once per distinct item, never per behavior,
which is what lets paper-scale logs (63M behaviors, far fewer distinct titles) fit.
Training is deterministic: one thread, fixed seed, input in item_id order -> same model bytes.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ptum.data import verified
from ptum.hashing import sha256_file
from ptum.io import atomic_dir

PAD_ID = 0
UNK_ID = 1


def train(
    texts: list[str],
    *,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    character_coverage: float,
    seed: int,
) -> bytes:
    """Train a SentencePiece model on `texts` and return the serialized model.

    The model is written through a memory buffer rather than a model_prefix path: the path
    would be recorded in the model's trainer spec, and the bytes would depend on where they
    were written.
    """
    # Keep the generator seeded and single-threaded: same input -> same bytes.
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            hard_vocab_limit=False,  # small corpora: use as many pieces as the data supports
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed (check tokenize.vocab_size and character_coverage): {e}"
        ) from None
    return buffer.getvalue()


def encode(
    sp: spm.SentencePieceProcessor, texts: list[str], max_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode texts into an int32 (len+1, max_tokens) matrix with a padding row 0.

    Returns (tokens, lengths, n_truncated). Titles longer than max_tokens keep their first tokens.
    """
    ids = sp.encode(texts, out_type=int)
    n_ids = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(n_ids.sum()))
    kept = np.minimum(n_ids, max_tokens)
    # Position of each kept token: its row, its column, and its index in `flat`.
    row = np.repeat(np.arange(1, len(ids) + 1), kept)
    col = np.arange(len(row)) - np.repeat(np.cumsum(kept) - kept, kept)
    tokens = np.zeros((len(texts) + 1, max_tokens), dtype=np.int32)
    tokens[row, col] = flat[np.repeat(np.cumsum(n_ids) - n_ids, kept) + col]
    lengths = np.zeros(len(texts) + 1, dtype=np.int32)
    lengths[1:] = kept
    return tokens, lengths, int((n_ids > max_tokens).sum())


def tokenize(
    items_path: Path,
    out_dir: Path,
    *,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    max_tokens: int,
    character_coverage: float,
    seed: int,
) -> dict:
    """Run the stage; returns its report (also written to out_dir/report.json)."""
    items = verified.read_parquet(items_path, "prepare").sort("item_id")
    ids = items["item_id"].to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise ValueError(f"{items_path}: item_id must be 1..N without gaps")
    texts = items["text"].to_list()
    with atomic_dir(out_dir, marker=verified.MANIFEST, stage="tokenize") as tmp:
        model = train(
            texts,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            seed=seed,
        )
        (tmp / "spm.model").write_bytes(model)
        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = list(range(sp.get_piece_size()))  # one call per column, not per piece
        (tmp / "spm.vocab").write_text(
            "".join(f"{p}\t{s}\n" for p, s in zip(sp.id_to_piece(pieces), sp.get_score(pieces))),
            encoding="utf-8",
        )
        tokens, lengths, truncated = encode(sp, texts, max_tokens)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "lengths.npy", lengths)
        real = lengths[1:]
        report = {
            "items": len(texts),
            "vocab_size": sp.get_piece_size(),
            "vocab_size_requested": vocab_size,
            "max_tokens": max_tokens,
            "tokens_per_item_mean": round(float(real.mean()), 3) if len(real) else 0.0,
            "tokens_per_item_max": int(real.max()) if len(real) else 0,
            "truncated_share": round(truncated / max(len(texts), 1), 5),
            "unk_share": round(float((tokens[1:] == UNK_ID).sum() / max(real.sum(), 1)), 6),
            "spm_sha256": sha256_file(tmp / "spm.model"),
            "tokens_sha256": sha256_file(tmp / "tokens.npy"),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        verified.write_manifest(tmp, "tokenize")  # last: the SHA-256 of every file above
    return report


def check_made_from(
    texts: list[str], tokens: np.ndarray, tokenized: Path, sample: int = 64
) -> None:
    """Refuse a tokenized directory made from another item table than the one whose `texts`
    (item i = texts[i - 1]) are read with it: `ptum tokenize` records no hash of the items it
    read, so the token matrix must have one row per item and an evenly spread `sample` of the
    items must encode (with its spm.model) to their rows of `tokens` ((N + 1, T))."""
    fix = "rerun `ptum tokenize` (or `dvc repro`)"
    if tokens.shape[0] != len(texts) + 1:
        raise ValueError(
            f"{tokenized}: tokens for {tokens.shape[0] - 1} items, but the item table has "
            f"{len(texts)}: it was made from another data/prepared; {fix}"
        )
    model = verified.verify(tokenized / "spm.model", "tokenize").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model)
    rows = np.unique(np.linspace(1, len(texts), min(sample, len(texts)), dtype=np.int64))
    expected, _, _ = encode(sp, [texts[i - 1] for i in rows], tokens.shape[1])
    differ = np.flatnonzero((expected[1:] != tokens[rows]).any(axis=1))
    if differ.size:
        item = int(rows[differ[0]])
        raise ValueError(
            f"{tokenized}: item {item}'s tokens do not encode its text {texts[item - 1][:60]!r}: "
            f"it was made from another data/prepared; {fix}"
        )
