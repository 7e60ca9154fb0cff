"""Serving heads as ONNX graphs: the CTR head and one demographic head per label.

ctr_head.onnx      dot head (`CtrHead`): user (B, D), candidate (B, D) -> score (B,)
                   bias head (`BiasedCtrHead`, finetune.ctr_scoring: bias): user (B, D),
                   candidate (B, D), item_id (B,) int64, log_pop (B,) float32 -> score (B,)
demo_<label>.onnx  user (B, D) -> probs (B, C); metadata "classes" names the classes

The bias head is served for new users and any item: its per-item bias table goes into the graph
(`ServingBiasedCtrHead`), an item id it does not know (0, or outside 1..num_items) gets no learned
bias and falls back to the popularity term alone, exactly as an item without training
impressions does in PyTorch. The per-user offset exists only for the users that had training
impressions, so it is not served: the user side is the linear function of the user vector.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ptum.heads import BiasedCtrHead, CtrHead, DemoHead, _check_label
from ptum.serving.fold import ATTENTION_OPSET
from ptum.serving.onnx_io import check_dims, to_onnx
from ptum.serving.parity import parity

BIAS_ITEM_RULE = (
    "item_id: the prepare stage's item_id (data/prepared/items.parquet) of the candidate, "
    "1..num_items; 0 or any other id = an item the head does not know (popularity term only)"
)
LOG_POP_RULE = (
    "log_pop: log((count + 1) / (total + n_items)) of the candidate among the behaviors before "
    "scoring (ptum.heads.log_popularity)"
)

# Columns `ptum embed` writes besides <label> and <label>_probs: a label must not overwrite them.
EMBED_COLUMNS = ("user_id", "vector")


class ServingBiasedCtrHead(nn.Module):
    """A trained `BiasedCtrHead` as served: no per-user offset, unknown item ids get no bias.

    logit = (W u) . c + (w . u + b) + item_bias[item_id if 1 <= item_id <= num_items else 0] * known
            + a * log_pop
    """

    def __init__(self, head: BiasedCtrHead) -> None:
        super().__init__()
        self.proj, self.user_linear, self.item_bias = head.proj, head.user_linear, head.item_bias
        self.pop_weight = head.pop_weight
        self.num_items = head.item_bias.num_embeddings - 1

    def forward(self, user: Tensor, candidate: Tensor, item_id: Tensor, log_pop: Tensor) -> Tensor:
        """(B, D), (B, D), (B,) int64, (B,) float -> (B,) click probability."""
        known = (item_id >= 1) & (item_id <= self.num_items)  # (B,)
        bias = self.item_bias(torch.where(known, item_id, 0)).squeeze(-1) * known  # (B,)
        dot = (self.proj(user) * candidate).sum(dim=-1)  # (B,)
        logit = dot + self.user_linear(user).squeeze(-1) + bias + self.pop_weight * log_pop
        return torch.sigmoid(logit)


def _head_spec(
    head: nn.Module, dim: int, meta: dict[str, str], g: torch.Generator
) -> tuple[nn.Module, list[str], list[str], Callable[[int], dict[str, Tensor]]]:
    """(module to export, input names, output names, inputs(b) -> random inputs of batch b);
    adds the head's keys to `meta`."""
    if isinstance(head, DemoHead):
        if head.dim != dim:
            raise ValueError(f"the head takes {head.dim}-d users, the model makes {dim}-d")
        meta.setdefault("classes", json.dumps([str(c) for c in range(head.classes)]))
        names, outputs = ["user"], ["probs"]
    elif isinstance(head, CtrHead):
        names, outputs = ["user", "candidate"], ["score"]
        meta["ctr_scoring"] = "dot"
    elif isinstance(head, BiasedCtrHead):
        served = ServingBiasedCtrHead(head).eval()
        n = served.num_items
        meta |= {"ctr_scoring": "bias", "num_items": str(n)}
        meta |= {"item_id_rule": BIAS_ITEM_RULE, "log_pop_rule": LOG_POP_RULE}

        def bias_inputs(b: int) -> dict[str, Tensor]:
            return {
                "user": torch.randn(b, dim, generator=g),
                "candidate": torch.randn(b, dim, generator=g),
                "item_id": torch.randint(0, n + 3, (b,), generator=g),  # unknown ids too
                "log_pop": -torch.rand(b, generator=g) * 10,
            }

        return served, ["user", "candidate", "item_id", "log_pop"], ["score"], bias_inputs
    else:
        raise TypeError(
            f"export_head expects a CtrHead, BiasedCtrHead or DemoHead, got {type(head).__name__}"
        )

    def vector_inputs(b: int) -> dict[str, Tensor]:
        return {name: torch.randn(b, dim, generator=g) for name in names}

    return head, names, outputs, vector_inputs


def export_head(
    head: nn.Module,
    out_path: Path,
    *,
    dim: int,
    opset: int = ATTENTION_OPSET,
    meta: Mapping[str, str] | None = None,
    example_batch: int = 3,
) -> float:
    """Export a `CtrHead`, `BiasedCtrHead` or `DemoHead` with a dynamic batch; returns the
    parity check's diff.

    CtrHead: inputs user (B, dim), candidate (B, dim) -> score (B,). BiasedCtrHead: also
    item_id (B,), log_pop (B,) (`ServingBiasedCtrHead`). DemoHead: user (B, dim) -> probs (B, C);
    `meta["classes"]` (a JSON list) names the classes, default "0".."C-1".
    """
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2: a size-1 example dim becomes static")
    meta = dict(meta or {})
    batch = torch.export.Dim("batch")
    g = torch.Generator().manual_seed(0)
    module, names, outputs, inputs = _head_spec(head, dim, meta, g)
    ex = inputs(example_batch)
    to_onnx(
        module,
        tuple(ex.values()),
        out_path,
        input_names=names,
        output_names=outputs,
        dynamic_shapes={n: {0: batch} for n in names},
        opset=opset,
        meta=meta,
    )
    check_dims(out_path, {n: [None, dim] if ex[n].dim() == 2 else [None] for n in names})
    return max(parity(out_path, module, inputs(b)) for b in (1, example_batch + 4))


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
