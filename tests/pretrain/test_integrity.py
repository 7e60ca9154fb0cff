"""Pre-training survives torn saves, refuses corrupt inputs, and is exactly reproducible:
deterministic runs (interrupted or not) write byte-equal checkpoint directories."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptum import checkpoint
from ptum.config import ModelParams, PretrainConfig
from ptum.data.corpus import load_corpus, read_tokens, tokenizer_digest
from ptum.data.verified import write_manifest
from ptum.hashing import HashMismatch
from ptum.models.id_vocab import item_table_digest
from ptum.models.user_model import ModelConfig
from ptum.pretrain import train as train_mod
from ptum.pretrain.options import check_negatives, deterministic_mode
from ptum.pretrain.train import pretrain
from ptum.stages.pretrain import pretrain_one, train_options
from tests.pretrain.test_train import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3


def _config(train) -> ModelConfig:
    return ModelConfig.for_architecture(
        "hsa",
        vocab_size=400,
        max_tokens=int(train.tokens.shape[1]),
        max_behaviors=20,
        num_items=train.num_items + 1,
        **TINY_MODEL,
    )


def train_tiny(tiny_root: Path, out_dir: Path, **opts) -> dict:
    """A deterministic 3-epoch pre-training of a tiny HSA (also run by the SIGKILL child)."""
    prepared, tokenized = tiny_root / "prepared", tiny_root / "tokenized"
    train = load_corpus(prepared, tokenized, "train", 20)
    valid = load_corpus(prepared, tokenized, "valid", 20)
    return pretrain(
        train=train,
        valid=valid,
        config=_config(train),
        opts=replace(
            train_options(PretrainConfig()),
            **{"batch_size": 16, "epochs": EPOCHS, "lr": 3e-3, "deterministic": True} | opts,
        ),
        out_dir=out_dir,
        meta={"architecture": "hsa"},
        log=lambda _: None,
    )


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tmp_path_factory) -> dict[str, str]:
    """File hashes of an uninterrupted run's checkpoint directory."""
    out = tmp_path_factory.mktemp("reference")
    train_tiny(tiny_pipeline, out)
    return _hashes(out)


def _steps_per_epoch(tiny_root: Path) -> int:
    train = load_corpus(tiny_root / "prepared", tiny_root / "tokenized", "train", 20)
    return -(-int((train.lengths >= 2).sum()) // 16)


# ---------------------------------------------------------------- exact reproducibility


def test_two_deterministic_runs_write_byte_equal_checkpoints(tiny_pipeline, tmp_path, reference):
    train_tiny(tiny_pipeline, tmp_path / "again")
    assert _hashes(tmp_path / "again") == reference
    # The checkpoint directory holds the final checkpoint only, and no timing.
    meta = checkpoint.read_meta(tmp_path / "again")
    assert meta["complete"] and len(meta["history"]) == EPOCHS
    assert "users_per_s" not in json.dumps(meta)


def test_stage_runs_twice_to_equal_checkpoints_with_timings_in_reports(tiny_pipeline, tmp_path):
    cfg = PretrainConfig(model=ModelParams(**TINY_MODEL), epochs=1, batch_size=16)
    kw = dict(prepared=tiny_pipeline / "prepared", tokenized=tiny_pipeline / "tokenized")
    for run in ("a", "b"):
        out = pretrain_one(
            cfg,
            "hsa",
            **kw,
            max_behaviors=20,
            out_dir=tmp_path / run / "ckpt",
            report_dir=tmp_path / run / "report",
        )
        assert out["users_per_s"] > 0
    assert _hashes(tmp_path / "a" / "ckpt") == _hashes(tmp_path / "b" / "ckpt")
    history = json.loads((tmp_path / "a" / "report" / "history.json").read_text())
    metrics = json.loads((tmp_path / "a" / "report" / "metrics.json").read_text())
    assert history[0]["users_per_s"] > 0 and metrics["users_per_s"] == history[0]["users_per_s"]
    # The checkpoint records its item table: fine-tuning refuses it against another tokens.npy.
    tokens = torch.from_numpy(np.load(tiny_pipeline / "tokenized" / "tokens.npy"))
    other = tokens.clone()
    other[1, 0] += 1
    checkpoint.load(tmp_path / "a" / "ckpt", item_table_sha256=item_table_digest(tokens))
    with pytest.raises(checkpoint.CheckpointMismatch, match="trained on item table"):
        checkpoint.load(tmp_path / "a" / "ckpt", item_table_sha256=item_table_digest(other))


def test_rerun_from_the_finished_checkpoint_keeps_the_measured_timings(tiny_pipeline, tmp_path):
    """A second run loads the finished checkpoint and trains nothing; its report keeps the
    users/s of the run that trained (dvc.yaml declares the report persist, in the pretrain stage
    and for the sensitivity stage's variant pre-trainings, so DVC leaves the earlier file)."""
    cfg = PretrainConfig(model=ModelParams(**TINY_MODEL), epochs=1, batch_size=16)
    kw = dict(
        prepared=tiny_pipeline / "prepared",
        tokenized=tiny_pipeline / "tokenized",
        max_behaviors=20,
        out_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
    )
    first = pretrain_one(cfg, "hsa", **kw)["users_per_s"]
    assert "users_per_s" not in pretrain_one(cfg, "hsa", **kw)  # nothing trained, nothing timed
    history = json.loads((tmp_path / "report" / "history.json").read_text())
    assert [h["users_per_s"] for h in history] == [first]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    pretrain = stages["pretrain"]["do"]
    reports = [o for kind in ("metrics", "plots") for o in pretrain[kind]]
    reports += [o for o in stages["sensitivity"]["outs"] if "reports/sensitivity/pretrain" in o]
    assert len(reports) == 3 and all(next(iter(o.values())).get("persist") for o in reports)


def test_deterministic_mode_restores_torch_settings():
    threads = torch.get_num_threads()
    with deterministic_mode(True, threads=1):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads


# ---------------------------------------------------------------- interrupted runs


def test_failed_save_then_rerun_equals_an_uninterrupted_run(
    tiny_pipeline, tmp_path, monkeypatch, reference
):
    """A full disk while writing the optimizer of epoch 2's checkpoint: the run fails, epoch 1's
    checkpoint stays live, and the rerun ends byte-equal to an uninterrupted run."""
    target = f"ckpt-{2 * _steps_per_epoch(tiny_pipeline):08d}"
    real = checkpoint.saving._write_durable

    def disk_full(path: Path, data: bytes) -> None:
        if path.name == "optimizer.safetensors" and target in path.parent.name:
            path.write_bytes(data[:100])
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint.saving, "_write_durable", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_tiny(tiny_pipeline, tmp_path)
    monkeypatch.undo()
    assert checkpoint.read_meta(tmp_path)["epoch"] == 1
    train_tiny(tiny_pipeline, tmp_path)
    assert _hashes(tmp_path) == reference


_KILL_CHILD = """
import os, signal, sys
from pathlib import Path
from ptum import checkpoint
from tests.pretrain.test_integrity import train_tiny

target = sys.argv[3]
real = checkpoint.saving._write_durable
def write(path, data):
    real(path, data)
    if path.name == "model.safetensors" and target in path.parent.name:
        os.kill(os.getpid(), signal.SIGKILL)  # between the files of a save
checkpoint.saving._write_durable = write
train_tiny(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_sigkill_between_the_files_of_a_save(tiny_pipeline, tmp_path, reference):
    target = f"ckpt-{2 * _steps_per_epoch(tiny_pipeline):08d}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, str(tiny_pipeline), str(tmp_path), target],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    # The torn save is a staging directory beside the live epoch-1 checkpoint.
    names = sorted(x.name for x in tmp_path.iterdir())
    assert names[0].startswith(".staging-" + target) and len(names) == 3, names
    assert checkpoint.read_meta(tmp_path)["epoch"] == 1
    train_tiny(tiny_pipeline, tmp_path)
    assert _hashes(tmp_path) == reference


def test_sigterm_mid_epoch_then_resume_is_byte_equal(
    tiny_pipeline, tmp_path, monkeypatch, reference
):
    """Interrupted in the middle of epoch 2: the resumed epoch reports the same training loss
    (its running sums travel in the checkpoint), so the whole directory is byte-equal."""
    real = train_mod.step_rng

    def step_rng(seed: int, epoch: int, step: int):
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop: save, then Interrupted
        return real(seed, epoch, step)

    monkeypatch.setattr(train_mod, "step_rng", step_rng)
    with pytest.raises(train_mod.Interrupted):
        train_tiny(tiny_pipeline, tmp_path)
    monkeypatch.undo()
    saved = checkpoint.read_meta(tmp_path)
    assert saved["epoch"] == 1 and saved["step_in_epoch"] == 2 and saved["partial_epoch"]["seen"]
    train_tiny(tiny_pipeline, tmp_path)
    assert _hashes(tmp_path) == reference


# ---------------------------------------------------------------- corrupt inputs


def test_a_corrupt_optimizer_state_stops_the_resume(tiny_pipeline, tmp_path):
    train_tiny(tiny_pipeline, tmp_path, epochs=1)
    path = checkpoint.live(tmp_path) / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="optimizer.safetensors: does not match"):
        train_tiny(tiny_pipeline, tmp_path, epochs=1)


def test_a_re_signed_meta_with_an_impossible_position_is_refused(tiny_pipeline, tmp_path):
    """Even a meta.json edited together with its own hash must agree with the step count."""
    train_tiny(tiny_pipeline, tmp_path, epochs=1)
    path = checkpoint.live(tmp_path) / "meta.json"
    meta = json.loads(path.read_text())
    meta["epoch"] = 0  # global_step still says one epoch was done
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="inconsistent with"):
        train_tiny(tiny_pipeline, tmp_path, epochs=1)


@pytest.fixture
def tokenized(tiny_pipeline, tmp_path) -> Path:
    out = tmp_path / "tokenized"
    shutil.copytree(tiny_pipeline / "tokenized", out)
    return out


def test_a_modified_spm_model_is_refused(tokenized):
    assert tokenizer_digest(tokenized)
    with (tokenized / "spm.model").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(HashMismatch) as e:
        tokenizer_digest(tokenized)
    msg = str(e.value)
    assert "\n" not in msg and str(tokenized / "spm.model") in msg and "ptum tokenize" in msg


def test_a_modified_tokens_matrix_is_refused(tiny_pipeline, tokenized):
    assert read_tokens(tokenized).shape[0] > 1
    tokens = np.load(tokenized / "tokens.npy")
    tokens[1, 0] = (tokens[1, 0] + 1) % 300
    np.save(tokenized / "tokens.npy", tokens)
    with pytest.raises(HashMismatch, match=r"tokens.npy: SHA-256 .* recorded in .*manifest.json"):
        load_corpus(tiny_pipeline / "prepared", tokenized, "train", 20)


def test_a_swapped_tokens_matrix_is_refused_even_with_a_matching_manifest(tokenized):
    tokens = np.load(tokenized / "tokens.npy")
    np.save(tokenized / "tokens.npy", tokens[:-1])  # another item table
    write_manifest(tokenized, "tokenize")  # a manifest rewritten to match
    with pytest.raises(HashMismatch, match=r"is not the int \(\d+, 16\) matrix"):
        read_tokens(tokenized)
    buf = io.BytesIO()
    np.save(buf, np.full_like(tokens, 10_000))  # another vocabulary
    (tokenized / "tokens.npy").write_bytes(buf.getvalue())
    write_manifest(tokenized, "tokenize")
    with pytest.raises(HashMismatch, match="token ids outside"):
        read_tokens(tokenized)


@pytest.mark.parametrize("change", ["other_texts", "one_more_item"])
def test_tokens_made_from_another_item_table_are_refused(tiny_pipeline, tmp_path, change):
    # `ptum prepare` rerun on other data after `ptum tokenize`: the same item count trained
    # every item on another item's tokens; one more item indexed past the token matrix.
    import polars as pl

    from ptum.pretrain.setup import load_inputs

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_pipeline / "prepared", prepared)
    items = pl.read_parquet(prepared / "items.parquet").sort("item_id")
    if change == "other_texts":
        items = items.with_columns(pl.col("text").reverse())
        expected = r"item \d+'s tokens do not encode its text"
    else:
        extra = items.tail(1).with_columns(
            pl.col("item_id") + 1, pl.lit("a new title").alias("text")
        )
        items = pl.concat([items, extra])
        expected = rf"tokens for {items.height - 1} items, but the item table has {items.height}"
    items.write_parquet(prepared / "items.parquet")
    write_manifest(prepared, "prepare")
    with pytest.raises(ValueError, match=rf"{expected}.*rerun `ptum tokenize`"):
        load_inputs(prepared, tiny_pipeline / "tokenized", 20, arch="hsa")
    load_inputs(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", 20, arch="hsa")


# ---------------------------------------------------------------- parameters


def test_more_negatives_than_items_is_a_clear_error(tiny_pipeline, tmp_path):
    train = load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)
    distinct = len(np.unique(train.pool))
    with pytest.raises(ValueError, match=rf"pretrain.p = 100000: .* only {distinct} distinct"):
        train_tiny(tiny_pipeline, tmp_path, p=100_000)
    with pytest.raises(ValueError, match=rf"only {train.num_items} distinct items of the item"):
        train_tiny(tiny_pipeline, tmp_path, p=100_000, negatives="uniform")
    assert not checkpoint.exists(tmp_path)


def test_a_corpus_too_small_for_any_negative_says_so_not_an_impossible_p(tiny_pipeline):
    # One distinct item (e.g. every user has one behavior, or one title): "use pretrain.p <= 1"
    # with p = 1 was advice that could not work.
    corpus = load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)
    one = replace(corpus, pool=np.ones_like(corpus.pool))
    opts = replace(train_options(PretrainConfig()), p=1)
    with pytest.raises(ValueError, match=r"has 1 distinct items of its behaviors .* too few"):
        check_negatives(one, opts)


# ---------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_and_one_line_per_epoch_otherwise(
    tiny_pipeline, tmp_path, monkeypatch, capsys
):
    prepared, tok = tiny_pipeline / "prepared", tiny_pipeline / "tokenized"
    train = load_corpus(prepared, tok, "train", 20)
    valid = load_corpus(prepared, tok, "valid", 20)
    kw = dict(train=train, valid=valid, config=_config(train), meta={})
    opts = replace(train_options(PretrainConfig()), batch_size=16, epochs=2)
    pretrain(**kw, opts=opts, out_dir=tmp_path / "a")  # stderr is not a terminal under pytest
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["epoch"] == 2
    # Off a terminal: whole log lines (ptum.progress), the first and last of the epoch loop
    # here (the rest come at most once a minute), no bar.
    logged = err.splitlines()
    assert logged[0] == "pretrain: 0/2 epochs (0%), elapsed 0:00", err
    assert re.fullmatch(r"pretrain: 2/2 epochs \(100%\), elapsed \d+:\d\d", logged[-1]), err
    assert "\r" not in err and "batch/s" not in err
    assert "users_per_s" in lines[0]
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    pretrain(**kw, opts=opts, out_dir=tmp_path / "b")
    bars = term.getvalue()
    assert "pretrain" in bars and "epoch 2" in bars and "batch/s" in bars and "<" in bars  # ETA
    term.truncate(0)
    pretrain(**kw, opts=opts, out_dir=tmp_path / "c", progress=False)  # e.g. tuning trials
    assert term.getvalue().strip("\x00") == ""
