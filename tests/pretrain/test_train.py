"""Pre-training behavior: learning, unique-item encoding, checkpoints, resume, data parallel."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ptum import checkpoint
from ptum.data.corpus import load_corpus
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.data import make_batch, step_rng
from ptum.pretrain.tasks import ptum_step

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "word_dim": 16,
    "dim": 16,
    "heads": 2,
    "head_dim": 8,
    "attn_hidden": 16,
    "dropout": 0.0,
    "layers": 1,
}


def _config(arch_user="hsa", behavior="selfattn", **kw) -> ModelConfig:
    return ModelConfig(
        behavior_encoder=behavior,
        user_encoder=arch_user,
        vocab_size=400,
        max_tokens=16,
        max_behaviors=20,
        **(TINY_MODEL | kw),
    )


@pytest.fixture(scope="module")
def corpus(tiny_pipeline):
    return load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)


def test_loss_falls_when_overfitting_one_batch(corpus):
    torch.manual_seed(0)
    model = UserModel(config=_config())
    rows = np.flatnonzero(corpus.lengths >= 2)[:32]
    batch = make_batch(corpus, rows, step_rng(0, 0, 0), k=2, p=4, negatives="popularity")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = ptum_step(model, corpus.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.5 * first
    assert out["mbp_acc"].item() > 0.8


def test_unique_item_encoding_equals_naive(corpus):
    torch.manual_seed(0)
    model = UserModel(config=_config()).eval()
    rows = np.flatnonzero(corpus.lengths >= 2)[:16]
    batch = make_batch(corpus, rows, step_rng(0, 0, 0), k=2, p=4, negatives="popularity")
    a = ptum_step(model, corpus.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0, unique=True)
    b = ptum_step(model, corpus.tokens, batch, use_mbp=True, use_nbp=True, lam=1.0, unique=False)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_switching_a_task_off(corpus):
    model = UserModel(config=_config())
    rows = np.flatnonzero(corpus.lengths >= 2)[:8]
    batch = make_batch(corpus, rows, step_rng(0, 0, 0), k=2, p=4, negatives="popularity")
    only_mbp = ptum_step(model, corpus.tokens, batch, use_mbp=True, use_nbp=False, lam=1.0)
    assert "nbp_loss" not in only_mbp and torch.equal(only_mbp["loss"], only_mbp["mbp_loss"])
    both = ptum_step(model, corpus.tokens, batch, use_mbp=True, use_nbp=True, lam=0.5)
    assert torch.allclose(both["loss"], both["mbp_loss"] + 0.5 * both["nbp_loss"])


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = UserModel(config=_config())
    checkpoint.save(
        tmp_path, model, {"model_config": model.config.to_dict(), "tokenizer_sha256": "a" * 64}
    )
    loaded = checkpoint.load(tmp_path, tokenizer_sha256="a" * 64, expect_config=model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    with pytest.raises(checkpoint.CheckpointMismatch, match="trained with tokenizer aaaa"):
        checkpoint.load(tmp_path, tokenizer_sha256="b" * 64)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match="encoder config differs.*'dim': \\(16, 32\\)"
    ):
        checkpoint.load(tmp_path, expect_config=_config(dim=32))
    # Weights replaced without a matching meta.json are refused (no earlier checkpoint).
    other = UserModel(config=_config())
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(checkpoint.live(tmp_path) / "model.safetensors"))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not match the hash"):
        checkpoint.load(tmp_path)


# ---------------------------------------------------------------- CLI runs (subprocesses)


def _project(tmp_path: Path, tiny_pipeline: Path, **pretrain) -> Path:
    """A throw-away project dir holding the tiny data and a params.yaml for tiny models."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    for sub in ("prepared", "tokenized"):
        shutil.copytree(tiny_pipeline / sub, proj / "data" / sub)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["max_behaviors"] = 20
    params["pretrain"].update({"model": TINY_MODEL, "batch_size": 16, "epochs": 2} | pretrain)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def _ptum(proj: Path, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "ptum", *args],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def _weights(proj: Path, arch: str = "hsa") -> dict[str, torch.Tensor]:
    live = checkpoint.live(proj / "models" / "pretrain" / arch)
    return load_file(str(live / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_weights(tmp_path, tiny_pipeline):
    ref = _project(tmp_path / "ref", tiny_pipeline, epochs=6)
    p = _ptum(ref, "pretrain", "--arch", "hsa")
    assert p.wait(timeout=300) == 0, p.stdout.read()

    run = _project(tmp_path / "run", tiny_pipeline, epochs=6)
    p = _ptum(run, "pretrain", "--arch", "hsa")
    ckpt = run / "models" / "pretrain" / "hsa"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if checkpoint.exists(ckpt) and checkpoint.read_meta(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, "run finished before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0 and "interrupted by signal" in out
    saved = checkpoint.read_meta(ckpt)
    assert not saved["complete"] and saved["epoch"] < 6
    p = _ptum(run, "pretrain", "--arch", "hsa")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "resuming from epoch" in out, out
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Exact caching: the whole DVC output is byte-equal (one thread each: OMP_NUM_THREADS=1).
    assert _hashes(ref / "models/pretrain/hsa") == _hashes(run / "models/pretrain/hsa")
    hist_a = json.loads((ref / "reports/pretrain/hsa/history.json").read_text())
    hist_b = json.loads((run / "reports/pretrain/hsa/history.json").read_text())
    assert [h["valid_loss"] for h in hist_a] == [h["valid_loss"] for h in hist_b]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_pipeline):
    # One machine's ranks only may be told to stop (its agent got SIGTERM): the others must
    # stop with them at the same step, since the save is collective, not wait on a collective
    # that never comes until the launcher's 30 s grace kills them.
    run = _project(tmp_path / "run", tiny_pipeline, epochs=40, batch_size=16)
    p = _ptum(run, "pretrain", "--arch", "hsa", "--nproc", "2")
    ckpt = run / "models" / "pretrain" / "hsa"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if checkpoint.exists(ckpt) and checkpoint.read_meta(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    ranks = _children(p.pid)
    assert p.poll() is None and len(ranks) == 2, "run finished before it could be interrupted"
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert time.monotonic() - t0 < 20, f"ranks waited for the launcher's grace:\n{out}"
    assert out.count("interrupted by signal 15") == 2, out  # both ranks saved and stopped
    saved = checkpoint.read_meta(ckpt)
    assert not saved["complete"] and 1 <= saved["epoch"] < 40


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_lost_rank_is_one_line_not_a_bug(tmp_path, tiny_pipeline):
    # A rank killed outright (out of memory, its machine lost): its peers fail their next
    # collective; that is an event of the infrastructure, named as such, not a bug of ptum.
    run = _project(tmp_path / "run", tiny_pipeline, epochs=40, batch_size=16)
    p = _ptum(run, "pretrain", "--arch", "hsa", "--nproc", "2")
    ckpt = run / "models" / "pretrain" / "hsa"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if checkpoint.exists(ckpt) and checkpoint.read_meta(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    ranks = _children(p.pid)
    assert p.poll() is None and len(ranks) == 2, "run finished before it could be interrupted"
    os.kill(ranks[1], signal.SIGKILL)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2, out
    assert "bug" not in out and "Traceback" not in out, out
    assert "a process of this stage was killed by SIGKILL" in out, out
    # The surviving rank names the loss in gloo's words when its collective saw it first.
    lost = [line for line in out.splitlines() if "lost a peer" in line]
    assert all(re.search(r"\(gloo: .*by peer[^)]*\); another process", x) for x in lost), out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, tiny_pipeline):
    one = _project(tmp_path / "one", tiny_pipeline, epochs=2, batch_size=16)
    two = _project(tmp_path / "two", tiny_pipeline, epochs=2, batch_size=16)
    p1 = _ptum(one, "pretrain", "--arch", "hsa")
    assert p1.wait(timeout=300) == 0, p1.stdout.read()
    p2 = _ptum(two, "pretrain", "--arch", "hsa", "--nproc", "2")
    out = p2.communicate(timeout=300)[0]
    assert p2.returncode == 0, out
    h1 = json.loads((one / "reports/pretrain/hsa/history.json").read_text())
    h2 = json.loads((two / "reports/pretrain/hsa/history.json").read_text())
    # Not bit-equal: each rank averages its masked MBP/NBP losses over its own valid samples, so
    # a rank with fewer valid NBP targets (short sequences; batches are length-bucketed) weighs
    # them a little more than one process averaging the global batch does.
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-3)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=5e-3)
    # And the losses moved: the comparison is between real training curves.
    assert h1[-1]["valid_loss"] < h1[0]["valid_loss"] or h1[-1]["train_loss"] < h1[0]["train_loss"]
