"""Serving heads as ONNX graphs: the CTR head and one demographic head per label.

ctr_head.onnx      user (B, D), candidate (B, D) -> score (B,)
demo_<label>.onnx  user (B, D) -> probs (B, C); metadata "classes" names the classes
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ptum.heads import CtrHead, DemoHead, _check_label
from ptum.serving.fold import ATTENTION_OPSET
from ptum.serving.onnx_io import check_dims, to_onnx
from ptum.serving.parity import parity

# Columns `ptum embed` writes besides <label> and <label>_probs: a label must not overwrite them.
EMBED_COLUMNS = ("user_id", "vector")


def export_head(
    head: nn.Module,
    out_path: Path,
    *,
    dim: int,
    opset: int = ATTENTION_OPSET,
    meta: Mapping[str, str] | None = None,
    example_batch: int = 3,
) -> float:
    """Export a `CtrHead` or `DemoHead` with a dynamic batch; returns the parity check's diff.

    CtrHead: inputs user (B, dim), candidate (B, dim) -> score (B,). DemoHead: user (B, dim) ->
    probs (B, C); `meta["classes"]` (a JSON list) names the classes, default "0".."C-1".
    """
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2: a size-1 example dim becomes static")
    meta = dict(meta or {})
    batch = torch.export.Dim("batch")
    g = torch.Generator().manual_seed(0)
    if isinstance(head, DemoHead):
        if head.dim != dim:
            raise ValueError(f"the head takes {head.dim}-d users, the model makes {dim}-d")
        names, outputs = ["user"], ["probs"]
        meta.setdefault("classes", json.dumps([str(c) for c in range(head.classes)]))
    elif isinstance(head, CtrHead):
        names, outputs = ["user", "candidate"], ["score"]
    else:
        raise TypeError(f"export_head expects a CtrHead or DemoHead, got {type(head).__name__}")

    def inputs(b: int) -> dict[str, Tensor]:
        return {n: torch.randn(b, dim, generator=g) for n in names}

    ex = inputs(example_batch)
    to_onnx(
        head,
        tuple(ex.values()),
        out_path,
        input_names=names,
        output_names=outputs,
        dynamic_shapes={n: {0: batch} for n in names},
        opset=opset,
        meta=meta,
    )
    check_dims(out_path, {n: [None, dim] for n in names})
    return max(parity(out_path, head, inputs(b)) for b in (1, example_batch + 4))


def check_label(label: str) -> None:
    """Refuse a demographic label that cannot name demo_<label>.onnx (the name check of
    `ptum.heads.save_demo_head`) or that would overwrite a column of `ptum embed`'s output."""
    try:
        _check_label(label)
    except ValueError as e:
        raise ValueError(
            f"cannot export demographic head {label!r}: {e}; rename that label column in the "
            "source data"
        ) from None
    if label in EMBED_COLUMNS or label.endswith("_probs"):
        raise ValueError(
            f"cannot export demographic head {label!r}: `ptum embed` writes the columns "
            f"{', '.join(EMBED_COLUMNS)} and <label>_probs; rename that label column in the "
            "source data"
        )
