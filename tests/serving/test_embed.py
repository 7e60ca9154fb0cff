"""`ptum embed`: torch-free, same sequences as prepare/pretrain, same vectors as PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from ptum.config import PrepareConfig
from ptum.data.corpus import item_texts, load_corpus, recency_positions
from ptum.data.errors import DataError
from ptum.data.prepare import prepare
from ptum.hashing import sha256_file as file_sha256
from ptum.models.behavior import UNKNOWN_ROW
from ptum.models.layers import time_gap_bucket
from ptum.serving.embed import embed
from ptum.serving.sequences import (
    batch_inputs,
    call_ranges,
    gap_buckets,
    read_behaviors,
    text_ids,
    user_sequences,
)
from ptum.stages.prepare import prepare_options
from ptum.tokenize import encode
from tests.conftest import write_tsv
from tests.serving.conftest import AGE_CLASSES, MAX_BEHAVIORS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["ptum.serving.embed", "ptum.stages.embed"])
def test_embed_imports_no_torch(module: str) -> None:
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_gap_buckets_match_torch() -> None:
    edges = [0, 1, 2, 3, 4, 7, 8, 59, 60, 3600, 86_400, 2**31 - 2, 2**31 - 1, 2**31, 2**40, -5]
    near = [2**k + d for k in range(1, 40) for d in (-2, -1, 0, 1) if 2**k + d >= 0]
    gaps = np.array(edges + near, dtype=np.int64)
    np.testing.assert_array_equal(gap_buckets(gaps), time_gap_bucket(torch.from_numpy(gaps)))
    assert gap_buckets(np.array([0, 1, 2, 3, 2**31 - 1, 2**62])).tolist() == [0, 1, 1, 2, 31, 31]


def test_sequences_match_prepare(tiny_pipeline: Path) -> None:
    """Order, truncation, gaps and positions equal the prepare stage's `full` view."""
    raw, prepared = tiny_pipeline / "raw", tiny_pipeline / "prepared"
    seqs = user_sequences(read_behaviors(raw / "behaviors.parquet"), MAX_BEHAVIORS)
    items = pl.read_parquet(prepared / "items.parquet").sort("item_id")["text"].to_list()
    full = pl.read_parquet(prepared / "sequences.parquet").filter(pl.col("view") == "full")
    index = {u: i for i, u in enumerate(seqs.user_ids)}
    assert full.height > 50
    truncated = 0
    for row in full.iter_rows(named=True):
        i = index[row["user_id"]]
        lo, hi = seqs.offsets[i], seqs.offsets[i + 1]
        assert [seqs.texts[j - 1] for j in seqs.items[lo:hi]] == [
            items[j - 1] for j in row["item_ids"]
        ]
        assert seqs.gaps[lo:hi].tolist() == row["gaps"]
        assert seqs.n_total[i] == row["n_total"]
        n = hi - lo
        assert seqs.positions[lo:hi].tolist() == recency_positions(np.array([n]), n)[0].tolist()
        truncated += row["n_total"] > MAX_BEHAVIORS
    assert truncated > 0  # the tiny data does exercise truncation


@pytest.mark.parametrize("arch", ["hsa", "gru4rec", "hsa+hybrid"])
def test_embed_matches_pytorch(arch: str, exported, tiny_pipeline: Path, tmp_path: Path) -> None:
    """embed (onnxruntime) == the model on pretrain's own inputs (load_corpus of prepare's view)."""
    ex = exported(arch)
    out = tmp_path / "users.parquet"
    report = embed(
        tiny_pipeline / "raw" / "behaviors.parquet", ex.onnx, out, batch_size=32, demo=True
    )
    got = pl.read_parquet(out)
    assert got["user_id"].to_list() == sorted(got["user_id"].to_list())
    assert report["users"] == got.height and got.schema["vector"] == pl.List(pl.Float32)
    # Labeled users: their `full` view holds every behavior, as embed sees them.
    labeled = pl.read_parquet(tiny_pipeline / "prepared" / "labels.parquet")["user_id"].to_list()
    c = load_corpus(
        tiny_pipeline / "prepared",
        tiny_pipeline / "tokenized",
        "",
        MAX_BEHAVIORS,
        view="full",
        users=labeled,
    )
    tokens = c.tokens[torch.from_numpy(c.items)]  # (U, L, T)
    mask = torch.from_numpy(np.arange(MAX_BEHAVIORS) < c.lengths[:, None])
    # The hybrid model reads the prepare stage's item ids; embed finds them from the texts.
    ids = torch.from_numpy(c.items) if ex.model.uses_item_ids else None
    with torch.no_grad():
        want = ex.model(
            tokens,
            tokens != 0,
            mask,
            torch.from_numpy(recency_positions(c.lengths, MAX_BEHAVIORS)),
            time_gap_bucket(torch.from_numpy(c.gaps)),
            ids,
        ).numpy()
    rows = got.join(pl.DataFrame({"user_id": c.user_ids}).with_row_index("i"), on="user_id")
    vecs = np.stack(rows.sort("i")["vector"].to_numpy())
    np.testing.assert_allclose(vecs, want, rtol=1e-3, atol=1e-5)
    if arch == "hsa":
        assert report["demographic_labels"] == ["age"]
        assert set(got["age"].unique()) <= set(AGE_CLASSES)
        probs = np.stack(got["age_probs"].to_numpy())
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        assert [AGE_CLASSES[k] for k in probs.argmax(1)] == got["age"].to_list()


def test_text_ids() -> None:
    ids = text_ids(["a", "new", "c", "b"], ["b", "c"])
    assert ids.tolist() == [0, UNKNOWN_ROW, UNKNOWN_ROW, 3, 2]


def test_embed_hybrid_gives_unseen_texts_the_unknown_id(
    exported, tiny_pipeline: Path, tmp_path: Path
) -> None:
    """A text the id vocabulary lacks (new to the model, or rare in pre-training) is served as
    its text + the UNKNOWN id vector: the vectors equal PyTorch's with a rare item's id."""
    ex = exported("hsa+hybrid")
    index = ex.model.behavior_encoder.id_index
    texts = item_texts(tiny_pipeline / "prepared")
    known = int(torch.nonzero(index > UNKNOWN_ROW)[0])  # an item with its own id row
    rare = int(torch.nonzero(index == UNKNOWN_ROW)[0])  # an item below id_min_count
    new = ["a brand new title", "another unseen title"]
    rows = [
        ["u1", 10, texts[known - 1]],
        ["u1", 20, new[0]],
        ["u2", 10, texts[known - 1]],
        ["u2", 20, new[1]],
        ["u3", 10, texts[known - 1]],
        ["u3", 20, texts[rare - 1]],
    ]
    log = write_tsv(tmp_path / "behaviors.tsv", ["user_id", "timestamp", "text"], rows)
    report = embed(log, ex.onnx, tmp_path / "out.parquet")
    got = np.stack(pl.read_parquet(tmp_path / "out.parquet").sort("user_id")["vector"].to_numpy())
    assert report["unknown_id_texts"] == 3  # both new texts and the rare one
    # PyTorch: the known item, then the second text with the rare item's id (UNKNOWN row).
    sp = spm.SentencePieceProcessor(model_file=str(ex.onnx / "spm.model"))
    second = [new[0], new[1], texts[rare - 1]]
    tok, _, _ = encode(sp, [texts[known - 1], *second], ex.model.config.max_tokens)
    tok = torch.from_numpy(tok.astype(np.int64))
    tokens = torch.stack([tok[[1, 2]], tok[[1, 3]], tok[[1, 4]]])  # (3, 2, T)
    with torch.no_grad():
        want = ex.model(
            tokens,
            tokens != 0,
            torch.ones(3, 2, dtype=torch.bool),
            torch.tensor([[1, 0]] * 3),
            time_gap_bucket(torch.tensor([[0, 10]] * 3)),
            torch.tensor([[known, rare]] * 3),
        ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    # The unknown items still differ by their text.
    assert np.abs(got[0] - got[1]).max() > 1e-3 and np.abs(got[0] - got[2]).max() > 1e-3


def test_embed_hybrid_refuses_another_id_vocabulary(exported, tmp_path: Path) -> None:
    """A replaced id_vocab.json is refused by its export.json hash, and, where export.json was
    edited to match, by the hash in the ONNX metadata."""
    model_dir = tmp_path / "model"
    shutil.copytree(exported("hsa+hybrid").onnx, model_dir)
    (model_dir / "id_vocab.json").write_text('{"texts": []}')
    with pytest.raises(DataError, match="id_vocab.json: sha256 differs from the one export.json"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")
    report = json.loads((model_dir / "export.json").read_text())
    report["files"]["id_vocab.json"] = file_sha256(model_dir / "id_vocab.json")
    (model_dir / "export.json").write_text(json.dumps(report))
    with pytest.raises(DataError, match="id_vocab.json: not the id vocabulary"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")


def _log(tmp_path: Path) -> Path:
    rows = [
        ["u2", 50, "late title"],
        ["u1", 20, "second title"],
        ["u1", 10, "first title"],
        ["u2", 40, "early title"],
        ["u1", 20, "same second, other title"],
    ]
    return write_tsv(tmp_path / "behaviors.tsv", ["user_id", "timestamp", "text"], rows)


def test_embed_tsv_and_parquet_agree(exported, tmp_path: Path) -> None:
    ex = exported("hsa")
    tsv = _log(tmp_path)
    pq = tmp_path / "behaviors.parquet"
    pl.read_csv(tsv, separator="\t", quote_char=None).write_parquet(pq)
    embed(tsv, ex.onnx, tmp_path / "a.parquet")
    embed(pq, ex.onnx, tmp_path / "b.parquet", batch_size=1)
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a["user_id"].to_list() == ["u1", "u2"] and "age" not in a.columns
    np.testing.assert_allclose(
        np.stack(a["vector"].to_numpy()), np.stack(b["vector"].to_numpy()), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "line, text, reason",
    [
        ("u3\tsoon\tsome title", "behaviors.tsv:4", "bad_timestamp"),
        ("u1\t10\tfirst title", "behaviors.tsv:7", "duplicate_event"),  # on_duplicates=error
        ("u3\t5\t  ", "behaviors.tsv:4", "empty_text"),
        ("u3\t5", "behaviors.tsv:4", "malformed_line"),
    ],
)
def test_embed_stops_at_the_first_bad_row(
    line: str, text: str, reason: str, exported, tmp_path: Path
) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    at = 3 if reason != "duplicate_event" else len(lines)
    lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{text}: .*\[{reason}\]") as e:
        embed(path, exported("hsa").onnx, tmp_path / "out.parquet", on_duplicates="error")
    assert "quarantine" not in str(e.value) and str(e.value).endswith(")")
    if reason == "duplicate_event":
        assert str(e.value).endswith("; set prepare.on_duplicates=drop to drop and count them)")
    assert not (tmp_path / "out.parquet").exists()


def test_embed_drops_and_counts_duplicate_events_by_default(exported, tmp_path: Path) -> None:
    """As prepare does: the vectors are those of the log without its duplicate line."""
    ex = exported("hsa")
    clean = _log(tmp_path)
    a = embed(clean, ex.onnx, tmp_path / "a.parquet")
    dup = tmp_path / "dup" / "behaviors.tsv"
    dup.parent.mkdir()
    dup.write_text(clean.read_text() + "u1\t10\tfirst title\n")
    b = embed(dup, ex.onnx, tmp_path / "b.parquet")
    assert a["rows_dropped"] == {} and b["rows_dropped"] == {"duplicate_event": 1}
    assert a["behaviors"] == b["behaviors"] == 5
    va, vb = (pl.read_parquet(tmp_path / f"{n}.parquet") for n in "ab")
    assert va.equals(vb)


def test_embed_and_prepare_build_the_same_sequences_from_a_log_with_a_duplicate(
    tmp_path: Path,
) -> None:
    """One sequence builder: prepare (on_duplicates=drop, its default) and embed drop the same
    duplicate row and give every user the same items, timestamps order, gaps and n_total."""
    rows = [
        ["u1", 10, "first title"],
        ["u1", 20, "second title"],
        ["u2", 5, "first title"],
        ["u1", 10, "first title"],  # exact duplicate of line 2
        ["u1", 20, "same second, other title"],
        ["u2", 9, "third title"],
        ["u1", 35, "third title"],
    ]
    raw = tmp_path / "raw"
    raw.mkdir()
    log = write_tsv(raw / "behaviors.tsv", ["user_id", "timestamp", "text"], rows)
    report = prepare(raw, tmp_path / "prepared", prepare_options(PrepareConfig(max_behaviors=3)))
    assert report["behaviors"]["rows_dropped"] == {"duplicate_event": 1}
    items = pl.read_parquet(tmp_path / "prepared" / "items.parquet").sort("item_id")["text"]
    # No impressions: the before_test view holds every behavior of every user.
    view = (
        pl.read_parquet(tmp_path / "prepared" / "sequences.parquet")
        .filter(pl.col("view") == "before_test")
        .sort("user_id")
    )
    behaviors = read_behaviors(log)
    assert behaviors.rows_dropped == {"duplicate_event": 1}
    seqs = user_sequences(behaviors, 3)
    assert seqs.user_ids.to_list() == view["user_id"].to_list() == ["u1", "u2"]
    expected = {
        "u1": (["second title", "same second, other title", "third title"], [10, 0, 15], 4),
        "u2": (["first title", "third title"], [0, 4], 2),
    }
    for i, row in enumerate(view.iter_rows(named=True)):
        lo, hi = seqs.offsets[i], seqs.offsets[i + 1]
        texts = [seqs.texts[j - 1] for j in seqs.items[lo:hi]]
        assert texts == [items[j - 1] for j in row["item_ids"]]
        assert seqs.gaps[lo:hi].tolist() == row["gaps"]
        assert seqs.n_total[i] == row["n_total"]
        assert (texts, row["gaps"], row["n_total"]) == expected[row["user_id"]]
        assert seqs.positions[lo:hi].tolist() == list(range(hi - lo))[::-1]


def test_embed_refuses_another_tokenizer(exported, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exported("hsa").onnx, model_dir)
    (model_dir / "spm.model").write_bytes(b"not the tokenizer")
    with pytest.raises(ValueError, match="sha256"):
        embed(_log(tmp_path), model_dir, tmp_path / "out.parquet")


def test_call_ranges_bound_users_and_token_slots(tiny_pipeline: Path) -> None:
    seqs = user_sequences(read_behaviors(tiny_pipeline / "raw" / "behaviors.parquet"), 20)
    lengths = np.random.default_rng(0).integers(1, 17, len(seqs.texts) + 1)
    lengths[0] = 0
    for static, budget, batch in [(False, 500, 256), (False, 1, 256), (True, 3000, 7)]:
        L, T = (20, 16) if static else (None, None)
        ranges = call_ranges(
            seqs,
            lengths,
            batch_size=batch,
            max_token_slots=budget,
            max_behaviors=L,
            max_tokens=T,
        )
        assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]]
        assert ranges[-1][1] == len(seqs.user_ids)
        for lo, hi in ranges:
            feed = batch_inputs(
                seqs, np.zeros((len(lengths), 16)), lengths, lo, hi, max_behaviors=L, max_tokens=T
            )
            slots = feed["tokens"].size  # B x L x T as served
            assert hi - lo <= batch and (slots <= budget or hi - lo == 1)
        if budget == 1:
            assert all(hi - lo == 1 for lo, hi in ranges)


def test_embed_streams_bounded_calls_to_row_groups(
    exported, tiny_pipeline: Path, tmp_path: Path, monkeypatch
) -> None:
    """Small calls and small row groups give the same file content as one big call."""
    ex, log = exported("hsa"), tiny_pipeline / "raw" / "behaviors.parquet"
    embed(log, ex.onnx, tmp_path / "big.parquet", batch_size=10_000, max_token_slots=10**9)
    seen: list[int] = []

    def spy(*args, **kwargs):
        feed = batch_inputs(*args, **kwargs)
        seen.append(feed["tokens"].size)
        return feed

    monkeypatch.setattr("ptum.serving.embed.batch_inputs", spy)
    monkeypatch.setattr("ptum.serving.embed.ROWS_PER_GROUP", 64)
    report = embed(log, ex.onnx, tmp_path / "small.parquet", max_token_slots=2_000, demo=True)
    assert max(seen) <= 2_000 and len(seen) > 10
    assert pq.ParquetFile(tmp_path / "small.parquet").num_row_groups > 2
    big, small = (
        pl.read_parquet(tmp_path / "big.parquet"),
        pl.read_parquet(tmp_path / "small.parquet"),
    )
    assert small.height == report["users"] == big.height
    assert small["user_id"].to_list() == big["user_id"].to_list()
    assert small.schema["vector"] == pl.List(pl.Float32) and small.schema["age"] == pl.String
    np.testing.assert_allclose(
        np.stack(small["vector"].to_numpy()), np.stack(big["vector"].to_numpy()), atol=1e-6
    )
    assert not list(tmp_path.glob("*.tmp"))
