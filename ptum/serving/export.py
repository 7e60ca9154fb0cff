"""Export a pre-trained / fine-tuned user model to ONNX for torch-free serving (`ptum embed`).

Writes into `out_dir`:
    user_model.onnx        tokens (B, L, T) int64, token_mask (B, L, T) bool, mask (B, L) bool,
                           positions (B, L) int64, gap_buckets (B, L) int64 -> user (B, D)
    behavior_encoder.onnx  tokens (N, T) int64, token_mask (N, T) bool -> behavior (N, D)
    ctr_head.onnx          user (B, D), candidate (B, D) -> score (B,) = sigmoid(user . candidate);
                           a bias head also takes item_id (B,), log_pop (B,) (ptum.serving.heads)
    demo_<label>.onnx      user (B, D) -> probs (B, C), one per fine-tuned demographic head
    spm.model              the SentencePiece model the token ids come from
    id_vocab.json          hybrid behavior encoder only: its id vocabulary (texts[i] has id i + 2)
    export.json            what was exported, the dims, the parity check, every file's SHA-256

The hybrid behavior encoder's graphs take one more input, item_ids (B, L) int64 for the user
model and (N,) for the behavior encoder, numbered by the exported id vocabulary: i + 2 for the
text texts[i] of id_vocab.json, 1 (UNKNOWN) for any other text, 0 for padding. Serving has no
other item numbering, so the exported model maps ids through the identity (`serving_model`)
where the trained one maps pre-training item ids through its `id_index`.

What is exported is `ptum.serving.fold.serving_model(model)`; which dims are static and the
metadata every file carries are in `ptum.serving.contract`; each graph is checked against the
model as trained at a shape other than the trace shape (`ptum.serving.parity`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ptum import checkpoint
from ptum.hashing import sha256_file
from ptum.heads import BiasedCtrHead, CtrHead, DemoHead, load_demo_heads
from ptum.io import atomic_dir
from ptum.models.user_model import ModelConfig, UserModel
from ptum.serving.contract import metadata, static_lengths, user_inputs
from ptum.serving.fold import ATTENTION_OPSET, serving_ids, serving_model
from ptum.serving.heads import check_label, export_head
from ptum.serving.onnx_io import check_dims, input_dims, to_onnx
from ptum.serving.parity import example_inputs, parity


@dataclass(frozen=True)
class _Shapes:
    """Trace and check shapes of one export.

    example: inputs the graphs are traced with; check: inputs of the parity check, at another
    batch and, where a dim is dynamic, another L / T. L, T: the dims given to torch.export;
    l_dim, t_dim: the exported size of L / T where static, None where dynamic.
    """

    example: dict[str, Tensor]
    check: dict[str, Tensor]
    L: Any
    T: Any
    l_dim: int | None
    t_dim: int | None


def _shapes(config: ModelConfig, batch: int, behaviors: int, tokens: int) -> _Shapes:
    """Trace at the maximum for static dims, else at the (clamped) example size; check at the
    maximum L / T when the dim is dynamic (unless the example already is the maximum, then one
    less), with lengths that include an empty and a one-behavior user."""
    static_l, static_t = static_lengths(config)
    max_t = 1 if config.behavior_encoder == "id" else config.max_tokens
    if (not static_l and config.max_behaviors < 2) or (not static_t and max_t < 2):
        raise ValueError("dynamic L / T need max_behaviors / max_tokens >= 2")
    ex_l = config.max_behaviors if static_l else min(behaviors, config.max_behaviors)
    ex_t = max_t if static_t else min(tokens, max_t)
    ck_l = ex_l if static_l else (config.max_behaviors if ex_l < config.max_behaviors else ex_l - 1)
    ck_t = ex_t if static_t else (max_t if ex_t < max_t else ex_t - 1)
    lengths = [ex_l - (i % ex_l) for i in range(batch)]  # ex_l, ex_l - 1, ...
    ck_lengths = [ck_l, 0, 1, *[(3 * i) % (ck_l + 1) for i in range(batch + 1)]]
    return _Shapes(
        example=example_inputs(config, lengths, behaviors=ex_l, tokens=ex_t, seed=0),
        check=example_inputs(config, ck_lengths, behaviors=ck_l, tokens=ck_t, seed=1),
        L=torch.export.Dim.STATIC
        if static_l
        else torch.export.Dim("behaviors", min=1, max=config.max_behaviors),
        T=torch.export.Dim.STATIC if static_t else torch.export.Dim("tokens", min=1, max=max_t),
        l_dim=ex_l if static_l else None,
        t_dim=ex_t if static_t else None,
    )


def _export_user_model(
    model: UserModel, served: UserModel, path: Path, s: _Shapes, *, opset: int, meta: dict
) -> float:
    """user_model.onnx from `served`; returns its parity diff against `model`."""
    inputs = user_inputs(model.config)
    batch = torch.export.Dim("batch")
    shapes = {
        k: {0: batch, 1: s.L, 2: s.T} if k.startswith("token") else {0: batch, 1: s.L}
        for k in inputs
    }
    to_onnx(
        served,
        tuple(serving_ids(model, s.example)[k] for k in inputs),
        path,
        input_names=list(inputs),
        output_names=["user"],
        dynamic_shapes=shapes,
        opset=opset,
        meta=meta,
    )
    check_dims(
        path,
        {k: [None, s.l_dim, s.t_dim] if k.startswith("token") else [None, s.l_dim] for k in inputs},
    )
    return parity(path, model, s.check, serving_ids(model, s.check))


def _export_behavior_encoder(
    model: UserModel, served: UserModel, path: Path, s: _Shapes, *, opset: int, meta: dict
) -> float:
    """behavior_encoder.onnx (the user model's inputs flattened to items); returns parity."""
    keys = [k for k in user_inputs(model.config) if k in ("tokens", "token_mask", "item_ids")]
    items = {k: serving_ids(model, s.example)[k].flatten(0, 1) for k in keys}  # (B * L, ...)
    n = torch.export.Dim("items")
    to_onnx(
        served.behavior_encoder,
        tuple(items.values()),
        path,
        input_names=keys,
        output_names=["behavior"],
        dynamic_shapes={k: {0: n, 1: s.T} if k != "item_ids" else {0: n} for k in items},
        opset=opset,
        meta=meta,
    )
    check_dims(path, {k: [None, s.t_dim] if k != "item_ids" else [None] for k in items})
    ck_items = {k: s.check[k].flatten(0, 1) for k in keys}
    return parity(path, model.behavior_encoder, ck_items, serving_ids(model, ck_items))


def _export_heads(
    out: Path,
    ctr_head: CtrHead | BiasedCtrHead | None,
    demo_heads: Mapping[str, tuple[DemoHead, list[str]]],
    *,
    dim: int,
    opset: int,
    meta: dict,
    example_batch: int,
    bar: tqdm,
) -> dict[str, float]:
    """ctr_head.onnx and demo_<label>.onnx in `out`; returns each file stem's parity diff."""
    bar.set_postfix_str("ctr_head")
    diffs = {
        "ctr_head": export_head(
            (ctr_head or CtrHead()).eval(),
            out / "ctr_head.onnx",
            dim=dim,
            opset=opset,
            meta=meta,
            example_batch=example_batch,
        )
    }
    for label, (head, classes) in sorted(demo_heads.items()):
        if len(classes) != head.classes:
            raise ValueError(
                f"demographic head {label!r}: {len(classes)} class names for {head.classes} classes"
            )
        head_meta = meta | {"label": label, "classes": json.dumps([str(c) for c in classes])}
        bar.update(1)
        bar.set_postfix_str(f"demo_{label}")
        diffs[f"demo_{label}"] = export_head(
            head.eval(),
            out / f"demo_{label}.onnx",
            dim=dim,
            opset=opset,
            meta=head_meta,
            example_batch=example_batch,
        )
    bar.update(1)
    return diffs


def _export_graphs(
    model: UserModel,
    served: UserModel,
    out: Path,
    shapes: _Shapes,
    ctr_head: CtrHead | BiasedCtrHead | None,
    demo_heads: Mapping[str, tuple[DemoHead, list[str]]],
    *,
    opset: int,
    meta: dict,
    example_batch: int,
    progress: bool,
) -> dict[str, float]:
    """Every ONNX file into `out`, with a tqdm bar over them; returns each file stem's parity."""
    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, dvc repro).
    bar = tqdm(
        total=3 + len(demo_heads), desc="export", unit="graph", disable=None if progress else True
    )
    with bar:
        bar.set_postfix_str("user_model")
        parity = {
            "user_model": _export_user_model(
                model, served, out / "user_model.onnx", shapes, opset=opset, meta=meta
            )
        }
        bar.update(1)
        bar.set_postfix_str("behavior_encoder")
        parity["behavior_encoder"] = _export_behavior_encoder(
            model, served, out / "behavior_encoder.onnx", shapes, opset=opset, meta=meta
        )
        bar.update(1)
        return parity | _export_heads(
            out,
            ctr_head,
            demo_heads,
            dim=model.config.dim,
            opset=opset,
            meta=meta,
            example_batch=example_batch,
            bar=bar,
        )


def export(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    opset: int = ATTENTION_OPSET,
    spm_model: Path,
    data_version: str,
    params: dict,
    example_batch: int = 3,
    example_behaviors: int = 5,
    example_tokens: int = 7,
    demo_heads: Mapping[str, tuple[DemoHead, list[str]]] | None = None,
    ctr_head: CtrHead | BiasedCtrHead | None = None,
    fold: bool = True,
    progress: bool = True,
) -> dict:
    """Export the checkpoint's user model, behavior encoder and heads to ONNX in `out_dir`.

    Args:
        checkpoint_dir: a `ptum.checkpoint` directory (the model is rebuilt from its config).
        out_dir: replaced atomically (`ptum.io.atomic_dir`) once everything is written and
            checked; a failed export leaves the previous one in place.
        opset: ONNX opset of every graph.
        spm_model: the SentencePiece model the checkpoint was trained with (hash-checked, copied).
        data_version: stored in metadata (e.g. the checkpoint's data_sha256 or a DVC revision).
        params: stored in metadata as JSON (the params the model was built with).
        example_batch, example_behaviors, example_tokens: trace shapes of the dynamic dims; each
            must be >= 2 (a size-1 dim would be fixed in the graph).
        demo_heads: label -> (DemoHead, class names); default: the `demo_<label>` heads saved in
            `checkpoint_dir` (`ptum.heads.save_demo_head`).
        ctr_head: a fine-tuned CtrHead or BiasedCtrHead (`ptum.serving.heads`); default the
            paper's bare sigmoid(user . candidate).
        fold: export `serving_model(model)` (linear maps multiplied out, `FoldedSelfAttnEncoder`)
            rather than the model as trained (fused attention still applies at opset >= 23);
            parity is checked against the model as trained either way.
        progress: a tqdm bar over the graphs on stderr (only when stderr is a terminal).

    Returns:
        The export report: files and their SHA-256, input dims, parity diffs (out_dir/export.json
        holds it plus the metadata). Steps: `_inputs`, `_metadata`, `_shapes`, `_write`.
    """
    sizes = (example_batch, example_behaviors, example_tokens)
    loaded, spm_sha, demo_heads = _inputs(checkpoint_dir, spm_model, demo_heads, sizes)
    model = loaded.model.eval()
    meta = _metadata(loaded, spm_sha, data_version=data_version, params=params, opset=opset)
    shapes = _shapes(model.config, example_batch, example_behaviors, example_tokens)
    served = serving_model(model, fold=fold, fused_attention=opset >= ATTENTION_OPSET)
    graphs = partial(
        _export_graphs,
        model,
        served,
        shapes=shapes,
        ctr_head=ctr_head,
        demo_heads=demo_heads,
        opset=opset,
        meta=meta,
        example_batch=example_batch,
        progress=progress,
    )
    return _write(out_dir, graphs, loaded, spm_model, meta, opset=opset, fold=fold)


def _inputs(
    checkpoint_dir: Path,
    spm_model: Path,
    demo_heads: Mapping[str, tuple[DemoHead, list[str]]] | None,
    example_sizes: tuple[int, ...],
) -> tuple[checkpoint.Loaded, str, Mapping[str, tuple[DemoHead, list[str]]]]:
    """The checkpoint (checked against the tokenizer), the tokenizer's SHA-256 and the demo heads
    (default: those saved in the checkpoint), each checked before any work is done."""
    if min(example_sizes) < 2:
        raise ValueError("example sizes must be >= 2: a size-1 example dim becomes static")
    spm_sha = sha256_file(spm_model)
    loaded = checkpoint.load(checkpoint_dir, tokenizer_sha256=spm_sha)
    if demo_heads is None:
        demo_heads = load_demo_heads(checkpoint_dir)
    for label in demo_heads:  # each becomes a file name
        check_label(label)
    return loaded, spm_sha, demo_heads


def _write(
    out_dir: Path,
    graphs: Callable[[Path], dict],
    loaded: checkpoint.Loaded,
    spm_model: Path,
    meta: dict[str, str],
    *,
    opset: int,
    fold: bool,
) -> dict:
    """The graphs (`graphs(directory)` returns their parity), spm.model, id_vocab.json and
    export.json, written into a scratch directory that replaces `out_dir` once complete;
    returns the export report."""
    with atomic_dir(out_dir, marker="export.json") as tmp:
        parity = graphs(tmp)
        shutil.copyfile(spm_model, tmp / "spm.model")
        if loaded.id_vocab is not None:
            (tmp / "id_vocab.json").write_bytes(loaded.id_vocab.to_json())
        report = _report(tmp, meta, opset=opset, fold=fold, parity=parity)
        full = report | {"metadata": meta}
        (tmp / "export.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    return report


def _metadata(
    loaded: checkpoint.Loaded, spm_sha: str, *, data_version: str, params: dict, opset: int
) -> dict[str, str]:
    """The metadata every exported file carries (`ptum.serving.contract.metadata`) for the
    loaded checkpoint; its architecture is the checkpoint's, else encoder+encoder."""
    config = loaded.model.config
    arch = str(loaded.meta.get("architecture", f"{config.behavior_encoder}+{config.user_encoder}"))
    return metadata(
        config,
        architecture=arch,
        spm_sha256=spm_sha,
        data_version=data_version,
        params=params,
        opset=opset,
        id_vocab_sha256=loaded.id_vocab.sha256 if loaded.id_vocab is not None else "",
    )


def _report(
    out: Path, meta: dict[str, str], *, opset: int, fold: bool, parity: dict[str, float]
) -> dict[str, Any]:
    """The export report of the files written in `out`: their SHA-256 and input dims, and
    each graph's parity diff."""
    return {
        "architecture": meta["architecture"],
        "opset": opset,
        "exporter": "dynamo",
        "folded": fold,
        "behaviors_dim": meta["behaviors_dim"],
        "tokens_dim": meta["tokens_dim"],
        "files": {p.name: sha256_file(p) for p in sorted(out.iterdir())},
        "parity": parity,
        "input_dims": {
            p.stem: {k: "(" + ", ".join(map(str, v)) + ")" for k, v in input_dims(p).items()}
            for p in sorted(out.glob("*.onnx"))
        },
    }
