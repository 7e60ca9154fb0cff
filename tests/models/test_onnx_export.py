"""Slow check: `ptum.serving.export.export` (the path `ptum export` takes) matches PyTorch.

Recurrent encoders (LSTM behaviors, HAN, GRU4Rec) export with the sequence lengths fixed at
export time: torch.export specializes nn.LSTM/nn.GRU sequence lengths. Serve them padded to the
exported T and L (padding never changes a user's vector); only the batch size stays dynamic.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ptum import checkpoint
from ptum.hashing import sha256_file
from ptum.models.user_model import UserModel
from ptum.serving.contract import USER_INPUTS
from ptum.serving.export import export
from ptum.tokenize import train
from tests.models.test_user_model import VARIANTS, L, T, _batch

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    texts = [f"title number {i} of the tiny corpus" for i in range(60)]
    path.write_bytes(
        train(
            texts,
            vocab_size=40,
            model_type="unigram",
            byte_fallback=False,
            character_coverage=1.0,
            seed=1,
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, fixed_lengths", [("han", True), ("gru4rec", True), ("bert4rec", False)]
)
def test_onnx_export_matches_pytorch(
    name: str, fixed_lengths: bool, spm_model: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = UserModel(config=VARIANTS[name]).eval()
    meta = {
        "architecture": name,
        "tokenizer_sha256": sha256_file(spm_model),
        "model_config": model.config.to_dict(),
    }
    checkpoint.save(tmp_path / "ckpt", model, meta)
    report = export(
        tmp_path / "ckpt", tmp_path / "onnx", spm_model=spm_model, data_version="t", params={}
    )
    assert report["behaviors_dim"] == ("static" if fixed_lengths else "dynamic")
    assert max(report["parity"].values()) < 1e-4
    if fixed_lengths:
        other = _batch([4, 2, 1, 0])  # only the batch size changes
    else:
        other = _batch([4, 2, 1, 0], width=T - 2, seq=L - 1)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "user_model.onnx"))
    got = session.run(None, {k: other[k].numpy() for k in USER_INPUTS})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**other).numpy(), rtol=1e-4, atol=1e-5)
