"""Reading a checkpoint: every file verified, one-line errors naming the file, fallback to the
last complete checkpoint, the flat layout still read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ptum import checkpoint
from ptum.models.id_vocab import IdVocab, build_id_vocab
from ptum.models.user_model import UserModel
from tests.checkpoint.common import TINY, flip, same, save_tiny, tiny_model


def test_killed_save_states_fall_back_to_the_last_complete_checkpoint(tmp_path):
    first = save_tiny(tmp_path, seed=0, step=5)
    # A kill during the files of a save leaves a staging directory: ignored.
    staging = tmp_path / ".staging-ckpt-00000010-999"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert same(checkpoint.load(tmp_path).model, first)
    # A kill after the rename, before LATEST moved: LATEST still names the previous one.
    (tmp_path / "ckpt-00000010").mkdir()
    (tmp_path / "ckpt-00000010" / "model.safetensors").write_bytes(b"partial")
    assert same(checkpoint.load(tmp_path).model, first)
    # LATEST naming a missing or torn checkpoint: the newest complete one, with a warning.
    (tmp_path / "LATEST").write_text("ckpt-00000011\n")
    with pytest.warns(
        checkpoint.CheckpointFallbackWarning, match="ckpt-00000011, which is missing"
    ):
        assert same(checkpoint.load(tmp_path).model, first)
    (tmp_path / "LATEST").write_text("ckpt-00000010\n")
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="ckpt-00000005"):
        assert checkpoint.read_meta(tmp_path)["global_step"] == 5
    # The next save cleans up everything but another writer's staging directory; `tidy`, run
    # by the directory's one writer (it holds the lock), removes that of the killed run too.
    second = save_tiny(tmp_path, seed=1, step=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, "LATEST", "ckpt-00000012"]
    checkpoint.tidy(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000012"]
    assert same(checkpoint.load(tmp_path).model, second)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_a_flipped_byte_in_any_file_is_a_one_line_error(tmp_path, name):
    save_tiny(tmp_path, seed=0, step=5)
    path = tmp_path / "ckpt-00000005" / name
    # meta.json: flip a digit of the step count; elsewhere a byte of the tensor data.
    flip(path, offset=path.read_text().index('"epoch": 5') + 9 if name == "meta.json" else -3)
    with pytest.raises(checkpoint.CorruptCheckpoint) as e:
        checkpoint.load(tmp_path, with_optimizer=True)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "no earlier complete checkpoint" in msg
    assert isinstance(e.value, ValueError)  # the CLI prints ValueErrors as one line


def test_an_edited_meta_is_refused_even_as_valid_json(tmp_path):
    save_tiny(tmp_path, seed=0, step=5)
    path = tmp_path / "ckpt-00000005" / "meta.json"
    meta = json.loads(path.read_text())
    meta["epoch"] = 3
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="meta.json: content does not match"):
        checkpoint.read_meta(tmp_path)


def test_a_corrupt_live_checkpoint_falls_back_to_an_earlier_complete_one(tmp_path):
    first = save_tiny(tmp_path, seed=0, step=5)
    keep = tmp_path / "keep"
    (tmp_path / "ckpt-00000005").rename(keep)
    save_tiny(tmp_path, seed=1, step=10)
    keep.rename(tmp_path / "ckpt-00000005")  # as if the crash came before the old one's removal
    flip(tmp_path / "ckpt-00000010" / "optimizer.safetensors")
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="optimizer.safetensors"):
        assert same(checkpoint.load(tmp_path, with_optimizer=True).model, first)


def test_the_flat_layout_is_read_and_replaced(tmp_path):
    model = tiny_model(0)
    data = checkpoint._tensor_bytes(model.state_dict())
    (tmp_path / "model.safetensors").write_bytes(data)
    meta = {"model_config": TINY.to_dict(), "model_sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "demo_age.json").write_text("{}")  # not a checkpoint file: kept
    assert same(checkpoint.load(tmp_path).model, model)
    second = save_tiny(tmp_path, seed=1, step=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["LATEST", "ckpt-00000003", "demo_age.json"]
    assert same(checkpoint.load(tmp_path).model, second)


def test_no_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.read_meta(tmp_path)
    assert not checkpoint.exists(tmp_path)


def test_the_fallback_warning_points_at_the_caller(tmp_path):
    save_tiny(tmp_path, seed=0, step=5)
    (tmp_path / "LATEST").write_text("ckpt-00000011\n")
    for read in (checkpoint.load, checkpoint.read_meta, checkpoint.live):
        with pytest.warns(checkpoint.CheckpointFallbackWarning) as record:
            read(tmp_path)
        assert record[0].filename == __file__, read.__name__


def _hybrid(vocab: IdVocab) -> UserModel:
    config = replace(
        TINY, behavior_encoder="hybrid", hybrid_text="selfattn", num_items=6, id_vocab=vocab.size
    )
    torch.manual_seed(0)
    model = UserModel(config=config)
    model.behavior_encoder.set_id_index(vocab.id_index())
    return model


def test_a_hybrid_model_and_its_id_vocabulary_must_agree(tmp_path):
    seqs = np.array([[1, 1, 2, 3, 0], [1, 2, 5, 0, 0]])
    tokens, texts = torch.arange(6 * 4).reshape(6, 4), ["a", "b", "c", "d", "e"]
    vocab = build_id_vocab(seqs, texts, tokens, min_count=2)
    other = build_id_vocab(seqs, texts, tokens, min_count=1)
    model = _hybrid(vocab)
    meta = {"model_config": model.config.to_dict()}
    with pytest.raises(ValueError, match="id_index is not the one of the id_vocab"):
        checkpoint.save(tmp_path, model, meta, id_vocab=other)
    where = checkpoint.save(tmp_path, model, meta, id_vocab=vocab)
    assert checkpoint.load(tmp_path).id_vocab == vocab
    # Another vocabulary put in with every hash re-signed: the weights' id_index still differs.
    (where / "id_vocab.json").write_bytes(other.to_json())
    saved = json.loads((where / "meta.json").read_text())
    saved["id_vocab_sha256"] = other.sha256
    saved["meta_sha256"] = checkpoint._meta_digest(saved)
    (where / "meta.json").write_text(json.dumps(saved))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="id_index does not match"):
        checkpoint.load(tmp_path)
