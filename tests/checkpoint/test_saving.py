"""Saving a checkpoint: one atomic unit per save switched by LATEST, byte-equal directories for
equal saves, a failed save leaves the previous checkpoint live."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from ptum import checkpoint
from tests.checkpoint.common import hashes, same, save_tiny, stepped_optimizer, tiny_model


def test_a_save_is_one_directory_switched_by_latest(tmp_path):
    save_tiny(tmp_path, seed=0, step=5)
    second = save_tiny(tmp_path, seed=1, step=10)
    # Only the live checkpoint stays; LATEST names it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000010"]
    assert (tmp_path / "LATEST").read_text() == "ckpt-00000010\n"
    assert sorted(p.name for p in (tmp_path / "ckpt-00000010").iterdir()) == [
        "meta.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    loaded = checkpoint.load(tmp_path, with_optimizer=True)
    assert same(loaded.model, second) and loaded.optimizer_tensors
    assert loaded.path == tmp_path / "ckpt-00000010" == checkpoint.live(tmp_path)


def test_equal_saves_give_byte_equal_directories(tmp_path):
    save_tiny(tmp_path / "a", seed=3, step=7)
    save_tiny(tmp_path / "b", seed=3, step=7)
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")


def test_saving_the_live_step_again(tmp_path):
    save_tiny(tmp_path, seed=0, step=4)
    model = save_tiny(tmp_path, seed=1, step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000004"]
    assert same(checkpoint.load(tmp_path).model, model)


@pytest.mark.parametrize("fail_on", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_a_failed_save_leaves_the_previous_checkpoint_live(tmp_path, monkeypatch, fail_on):
    first = save_tiny(tmp_path, seed=0, step=5)
    real = checkpoint.saving._write_durable

    def disk_full(path: Path, data: bytes) -> None:
        if path.name == fail_on:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint.saving, "_write_durable", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_tiny(tmp_path, seed=1, step=10)
    monkeypatch.undo()
    # The staging directory is gone; nothing warns: the live checkpoint never changed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000005"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(checkpoint.load(tmp_path).model, first)


def test_re_saving_a_loaded_meta_without_anoptimizer(tmp_path):
    save_tiny(tmp_path / "a", seed=0, step=5)
    loaded = checkpoint.load(tmp_path / "a")
    checkpoint.save(tmp_path / "b", loaded.model, loaded.meta)  # meta names an optimizer file
    meta = checkpoint.read_meta(tmp_path / "b")
    assert "optimizer_sha256" not in meta and same(
        checkpoint.load(tmp_path / "b").model, loaded.model
    )


def test_leftover_pointer_temps_are_removed_by_the_next_save(tmp_path):
    """A kill while LATEST was being replaced leaves its temp file (this layout's or the older
    fixed name); the next save removes it and keeps files it did not write."""
    save_tiny(tmp_path, seed=0, step=5)
    for name in (".LATEST.0a1b2c3d.tmp", "LATEST.tmp", "demo_age.json", ".notes.0a1b2c3d.tmp"):
        (tmp_path / name).write_text("x")
    save_tiny(tmp_path, seed=1, step=6)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".notes.0a1b2c3d.tmp", "LATEST", "ckpt-00000006", "demo_age.json"]


def test_a_save_removes_its_own_staging_directories_only(tmp_path, monkeypatch):
    """Another writer's staging directory (another process saving into the directory) is not
    this save's to remove; its own leftovers are; `tidy`, run by the directory's one writer
    (the lock holder), removes those of dead runs too."""
    from ptum.checkpoint import saving

    save_tiny(tmp_path, seed=0, step=5)
    other = tmp_path / ".staging-ckpt-00000006-4242.0a1b2c3d"  # another process's
    own = tmp_path / f".staging-ckpt-00000004-{saving.writer()}"  # left by a failed save
    for staging in (other, own):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"partial")
    assert saving.writer().startswith(f"{os.getpid()}.")
    model = save_tiny(tmp_path, seed=1, step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "LATEST", "ckpt-00000006"]
    assert (other / "model.safetensors").read_bytes() == b"partial"  # untouched
    assert same(checkpoint.load(tmp_path).model, model)
    checkpoint.tidy(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000006"]


def test_a_save_in_progress_is_named_by_its_writer(tmp_path, monkeypatch):
    from ptum.checkpoint import saving

    seen = []
    real = checkpoint.saving._write_durable
    monkeypatch.setattr(
        checkpoint.saving,
        "_write_durable",
        lambda path, data: (seen.append(path.parent), real(path, data)),
    )
    save_tiny(tmp_path, seed=0, step=3)
    assert {p.name for p in seen} == {f".staging-ckpt-00000003-{saving.writer()}"}


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = tiny_model(0)
    opt = stepped_optimizer(model)
    tensors, scalars = checkpoint.optimizer_tensors(opt)
    json.dumps(scalars)  # the scalars go to meta.json
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    checkpoint.load_optimizer(fresh, tensors, scalars)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][name]))
