"""Parity of an export with PyTorch: random serving-shaped inputs and the onnxruntime check.

Each export is checked against PyTorch at a shape different from the example (trace) shape,
which catches specializations even where the graph's input dims look symbolic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from ptum.models.layers import NUM_GAP_BUCKETS
from ptum.models.user_model import ModelConfig

# Tolerance of the post-export parity check (float32, different kernel orders).
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-5


def example_inputs(
    config: ModelConfig, lengths: list[int], *, behaviors: int, tokens: int, seed: int = 0
) -> dict[str, Tensor]:
    """Random right-padded users shaped like serving inputs (lengths = real behaviors each).

    Returns tokens (B, L, T), token_mask (B, L, T), mask (B, L), positions (B, L),
    gap_buckets (B, L); padded behaviors are the all-pad item. For the hybrid encoder also
    item_ids (B, L): pre-training item ids in [1, num_items), 0 for padded behaviors.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = config.num_items if config.behavior_encoder == "id" else config.vocab_size
    B = len(lengths)
    n = torch.tensor(lengths, dtype=torch.long)[:, None]  # (B, 1)
    i = torch.arange(behaviors)[None, :]  # (1, L)
    mask = i < n  # (B, L)
    tok_len = torch.randint(1, tokens + 1, (B, behaviors), generator=g) * mask  # (B, L)
    token_mask = torch.arange(tokens) < tok_len[..., None]  # (B, L, T)
    ids = torch.randint(1, max(vocab, 2), (B, behaviors, tokens), generator=g)
    out = dict(
        tokens=ids * token_mask,
        token_mask=token_mask,
        mask=mask,
        positions=torch.where(mask, n - 1 - i, 0),
        gap_buckets=torch.randint(0, NUM_GAP_BUCKETS, (B, behaviors), generator=g) * mask,
    )
    if config.behavior_encoder == "hybrid":
        items = torch.randint(1, max(config.num_items, 2), (B, behaviors), generator=g)
        out["item_ids"] = items * mask
    return out


def session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session (the provider serving uses)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def parity(
    path: Path, fn: Any, inputs: dict[str, Tensor], feed: dict[str, Tensor] | None = None
) -> float:
    """Max |onnxruntime(feed) - fn(**inputs)|, feed defaulting to inputs; raises if outside the
    tolerance."""
    feed = inputs if feed is None else feed
    got = session(path).run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        want = fn(**inputs).numpy()
    try:
        np.testing.assert_allclose(got, want, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    except AssertionError as e:
        raise RuntimeError(
            f"{path.name}: onnxruntime disagrees with PyTorch at input shapes "
            f"{ {k: tuple(v.shape) for k, v in inputs.items()} }: {e}"
        ) from None
    return float(np.abs(got - want).max()) if got.size else 0.0
