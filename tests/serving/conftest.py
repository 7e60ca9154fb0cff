"""Fixtures: tiny user models on the tiny pipeline's tokenizer, saved as checkpoints, exported.

Exports are slow (torch.export: several seconds each), so each architecture is exported once per
session and shared by the parity and embed tests. "ARCH+hybrid" is ARCH with the hybrid behavior
encoder, its id vocabulary built from the tiny pipeline's pre-training users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ptum import checkpoint
from ptum.config import ExportConfig
from ptum.data.corpus import load_corpus
from ptum.heads import DemoHead, save_demo_head
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.setup import corpus_id_vocab
from ptum.serving.export import export

TINY = dict(word_dim=16, dim=16, heads=2, head_dim=8, attn_hidden=16, layers=1, dropout=0.2)
MAX_BEHAVIORS = 20  # the tiny pipeline's prepare.max_behaviors
AGE_CLASSES = ["<25", "25-35", "35-45", ">=45"]


@dataclass(frozen=True)
class Exported:
    checkpoint: Path
    onnx: Path
    report: dict
    model: UserModel  # eval mode, reloaded from the checkpoint


@pytest.fixture(scope="session")
def exported(tiny_pipeline: Path, tmp_path_factory):
    """exported(arch) -> Exported; the hsa checkpoint also carries an `age` demographic head."""
    cache: dict[str, Exported] = {}
    tok = tiny_pipeline / "tokenized"
    report = json.loads((tok / "report.json").read_text())

    def make(arch: str) -> Exported:
        if arch not in cache:
            name, _, behavior = arch.partition("+")
            vocab, hybrid = None, {}
            if behavior == "hybrid":
                train = load_corpus(tiny_pipeline / "prepared", tok, "train", MAX_BEHAVIORS)
                vocab = corpus_id_vocab(tiny_pipeline / "prepared", train, 2)
                hybrid = dict(num_items=train.num_items + 1, id_vocab=vocab.size)
            cfg = ModelConfig.for_architecture(
                name,
                behavior_encoder=behavior,
                vocab_size=report["vocab_size"],
                max_tokens=report["max_tokens"],
                max_behaviors=MAX_BEHAVIORS,
                **TINY,
                **hybrid,
            )
            torch.manual_seed(0)
            model = UserModel(config=cfg)
            if vocab is not None:
                model.behavior_encoder.set_id_index(vocab.id_index())
                # Untrained id rows are ~0.02: scale them up so the id part shows in parity.
                with torch.no_grad():
                    model.behavior_encoder.ids.weight.mul_(50.0)
            root = tmp_path_factory.mktemp(f"export_{name}_{behavior or 'own'}")
            checkpoint.save(
                root / "ckpt",
                model,
                {
                    "architecture": name,
                    "tokenizer_sha256": report["spm_sha256"],
                    "model_config": cfg.to_dict(),
                },
                id_vocab=vocab,
            )
            if arch == "hsa":
                head = DemoHead(dim=cfg.dim, hidden=8, classes=len(AGE_CLASSES))
                save_demo_head(root / "ckpt", "age", head, AGE_CLASSES)
            rep = export(
                root / "ckpt",
                root / "onnx",
                opset=ExportConfig().opset,  # the default: fused attention nodes
                spm_model=tok / "spm.model",
                data_version="tiny-test",
                params={"pretrain": {"model": TINY}},
            )
            model = checkpoint.load(root / "ckpt").model.eval()
            cache[arch] = Exported(root / "ckpt", root / "onnx", rep, model)
        return cache[arch]

    return make
