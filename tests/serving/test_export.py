"""ONNX export: onnxruntime matches PyTorch eval at shapes other than the export shapes.

Fast set: hsa (all dims dynamic), gru4rec (static L) and hsa with the hybrid behavior encoder
(item_ids input). The other architectures, and the hybrid encoder around the CNN (gru4rec) and
LSTM (han: static T and L) text encoders, run in the slow sweep (each export costs several seconds
of torch.export).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ptum.checkpoint import CheckpointMismatch
from ptum.config import ExportConfig
from ptum.hashing import sha256_file as file_sha256
from ptum.heads import BiasedCtrHead, CtrHead, DemoHead, load_demo_heads
from ptum.models.layers import MultiHeadSelfAttention
from ptum.models.user_model import ARCHITECTURES, ModelConfig, UserModel
from ptum.serving.contract import USER_INPUTS, static_lengths, user_inputs
from ptum.serving.export import export
from ptum.serving.fold import ATTENTION_OPSET, FoldedSelfAttnEncoder, serving_ids, serving_model
from ptum.serving.heads import export_head
from ptum.serving.parity import example_inputs
from ptum.tokenize import train
from tests.serving.conftest import AGE_CLASSES, TINY

FAST = ("hsa", "gru4rec", "hsa+hybrid")
HYBRID = ["hsa+hybrid", "gru4rec+hybrid", "han+hybrid"]
ARCHS = [
    a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
    for a in sorted(ARCHITECTURES) + HYBRID
]
RTOL, ATOL = 1e-3, 1e-5


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pad(inputs: dict[str, torch.Tensor], L: int, T: int) -> dict[str, torch.Tensor]:
    """Right-pad behaviors to L and tokens to T with zeros / False (what serving does)."""
    out = {}
    for k, v in inputs.items():
        pad = [0, T - v.shape[2], 0, L - v.shape[1]] if v.dim() == 3 else [0, L - v.shape[1]]
        out[k] = torch.nn.functional.pad(v, pad)
    return out


def _cases(config) -> list[tuple[str, list[int], int, int]]:
    """(name, behaviors per user, L, T) — none at the export example shape (3, 5, 7)."""
    Lmax, Tmax = config.max_behaviors, config.max_tokens
    rng = np.random.default_rng(0)
    return [
        ("batch 1, max-length user", [Lmax], Lmax, Tmax),
        ("batch 7, short/max/mostly-padding/empty", [Lmax, 1, 2, 0, Lmax - 1, 5, 1], Lmax, Tmax),
        ("batch 7, short users and texts", [3, 1, 2, 3, 0, 1, 2], 3, 2),
        ("batch 64, random lengths", [int(x) for x in rng.integers(0, Lmax + 1, 64)], Lmax, 4),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_matches_pytorch(arch: str, exported) -> None:
    ex = exported(arch)
    model, config = ex.model, ex.model.config
    static_l, static_t = static_lengths(config)
    user, items = _session(ex.onnx / "user_model.onnx"), _session(ex.onnx / "behavior_encoder.onnx")
    for seed, (name, lengths, L, T) in enumerate(_cases(config)):
        inputs = example_inputs(config, lengths, behaviors=L, tokens=T, seed=seed)
        item_keys = [k for k in ("tokens", "token_mask", "item_ids") if k in inputs]
        with torch.no_grad():
            want = model(**inputs).numpy()
            want_items = model.behavior_encoder(
                *(inputs[k].flatten(0, 1) for k in item_keys)
            ).numpy()
        # Static dims are served padded to the exported size; padding must not change a vector.
        # A hybrid model's item ids are served as ids of the exported vocabulary.
        served = _pad(
            serving_ids(model, inputs),
            config.max_behaviors if static_l else L,
            config.max_tokens if static_t else T,
        )
        got = user.run(None, {k: served[k].numpy() for k in user_inputs(config)})[0]
        assert got.shape == (len(lengths), config.dim), name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
        assert np.isfinite(got).all() and np.isfinite(want).all(), name
        flat = {k: served[k][:, :L].flatten(0, 1).numpy() for k in item_keys}
        got_items = items.run(None, flat)[0]
        np.testing.assert_allclose(got_items, want_items, rtol=RTOL, atol=ATOL, err_msg=name)
    assert max(ex.report["parity"].values()) < 1e-4
    # Written out, not derived from static_lengths: only the recurrent user encoders (HAN's
    # LSTM, GRU4Rec's GRU) pin the behaviors dim; attention models (BERT4Rec, ...) keep it free.
    recurrent = arch.partition("+")[0] in ("han", "gru4rec")
    assert ex.report["behaviors_dim"] == ("static" if recurrent else "dynamic")


@pytest.mark.parametrize("arch", FAST)
def test_graph_dims_and_metadata(arch: str, exported, tiny_pipeline) -> None:
    ex = exported(arch)
    config = ex.model.config
    static_l, static_t = static_lengths(config)
    spm = tiny_pipeline / "tokenized" / "spm.model"
    assert file_sha256(ex.onnx / "spm.model") == file_sha256(spm)
    for path in ex.onnx.glob("*.onnx"):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] == ATTENTION_OPSET
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["spm_sha256"] == file_sha256(spm)
        assert meta["max_behaviors"] == str(config.max_behaviors)
        assert meta["max_tokens"] == str(config.max_tokens)
        assert meta["pad_id"] == "0" and meta["output_dim"] == str(config.dim)
        assert meta["gap_bucket_rule"].startswith("floor(log2(gap_seconds+1)) clamped to [0,31]")
        assert meta["behaviors_dim"] == ("static" if static_l else "dynamic")
        assert meta["tokens_dim"] == ("static" if static_t else "dynamic")
        assert meta["architecture"] == arch.partition("+")[0]
        assert meta["data_version"] == "tiny-test"
        assert meta["behavior_encoder"] == config.behavior_encoder
        if config.behavior_encoder == "hybrid":
            assert meta["id_vocab_sha256"] == file_sha256(ex.onnx / "id_vocab.json")
            assert meta["item_id_rule"].startswith("item_ids: i + 2 for the text texts[i]")
        else:
            assert "id_vocab_sha256" not in meta and not (ex.onnx / "id_vocab.json").exists()
        assert json.loads(meta["params"]) == {"pretrain": {"model": TINY}}
        for i in model.graph.input:
            assert i.type.tensor_type.shape.dim[0].dim_param, f"{path.name}:{i.name} batch fixed"
        # Same commit, another checkout directory: same bytes (no source paths inside).
        checkout = str(Path(__file__).resolve().parents[2]).encode()
        assert checkout not in path.read_bytes(), f"{path.name} embeds the checkout path"
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(str(ex.onnx / "user_model.onnx")).graph.input
    }
    L = config.max_behaviors if static_l else "behaviors"
    T = config.max_tokens if static_t else "tokens"
    assert dims["tokens"] == ["batch", L, T] and dims["mask"] == ["batch", L]
    assert list(dims) == list(user_inputs(config))
    if config.behavior_encoder == "hybrid":
        assert dims["item_ids"] == ["batch", L]
        item_dims = {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(ex.onnx / "behavior_encoder.onnx")).graph.input
        }
        assert item_dims == {
            "tokens": ["items", T],
            "token_mask": ["items", T],
            "item_ids": ["items"],
        }
    assert json.loads((ex.onnx / "export.json").read_text())["files"]["spm.model"]


def test_heads_match_pytorch(exported) -> None:
    ex = exported("hsa")
    head, classes = load_demo_heads(ex.checkpoint)["age"]
    assert classes == AGE_CLASSES
    demo, ctr = _session(ex.onnx / "demo_age.onnx"), _session(ex.onnx / "ctr_head.onnx")
    assert json.loads(demo.get_modelmeta().custom_metadata_map["classes"]) == AGE_CLASSES
    for b in (1, 9, 64):
        user, cand = torch.randn(b, 16), torch.randn(b, 16)
        with torch.no_grad():
            want_p, want_s = head(user).numpy(), CtrHead()(user, cand).numpy()
        probs = demo.run(None, {"user": user.numpy()})[0]
        score = ctr.run(None, {"user": user.numpy(), "candidate": cand.numpy()})[0]
        np.testing.assert_allclose(probs, want_p, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(score, want_s, rtol=RTOL, atol=ATOL)
        assert score.shape == (b,)


def test_export_refuses_another_tokenizer(exported, tmp_path) -> None:
    ex = exported("hsa")
    other = tmp_path / "spm.model"
    other.write_bytes(
        train(
            [f"other words {i}" for i in range(50)],
            vocab_size=40,
            model_type="unigram",
            byte_fallback=False,
            character_coverage=1.0,
            seed=1,
        )
    )
    with pytest.raises(CheckpointMismatch, match="tokenizer"):
        export(ex.checkpoint, tmp_path / "out", spm_model=other, data_version="x", params={})
    with pytest.raises(ValueError, match=">= 2"):
        export(
            ex.checkpoint,
            tmp_path / "out",
            spm_model=ex.onnx / "spm.model",
            data_version="x",
            params={},
            example_batch=1,
        )
    assert not (tmp_path / "out").exists()


def test_trained_ctr_head_exports(tmp_path) -> None:
    """A fine-tuned CtrHead (learned projection + bias) exports like the bare dot product."""
    torch.manual_seed(0)
    head = CtrHead(dim=16)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    diff = export_head(head.eval(), tmp_path / "ctr.onnx", dim=16)
    user, cand = torch.randn(5, 16), torch.randn(5, 16)
    got = _session(tmp_path / "ctr.onnx").run(
        None, {"user": user.numpy(), "candidate": cand.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(got[0], head(user, cand).numpy(), rtol=RTOL, atol=ATOL)
    assert diff < 1e-5


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ["hsa", "bert4rec", "hura"])
def test_serving_model_matches_trained_model(arch: str, fused: bool) -> None:
    """The folded serving module computes the trained model's function (trained-like weights:
    every parameter perturbed, so no bias is zero) on full, short, empty and one-token rows,
    and leaves the trained model as it was."""
    config = ModelConfig.for_architecture(
        arch, vocab_size=50, max_tokens=9, max_behaviors=6, **TINY
    )
    torch.manual_seed(0)
    model = UserModel(config=config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = serving_model(model, fused_attention=fused)
    folded = isinstance(served.behavior_encoder, FoldedSelfAttnEncoder)
    if fused:  # every self-attention swapped for its attention_3d twin
        assert not any(isinstance(m, MultiHeadSelfAttention) for m in served.modules())
    assert folded == (config.behavior_encoder == "selfattn")
    assert not served.training
    for seed, (lengths, L, T) in enumerate([([6, 0, 1, 3], 6, 9), ([2, 0, 5], 5, 4)]):
        x = example_inputs(config, lengths, behaviors=L, tokens=T, seed=seed)
        x["token_mask"][0, 0] = False  # a real behavior whose text is all padding
        x["tokens"][0, 0] = 0
        with torch.no_grad():
            want, got = model(**x), served(**x)
            items = {k: x[k].flatten(0, 1) for k in ("tokens", "token_mask")}
            want_items = model.behavior_encoder(**items)
            got_items = served.behavior_encoder(**items)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got_items, want_items, rtol=RTOL, atol=ATOL)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hybrid_serving_model_takes_exported_vocabulary_ids() -> None:
    """The served hybrid model folds its text encoder and reads ids of the exported vocabulary
    (id_index rows) where the trained one reads pre-training item ids: same function."""
    config = ModelConfig.for_architecture(
        "hsa",
        behavior_encoder="hybrid",
        vocab_size=50,
        max_tokens=9,
        max_behaviors=6,
        num_items=30,
        id_vocab=12,
        **TINY,
    )
    torch.manual_seed(0)
    model = UserModel(config=config)
    index = torch.ones(30, dtype=torch.long)
    index[0], index[1:11] = 0, torch.arange(2, 12)  # items 1-10 known, 11-29 unknown
    model.behavior_encoder.set_id_index(index)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    served = serving_model(model, fused_attention=True)
    assert isinstance(served.behavior_encoder.text, FoldedSelfAttnEncoder)
    assert torch.equal(served.behavior_encoder.id_index, torch.arange(12))
    assert torch.equal(model.behavior_encoder.id_index, index)
    x = example_inputs(config, [6, 0, 1, 3], behaviors=6, tokens=9, seed=0)
    assert (index[x["item_ids"]] == 1).any() and (index[x["item_ids"]] > 1).any()
    with torch.no_grad():
        torch.testing.assert_close(
            served(**serving_ids(model, x)), model(**x), rtol=RTOL, atol=ATOL
        )


def test_export_reports_folding(exported) -> None:
    assert exported("hsa").report["folded"] is True


def test_default_opset_fuses_attention(exported) -> None:
    """At the default opset every self-attention of HSA (the folded title encoder's and the
    user encoder's) is one ONNX Attention node, with no head transposes around it."""
    assert ExportConfig().opset >= ATTENTION_OPSET
    graph = onnx.load(str(exported("hsa").onnx / "user_model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Attention") == 2 and "Softmax" in ops  # Softmax: the additive pooling
    assert "Transpose" not in ops
    attn = [n for n in graph.node if n.op_type == "Attention"]
    assert all({a.name: a.i for a in n.attribute}["q_num_heads"] == TINY["heads"] for n in attn)
    items = onnx.load(str(exported("hsa").onnx / "behavior_encoder.onnx")).graph
    item_ops = [n.op_type for n in items.node]
    assert item_ops.count("Attention") == 1 and "Transpose" not in item_ops


def test_export_below_attention_opset_matches_pytorch(exported, tmp_path, tiny_pipeline) -> None:
    """Opset 18 (no Attention op) exports the unfused graph, and it computes the same users."""
    ex = exported("hsa")
    rep = export(
        ex.checkpoint,
        tmp_path / "onnx18",
        opset=18,
        spm_model=tiny_pipeline / "tokenized" / "spm.model",
        data_version="tiny-test",
        params={},
    )
    graph = onnx.load(str(tmp_path / "onnx18" / "user_model.onnx")).graph
    assert "Attention" not in {n.op_type for n in graph.node}
    assert {
        o.domain: o.version
        for o in onnx.load(str(tmp_path / "onnx18" / "user_model.onnx")).opset_import
    }[""] == 18
    assert max(rep["parity"].values()) < 1e-4
    config = ex.model.config
    x = example_inputs(
        config,
        [config.max_behaviors, 0, 3],
        behaviors=config.max_behaviors,
        tokens=config.max_tokens,
        seed=5,
    )
    with torch.no_grad():
        want = ex.model(**x).numpy()
    got = _session(tmp_path / "onnx18" / "user_model.onnx").run(
        None, {k: x[k].numpy() for k in USER_INPUTS}
    )[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "label, problem",
    [
        ("../../etc/x", "must match"),
        ("a/b", "must match"),
        ("age group", "must match"),
        ("", "must match"),
        ("vector", "`ptum embed` writes the columns"),
        ("user_id", "`ptum embed` writes the columns"),
        ("age_probs", "`ptum embed` writes the columns"),
    ],
)
def test_export_refuses_a_label_that_cannot_name_a_file(
    label: str, problem: str, exported, tmp_path
) -> None:
    """A label becomes demo_<label>.onnx and an embed column: a bad one is refused up front."""
    ex = exported("hsa")
    head = DemoHead(dim=ex.model.config.dim, hidden=4, classes=2)
    with pytest.raises(ValueError, match=f"cannot export demographic head .*{problem}") as e:
        export(
            ex.checkpoint,
            tmp_path / "out",
            spm_model=ex.onnx / "spm.model",
            data_version="x",
            params={},
            demo_heads={label: (head, ["a", "b"])},
        )
    assert "rename that label column" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the staging directory


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_export_progress_only_on_a_terminal(tty: bool, exported, tmp_path, monkeypatch) -> None:
    """A tqdm bar over the graphs on a terminal's stderr; nothing in a log (dvc repro)."""
    ex = exported("hsa")
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    export(
        ex.checkpoint,
        tmp_path / "out",
        spm_model=ex.onnx / "spm.model",
        data_version="x",
        params={},
    )
    if tty:  # user model, behavior encoder, CTR head and the checkpoint's one demo head
        assert "export: 100%" in err.getvalue() and "4/4" in err.getvalue()
    else:
        assert err.getvalue() == ""


def test_bias_ctr_head_exports_item_biases_with_popularity_fallback(tmp_path) -> None:
    """The bias head serves item biases by item id, and for an id it does not know (0, above
    num_items) only the popularity term, as PyTorch gives an item without training impressions;
    no per-user offset (serving users are new)."""
    torch.manual_seed(0)
    head = BiasedCtrHead(dim=16, num_items=30, num_users=5)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        head.item_bias.weight[0] = 0.0  # no item has id 0: its row never trains
        head.user_bias.weight[4] = 0.0  # a user without an offset: the new user of serving
    diff = export_head(head.eval(), tmp_path / "ctr.onnx", dim=16)
    assert diff < 1e-5
    session = _session(tmp_path / "ctr.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["ctr_scoring"] == "bias" and meta["num_items"] == "30"
    assert [i.name for i in session.get_inputs()] == ["user", "candidate", "item_id", "log_pop"]
    known = torch.tensor([1, 7, 30, 12, 30])
    unknown = torch.tensor([0, 31, 99, -3, 0])
    user, cand, lp = torch.randn(5, 16), torch.randn(5, 16), -torch.rand(5) * 8
    feed = {"user": user.numpy(), "candidate": cand.numpy(), "log_pop": lp.numpy()}
    with torch.no_grad():
        want = head(user, cand, torch.full((5,), 4), known, lp).numpy()
        no_bias = head(user, cand, torch.full((5,), 4), torch.zeros(5, dtype=torch.long), lp)
    got = session.run(None, feed | {"item_id": known.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    got = session.run(None, feed | {"item_id": unknown.numpy()})[0]
    np.testing.assert_allclose(got, no_bias.numpy(), rtol=RTOL, atol=ATOL)
    assert np.abs(want - no_bias.numpy()).max() > 1e-2  # the item biases do matter
