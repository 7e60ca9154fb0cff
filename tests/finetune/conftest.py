"""Fixtures of the fine-tuning tests: tiny checkpoints of the tiny data, and grid options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ptum import checkpoint
from ptum.config import FinetuneConfig
from ptum.data.corpus import tokenizer_digest
from ptum.finetune.cells import GridOptions, SplitSpec
from ptum.models.user_model import ModelConfig, UserModel
from ptum.stages.finetune import grid_options

SPLIT = SplitSpec(demo_fractions=(0.8, 0.1, 0.1), ctr_valid_frac=0.1)


@pytest.fixture(scope="session")
def ckpts(tiny_pipeline, tmp_path_factory) -> Path:
    """Randomly initialised hsa and nativectr checkpoints (dim 8) of the tiny data's tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    tokens = np.load(tiny_pipeline / "tokenized" / "tokens.npy")
    for arch in ("hsa", "nativectr"):
        torch.manual_seed(0)
        config = ModelConfig.for_architecture(
            arch,
            vocab_size=int(tokens.max()) + 1,
            max_tokens=tokens.shape[1],
            max_behaviors=20,
            word_dim=8,
            dim=8,
            heads=2,
            head_dim=4,
            attn_hidden=8,
            dropout=0.0,
        )
        meta = {
            "architecture": arch,
            "tokenizer_sha256": tokenizer_digest(tiny_pipeline / "tokenized"),
            "model_config": config.to_dict(),
        }
        checkpoint.save(root / arch, UserModel(config=config), meta)
    return root


@pytest.fixture
def options(tiny_pipeline, ckpts, tmp_path) -> Callable[..., GridOptions]:
    """options(cfg, cache_dir=tmp_path/"cache"): the grid options of the finetune section `cfg`
    on the tiny data and checkpoints, as the finetune stage builds them."""

    def make(cfg: FinetuneConfig, cache_dir: Path | None = None) -> GridOptions:
        return grid_options(
            cfg,
            split=SPLIT,
            prepared=tiny_pipeline / "prepared",
            tokenized=tiny_pipeline / "tokenized",
            max_behaviors=20,
            ckpt_root=ckpts,
            cache_dir=cache_dir or tmp_path / "cache",
        )

    return make
