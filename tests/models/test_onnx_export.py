"""Slow check: the serving path exports with torch.onnx (dynamo) and matches onnxruntime.

Recurrent encoders (LSTM behaviors, HAN, GRU4Rec) export with the sequence lengths fixed at
export time: torch.export specializes nn.LSTM/nn.GRU sequence lengths. Serve them padded to the
exported T and L (padding never changes a user's vector); only the batch size stays dynamic.
"""

import numpy as np
import pytest
import torch

from ptum.models.user_model import UserModel
from tests.models.test_user_model import VARIANTS, L, T, _batch

ort = pytest.importorskip("onnxruntime")
INPUTS = ["tokens", "token_mask", "mask", "positions", "gap_buckets"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, fixed_lengths", [("han", True), ("gru4rec", True), ("bert4rec", False)]
)
def test_onnx_export_matches_pytorch(name: str, fixed_lengths: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = UserModel(config=VARIANTS[name]).eval()
    b = _batch([6, 3, 0])
    B = torch.export.Dim("B")
    if fixed_lengths:
        seq, tok = torch.export.Dim.STATIC, torch.export.Dim.STATIC
        other = _batch([4, 2, 1, 0])  # only the batch size changes
    else:
        seq, tok = torch.export.Dim("L"), torch.export.Dim("T")
        other = _batch([4, 2, 1, 0], width=T - 2, seq=L - 1)
    shapes = {
        k: {0: B, 1: seq, 2: tok} if k.startswith("token") else {0: B, 1: seq} for k in INPUTS
    }
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, tuple(b[k] for k in INPUTS), path, dynamo=True, dynamic_shapes=shapes)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {k: other[k].numpy() for k in INPUTS})[0]
    np.testing.assert_allclose(got, model(**other).detach().numpy(), atol=1e-5)
