"""Pre-training the hybrid encoder: its id vocabulary, MBP/NBP learning, checkpoint refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ptum import checkpoint
from ptum.config import ModelParams, PretrainConfig
from ptum.data.corpus import item_texts, load_corpus
from ptum.models.behavior import PAD_ROW, UNKNOWN_ROW
from ptum.models.id_vocab import FILE, IdVocab, build_id_vocab, item_table_digest
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.data import make_batch, step_rng
from ptum.pretrain.setup import corpus_id_vocab
from ptum.pretrain.tasks import ptum_step
from ptum.pretrain.train import pretrain
from ptum.stages.pretrain import pretrain_one, train_options
from tests.pretrain.test_train import TINY_MODEL


@pytest.fixture(scope="module")
def data(tiny_pipeline):
    prepared, tokenized = tiny_pipeline / "prepared", tiny_pipeline / "tokenized"
    train = load_corpus(prepared, tokenized, "train", 20)
    valid = load_corpus(prepared, tokenized, "valid", 20)
    return train, valid, corpus_id_vocab(prepared, train, 2), item_texts(prepared)


def _config(train, vocab: IdVocab, arch: str = "hsa") -> ModelConfig:
    return ModelConfig.for_architecture(
        arch,
        behavior_encoder="hybrid",
        vocab_size=400,
        max_tokens=int(train.tokens.shape[1]),
        max_behaviors=20,
        num_items=train.num_items + 1,
        id_vocab=vocab.size,
        **TINY_MODEL,
    )


def _model(train, vocab: IdVocab, arch: str = "hsa") -> UserModel:
    torch.manual_seed(0)
    model = UserModel(config=_config(train, vocab, arch))
    model.behavior_encoder.set_id_index(vocab.id_index())
    return model


def test_vocabulary_keeps_items_seen_min_count_times() -> None:
    seqs = np.array([[1, 1, 2, 3, 0], [1, 2, 5, 0, 0]])  # counts: 1:3, 2:2, 3:1, 4:0, 5:1
    tokens = torch.arange(6 * 2).reshape(6, 2)
    texts = ["a", "b", "c", "d", "e"]
    vocab = build_id_vocab(seqs, texts, tokens, min_count=2)
    assert vocab.item_ids == (1, 2) and vocab.texts == ("a", "b") and vocab.size == 4
    index = vocab.id_index()
    # Item 3 (rare: seen once) and item 4 (never seen) share the UNKNOWN row.
    assert index.tolist() == [PAD_ROW, 2, 3, UNKNOWN_ROW, UNKNOWN_ROW, UNKNOWN_ROW]
    assert build_id_vocab(seqs, texts, tokens, min_count=1).item_ids == (1, 2, 3, 5)
    # Canonical bytes: a round trip keeps the hash; any change (another table) changes it.
    assert IdVocab.from_json(vocab.to_json()).sha256 == vocab.sha256
    other = build_id_vocab(seqs, texts, tokens + 1, min_count=2)
    assert other.item_ids == vocab.item_ids and other.sha256 != vocab.sha256
    assert other.item_table_sha256 == item_table_digest(tokens + 1)


def test_tiny_corpus_vocabulary(data) -> None:
    train, _, vocab, texts = data
    counts = np.bincount(train.items[train.items > 0], minlength=train.num_items + 1)
    assert 2 < vocab.size - 2 < train.num_items  # some items have their own row, not all
    assert set(vocab.item_ids) == set(np.flatnonzero(counts >= 2).tolist())
    assert list(vocab.texts) == [texts[i - 1] for i in vocab.item_ids]


@pytest.mark.parametrize("arch", ["hsa", "gru4rec"])
def test_mbp_nbp_loss_falls_when_overfitting_one_batch(data, arch: str) -> None:
    train, _, vocab, _ = data
    model = _model(train, vocab, arch)
    rows = np.flatnonzero(train.lengths >= 2)[:32]
    # Uniform negatives: the tiny corpus's unknown items are mostly never-seen ones, which
    # popularity-drawn negatives (behaviors of the corpus) cannot reach.
    batch = make_batch(train, rows, step_rng(0, 0, 0), k=2, p=4, negatives="uniform")
    assert (vocab.id_index()[batch.mbp_cands] == UNKNOWN_ROW).any()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids_before = model.behavior_encoder.ids.weight.detach().clone()
    first = None
    for _ in range(60):
        out = ptum_step(model, train.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.5 * first
    assert out["mbp_acc"].item() > 0.8
    # Both the vocabulary rows and the shared UNKNOWN row were trained.
    moved = (model.behavior_encoder.ids.weight.detach() - ids_before).abs().sum(1)
    assert moved[UNKNOWN_ROW] > 0 and (moved[2:] > 0).any() and moved[PAD_ROW] == 0


def test_unique_encoding_equals_naive_with_ids(data) -> None:
    train, _, vocab, _ = data
    model = _model(train, vocab).eval()
    rows = np.flatnonzero(train.lengths >= 2)[:16]
    batch = make_batch(train, rows, step_rng(0, 0, 0), k=2, p=4, negatives="uniform")
    a = ptum_step(model, train.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0, unique=True)
    b = ptum_step(model, train.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0, unique=False)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_checkpoint_carries_and_checks_the_vocabulary(data, tmp_path) -> None:
    train, _, vocab, _ = data
    model = _model(train, vocab)
    meta = {"model_config": model.config.to_dict(), "architecture": "hsa"}
    with pytest.raises(ValueError, match="needs its id_vocab"):
        checkpoint.save(tmp_path, model, meta)
    checkpoint.save(tmp_path, model, meta, id_vocab=vocab)
    assert checkpoint.read_meta(tmp_path)["id_vocab_sha256"] == vocab.sha256
    table = item_table_digest(train.tokens)
    loaded = checkpoint.load(tmp_path, item_table_sha256=table, id_vocab_sha256=vocab.sha256)
    assert loaded.id_vocab == vocab
    assert torch.equal(loaded.model.behavior_encoder.id_index, vocab.id_index())
    # Another item table (e.g. one item added: every later id shifts) is refused, one line.
    with pytest.raises(checkpoint.CheckpointMismatch) as e:
        checkpoint.load(tmp_path, item_table_sha256=item_table_digest(train.tokens[:-1]))
    msg = str(e.value)
    assert "\n" not in msg and str(loaded.path / FILE) in msg
    assert "index item table" in msg and "Re-run `ptum pretrain --arch hsa`" in msg
    # Another vocabulary (here: another min_count) is refused.
    other = replace(vocab, item_ids=vocab.item_ids[1:], texts=vocab.texts[1:], min_count=3)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"id vocabulary .* differs"):
        checkpoint.load(tmp_path, id_vocab_sha256=other.sha256)
    # A vocabulary file that is not the one meta.json names is refused.
    (loaded.path / FILE).write_bytes(other.to_json())
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not match the hash"):
        checkpoint.load(tmp_path)


def test_resume_with_another_vocabulary_is_refused(data, tmp_path) -> None:
    train, valid, vocab, texts = data
    opts = replace(train_options(PretrainConfig()), batch_size=16, epochs=1, max_steps=2)
    config = _config(train, vocab)
    pretrain(
        train=train,
        valid=valid,
        config=config,
        opts=opts,
        out_dir=tmp_path,
        meta={"architecture": "hsa"},
        log=lambda _: None,
        id_vocab=vocab,
    )
    assert (checkpoint.live(tmp_path) / FILE).read_bytes() == vocab.to_json()
    other = build_id_vocab(train.items, texts, train.tokens, min_count=3)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"remove .* and re-run"):
        pretrain(
            train=train,
            valid=valid,
            config=replace(config, id_vocab=other.size, id_min_count=3),
            opts=opts,
            out_dir=tmp_path,
            meta={"architecture": "hsa"},
            log=lambda _: None,
            id_vocab=other,
        )
    with pytest.raises(ValueError, match="needs the id_vocab"):
        pretrain(
            train=train,
            valid=valid,
            config=config,
            opts=opts,
            out_dir=tmp_path / "new",
            meta={},
            id_vocab=None,
        )


def test_stage_pretrains_a_hybrid_model(tiny_pipeline, tmp_path) -> None:
    """`ptum pretrain` with pretrain.behavior_encoder=hybrid, in process (one short epoch)."""
    cfg = PretrainConfig(
        behavior_encoder="hybrid", model=ModelParams(**TINY_MODEL), epochs=1, batch_size=16
    )
    out = pretrain_one(
        cfg,
        "han",
        prepared=tiny_pipeline / "prepared",
        tokenized=tiny_pipeline / "tokenized",
        max_behaviors=20,
        out_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
    )
    assert np.isfinite(out["valid_loss"])
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    config = ModelConfig.from_dict(meta["model_config"])
    assert config.behavior_encoder == "hybrid" and config.hybrid_text == "lstm"
    tokens = torch.from_numpy(np.load(tiny_pipeline / "tokenized" / "tokens.npy"))
    loaded = checkpoint.load(tmp_path / "ckpt", item_table_sha256=item_table_digest(tokens))
    assert loaded.id_vocab.min_count == config.id_min_count == 2
    assert loaded.id_vocab.size == config.id_vocab
