"""Export a pre-trained / fine-tuned user model to ONNX for torch-free serving (`ptum.embed`).

Writes into `out_dir`:
    user_model.onnx        tokens (B, L, T) int64, token_mask (B, L, T) bool, mask (B, L) bool,
                           positions (B, L) int64, gap_buckets (B, L) int64 -> user (B, D)
    behavior_encoder.onnx  tokens (N, T) int64, token_mask (N, T) bool -> behavior (N, D)
    ctr_head.onnx          user (B, D), candidate (B, D) -> score (B,) = sigmoid(user . candidate)
    demo_<label>.onnx      user (B, D) -> probs (B, C), one per fine-tuned demographic head
    spm.model              the SentencePiece model the token ids come from
    id_vocab.json          hybrid behavior encoder only: its id vocabulary (texts[i] has id i + 2)
    export.json            what was exported, the dims, the parity check, every file's SHA-256

The hybrid behavior encoder's graphs take one more input, item_ids (B, L) int64 for the user
model and (N,) for the behavior encoder, numbered by the exported id vocabulary: i + 2 for the
text texts[i] of id_vocab.json, 1 (UNKNOWN) for any other text, 0 for padding. Serving has no
other item numbering, so the exported model maps ids through the identity (`serving_model`)
where the trained one maps pre-training item ids through its `id_index`.

Every ONNX file carries in its metadata_props what a consumer needs to build inputs (see
`metadata`): tokenizer hash, max_behaviors / max_tokens, the time-gap bucketing rule, pad id,
output dim, which of L / T are static, architecture, params and data version.

All graphs come from the torch.export-based exporter (`torch.onnx.export(dynamo=True)`); the
legacy TorchScript exporter was not needed for any architecture. Batch is always dynamic. L and
T are dynamic too, except over the sequence an LSTM/GRU runs on (`static_lengths`): torch.export
specializes recurrent sequence lengths to the example's, so those dims are exported at their
maximum and serving pads to it (padding never changes a user's vector). Each export is checked
against PyTorch at a shape different from the example shape, which catches such
specializations even where the graph's input dims look symbolic.

What is exported is `serving_model(model)`: the same function, with the self-attention behavior
encoder's consecutive linear maps multiplied out (`FoldedSelfAttnEncoder`, ~5x fewer FLOPs per
paper-sized user) and, at opset >= 23 (the default), every self-attention as one ONNX
`Attention` node on (N, T, heads * head_dim) rows (`attention_3d`); the parity check compares it
with the model as trained. Below opset 23 the same function is exported without Attention.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxscript import opset23
from torch import Tensor, nn

from ptum import __version__, checkpoint
from ptum.hashing import sha256_file
from ptum.heads import CtrHead, DemoHead, load_demo_heads
from ptum.models.behavior import (
    PAD_ROW,
    UNKNOWN_ROW,
    HybridBehaviorEncoder,
    SelfAttnBehaviorEncoder,
)
from ptum.models.layers import NUM_GAP_BUCKETS, MultiHeadSelfAttention
from ptum.models.user_model import ModelConfig, UserModel
from ptum.tokenize import PAD_ID

# From this opset on the folded encoder's attention is one ONNX `Attention` node on (N, T, H*hd)
# inputs: no head transposes, mask add and softmax fused (~16% off a CPU-default user's batch-1
# latency in onnxruntime, benchmarks/serve.py).
ATTENTION_OPSET = 23

USER_INPUTS = ("tokens", "token_mask", "mask", "positions", "gap_buckets")
ID_RULE = (
    f"item_ids: i + 2 for the text texts[i] of id_vocab.json, {UNKNOWN_ROW} for any other text "
    f"(unknown), {PAD_ROW} for padded behaviors"
)
GAP_BUCKET_RULE = (
    "floor(log2(gap_seconds+1)) clamped to [0,31]; gap_seconds = seconds since the user's "
    "previous behavior (0 for the first), computed before keeping the last max_behaviors"
)
# Tolerance of the post-export parity check (float32, different kernel orders).
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-5


def user_inputs(config: ModelConfig) -> tuple[str, ...]:
    """Input names of user_model.onnx: USER_INPUTS, plus item_ids for the hybrid encoder."""
    return USER_INPUTS + (("item_ids",) if config.behavior_encoder == "hybrid" else ())


def static_lengths(config: ModelConfig) -> tuple[bool, bool]:
    """(L static, T static): which sequence dims must be exported (and served) at their maximum.

    T: an LSTM runs over tokens ("lstm" behavior encoder, or a hybrid wrapping it); the "id"
    encoder's T is its single item-id column. L: an LSTM (HAN) or GRU (GRU4Rec) runs over
    behaviors. Measured on torch 2.13: the LSTM graphs export with symbolic dims but fail in
    onnxruntime at any other length (an Expand keeps the example length); the GRU graph runs but
    its value_info records the example length, so it is kept static as well rather than trusted.
    """
    text = config.hybrid_text if config.behavior_encoder == "hybrid" else config.behavior_encoder
    return config.user_encoder in ("han", "gru4rec"), text in ("lstm", "id")


file_sha256 = sha256_file  # kept as this module's public name


def metadata(
    config: ModelConfig,
    *,
    architecture: str,
    spm_sha256: str,
    data_version: str,
    params: Mapping[str, Any],
    opset: int,
    id_vocab_sha256: str = "",
) -> dict[str, str]:
    """The metadata_props stored in every exported ONNX model (all values are strings).

    id_vocab_sha256: the hybrid encoder's exported id_vocab.json (adds it and `item_id_rule`).
    """
    static_l, static_t = static_lengths(config)
    hybrid = (
        {"id_vocab_sha256": id_vocab_sha256, "item_id_rule": ID_RULE} if id_vocab_sha256 else {}
    )
    return hybrid | {
        "ptum_version": __version__,
        "architecture": architecture,
        "behavior_encoder": config.behavior_encoder,
        "user_encoder": config.user_encoder,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "spm_sha256": spm_sha256,
        "max_behaviors": str(config.max_behaviors),
        "max_tokens": str(1 if config.behavior_encoder == "id" else config.max_tokens),
        "behaviors_dim": "static" if static_l else "dynamic",
        "tokens_dim": "static" if static_t else "dynamic",
        "pad_id": str(PAD_ID),
        "output_dim": str(config.dim),
        "gap_buckets": str(NUM_GAP_BUCKETS),
        "gap_bucket_rule": GAP_BUCKET_RULE,
        "positions_rule": "recency rank: len - 1 - i for real behavior i (0 = most recent), "
        "0 for pads; behaviors right-padded, oldest first",
        "token_rule": "SentencePiece ids of the stripped text, first max_tokens kept, "
        "right-padded with pad_id; token_mask = tokens != pad_id",
        "params": json.dumps(params, sort_keys=True, default=str),
        "data_version": data_version,
        "opset": str(opset),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and progress logs (they drown a CLI run)."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._dynamo",
            "torch.fx.experimental.symbolic_shapes",
        )
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _to_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, Any]],
    opset: int,
    meta: Mapping[str, str],
) -> None:
    """torch.onnx.export (dynamo) + metadata_props + onnx.checker, into one self-contained file."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            args,
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            external_data=False,
            custom_translation_table=ONNX_TRANSLATIONS,
            verbose=False,
        )
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def input_dims(path: Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: an int where static, the symbol's name where dynamic."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def _check_dims(path: Path, expected: dict[str, list[int | None]]) -> None:
    """Raise unless each input dim is symbolic where `expected` has None, else that int.

    A size-1 example dim, or a specialization inside the model, silently fixes a dim.
    """
    got = input_dims(path)
    for name, want in expected.items():
        dims = got[name]
        ok = len(dims) == len(want) and all(
            isinstance(d, str) if w is None else d == w for d, w in zip(dims, want)
        )
        if not ok:
            raise RuntimeError(
                f"{path.name}: input {name} has dims {dims}, expected "
                f"{['dynamic' if w is None else w for w in want]}"
            )


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


def serving_ids(model: UserModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """`inputs` of the trained model as the exported graphs take them: a hybrid model's
    pre-training item_ids become ids of the exported vocabulary (its `id_index` rows)."""
    if "item_ids" not in inputs:
        return inputs
    return inputs | {"item_ids": model.behavior_encoder.id_index[inputs["item_ids"]]}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _parity(
    path: Path, fn: Any, inputs: dict[str, Tensor], feed: dict[str, Tensor] | None = None
) -> float:
    """Max |onnxruntime(feed) - fn(**inputs)|, feed defaulting to inputs; raises if outside the
    tolerance."""
    feed = inputs if feed is None else feed
    got = _session(path).run(None, {k: v.numpy() for k, v in feed.items()})[0]
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


@torch.library.custom_op("ptum::attention_3d", mutates_args=())
def attention_3d(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, heads: int, scale: float) -> Tensor:
    """Scaled dot-product attention (softmax(scale * q k^T) v per head) on head-interleaved rows.

    q, k, v: (N, T, H * hd) float; mask: (N, 1, T, T) bool, True where a query may attend to a
    key, every row with at least one True. Returns (N, T, H * hd). Exported as one ONNX
    `Attention` node (opset >= 23, `q_num_heads`), which takes this layout directly.
    """
    N, T, C = q.shape

    def split(x: Tensor) -> Tensor:
        return x.view(N, T, heads, C // heads).transpose(1, 2)  # (N, H, T, hd)

    y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, scale=scale)
    return y.transpose(1, 2).reshape(N, T, C)


@attention_3d.register_fake
def _attention_3d_fake(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, heads: int, scale: float
) -> Tensor:
    return torch.empty_like(q)


def _attention_3d_onnx(q, k, v, mask, heads: int, scale: float):  # onnxscript values -> value
    return opset23.Attention(q, k, v, mask, q_num_heads=heads, kv_num_heads=heads, scale=scale)[0]


ONNX_TRANSLATIONS = {torch.ops.ptum.attention_3d.default: _attention_3d_onnx}


def _key_mask(mask: Tensor) -> Tensor:
    """(N, T) bool -> (N, T) bool: the keys each query may attend to, as in
    `MultiHeadSelfAttention`: the real positions, or the first one in a row with none."""
    first = torch.arange(mask.shape[-1], device=mask.device) == 0  # (T,)
    return mask | (~mask.any(dim=-1, keepdim=True) & first)


class FoldedSelfAttnEncoder(nn.Module):
    """Serving twin of an eval-mode `SelfAttnBehaviorEncoder`: the same function, ~5x fewer FLOPs.

    Linear maps that follow each other with nothing non-linear between are multiplied out once,
    in float64, when the module is built (eval only: dropout sits between them in training):

    - word + position embedding -> qkv projection: qkv(words[t] + positions[i]) =
      (words @ Wqkv^T)[t] + (positions @ Wqkv^T + b)[i], so the projection becomes two table
      lookups (vocab x 3 * heads * head_dim); 1/sqrt(head_dim) is folded into the q columns.
    - attention output projection -> pooling: the pool's scores need proj(out(y)) =
      (Wp Wo) y + (Wp bo + bp), and the pooled vector sum_i w_i out(y_i) = Wo (sum_i w_i y_i) +
      bo sum_i w_i, so `out` runs on one pooled row per item instead of on every token, and is
      folded into the final projection.

    For the paper sizes (word_dim 300, 16 x 16 heads) this removes ~80% of a user's FLOPs; the
    qkv tables cost vocab x 3 * heads * head_dim floats instead of vocab x word_dim. Masking is
    that of `MultiHeadSelfAttention` and `AdditiveAttention` (a key-less row attends to its
    first token, an empty row pools to zero), with the key mask added as a finite bias.

    With `fused_attention` the attention runs as `attention_3d` (one ONNX `Attention` node when
    exported at opset >= ATTENTION_OPSET) instead of matmul / mask add / softmax / matmul.
    """

    def __init__(self, enc: SelfAttnBehaviorEncoder, *, fused_attention: bool = False) -> None:
        super().__init__()
        attn, pool = enc.attn, enc.pool
        H, hd = attn.heads, attn.head_dim
        self.heads, self.head_dim = H, hd
        self.fused_attention = fused_attention
        f64 = {"dtype": torch.float64}
        with torch.no_grad():
            w_qkv, b_qkv = attn.qkv.weight.to(**f64), attn.qkv.bias.to(**f64)  # (3Hhd, word_dim)
            words = enc.words.weight.to(**f64) @ w_qkv.T  # (V, 3Hhd)
            pos = enc.positions.weight.to(**f64) @ w_qkv.T + b_qkv  # (max_tokens, 3Hhd)
            scale = torch.tensor([hd**-0.5, 1.0, 1.0], **f64).repeat_interleave(H * hd)
            words, pos = words * scale, pos * scale
            w_out, b_out = attn.out.weight.to(**f64), attn.out.bias.to(**f64)  # (Hhd, Hhd)
            w_pool, b_pool = pool.proj.weight.to(**f64), pool.proj.bias.to(**f64)
            w_proj, b_proj = enc.proj.weight.to(**f64), enc.proj.bias.to(**f64)
            # float32; one lookup gives a token's q, k and v in every head at once (a lookup per
            # head or per q / k / v gathers many short rows, which onnxruntime does slowly).
            self.register_buffer("words_qkv", words.float())  # (V, 3Hhd)
            self.register_buffer("pos_qkv", pos.float())  # (max_tokens, 3Hhd)
            self.register_buffer("score_w", (w_pool @ w_out).T.float().contiguous())  # (Hhd, A)
            self.register_buffer("score_b", (w_pool @ b_out + b_pool).float())  # (A,)
            # (A, 1), not (A,): onnxruntime runs a matrix-vector MatMul ~10x slower.
            self.register_buffer("query", pool.query.weight.T.float().contiguous())  # (A, 1)
            self.register_buffer("out_w", (w_proj @ w_out).T.float().contiguous())  # (Hhd, D)
            self.register_buffer("out_b", (w_proj @ b_out).float())  # (D,)
            self.register_buffer("proj_b", b_proj.float())  # (D,)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """(N, T) long, (N, T) bool -> (N, out_dim), as `SelfAttnBehaviorEncoder.forward`."""
        N, T = tokens.shape
        H, hd = self.heads, self.head_dim
        qkv = F.embedding(tokens, self.words_qkv) + self.pos_qkv[:T]  # (N, T, 3Hhd)
        keys = _key_mask(token_mask)  # (N, T)
        if self.fused_attention:
            q, k, v = qkv.split(H * hd, dim=-1)  # (N, T, Hhd) each
            y = attention_3d(q, k, v, keys[:, None, None, :].expand(N, 1, T, T), H, 1.0)
        else:
            q, k, v = qkv.view(N, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, hd)
            bias = torch.zeros_like(keys, dtype=q.dtype)
            bias = bias.masked_fill(~keys, torch.finfo(q.dtype).min)
            att = torch.softmax(q @ k.transpose(-1, -2) + bias[:, None, None, :], dim=-1)
            y = (att @ v).transpose(1, 2).reshape(N, T, H * hd)  # (N, T, Hhd)
        scores = (torch.tanh(y @ self.score_w + self.score_b) @ self.query).squeeze(-1)  # (N, T)
        scores = scores.masked_fill(~token_mask, torch.finfo(scores.dtype).min)
        w = torch.softmax(scores, dim=-1) * token_mask  # (N, T)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        z = torch.einsum("nt,ntd->nd", w, y)  # (N, Hhd)
        return z @ self.out_w + w.sum(dim=-1, keepdim=True) * self.out_b + self.proj_b


class FusedSelfAttention(nn.Module):
    """Serving twin of an eval-mode `MultiHeadSelfAttention`, its attention as `attention_3d`.

    The same function and weights; exported at opset >= ATTENTION_OPSET it is one ONNX
    `Attention` node with an unbroadcast (B, 1, L, L) mask (onnxruntime rejects the (B, 1, 1, L)
    mask that `F.scaled_dot_product_attention` exports to).
    """

    def __init__(self, attn: MultiHeadSelfAttention) -> None:
        super().__init__()
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.qkv, self.out = attn.qkv, attn.out

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, dim) float, (B, L) bool -> (B, L, out_dim), as `MultiHeadSelfAttention`."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split(self.heads * self.head_dim, dim=-1)  # (B, L, Hhd) each
        keys = _key_mask(mask)  # (B, L)
        y = attention_3d(
            q, k, v, keys[:, None, None, :].expand(B, 1, L, L), self.heads, self.head_dim**-0.5
        )  # (B, L, Hhd)
        return self.out(y) * mask.unsqueeze(-1)


def serving_model(
    model: UserModel, *, fold: bool = True, fused_attention: bool = False
) -> UserModel:
    """An eval-mode copy of `model` for export; the same function up to float32 rounding.

    fold: the self-attention behavior encoder (or a hybrid's text encoder) becomes a
        `FoldedSelfAttnEncoder`.
    fused_attention: every self-attention runs as `attention_3d` (`FusedSelfAttention`, and the
        folded encoder's own flag): needed for, and only exportable at, opset >= ATTENTION_OPSET.
    A hybrid encoder's `id_index` becomes the identity: the served model takes ids of the
    exported id vocabulary (`serving_ids`). `model` is untouched.
    """
    served = copy.deepcopy(model).eval()
    owner: nn.Module = served
    name = "behavior_encoder"
    if isinstance(served.behavior_encoder, HybridBehaviorEncoder):
        hybrid = served.behavior_encoder
        hybrid.id_index = torch.arange(hybrid.ids.num_embeddings)
        owner, name = hybrid, "text"
    if fold and isinstance(getattr(owner, name), SelfAttnBehaviorEncoder):
        setattr(
            owner,
            name,
            FoldedSelfAttnEncoder(getattr(owner, name), fused_attention=fused_attention),
        )
    if fused_attention:
        for parent in list(served.modules()):
            for name, child in parent.named_children():
                if isinstance(child, MultiHeadSelfAttention):
                    setattr(parent, name, FusedSelfAttention(child))
    return served


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
    _to_onnx(
        head,
        tuple(ex.values()),
        out_path,
        input_names=names,
        output_names=outputs,
        dynamic_shapes={n: {0: batch} for n in names},
        opset=opset,
        meta=meta,
    )
    _check_dims(out_path, {n: [None, dim] for n in names})
    return max(_parity(out_path, head, inputs(b)) for b in (1, example_batch + 4))


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
    ctr_head: CtrHead | None = None,
    fold: bool = True,
) -> dict:
    """Export the checkpoint's user model, behavior encoder and heads to ONNX in `out_dir`.

    Args:
        checkpoint_dir: a `ptum.checkpoint` directory (the model is rebuilt from its config).
        out_dir: replaced atomically once everything is written and checked.
        opset: ONNX opset of every graph.
        spm_model: the SentencePiece model the checkpoint was trained with (hash-checked, copied).
        data_version: stored in metadata (e.g. the checkpoint's data_sha256 or a DVC revision).
        params: stored in metadata as JSON (the params the model was built with).
        example_batch, example_behaviors, example_tokens: trace shapes of the dynamic dims; each
            must be >= 2 (a size-1 dim would be fixed in the graph).
        demo_heads: label -> (DemoHead, class names); default: the `demo_<label>` heads saved in
            `checkpoint_dir` (`ptum.heads.save_demo_head`).
        ctr_head: a fine-tuned CtrHead; default the paper's bare sigmoid(user . candidate).
        fold: export `serving_model(model)` (linear maps multiplied out, `FoldedSelfAttnEncoder`)
            rather than the model as trained (fused attention still applies at opset >= 23);
            parity is checked against the model as trained either way.

    Returns:
        The export report: files and their SHA-256, input dims, parity diffs (out_dir/export.json
        holds it plus the metadata).
    """
    if min(example_batch, example_behaviors, example_tokens) < 2:
        raise ValueError("example sizes must be >= 2: a size-1 example dim becomes static")
    spm_sha = file_sha256(spm_model)
    loaded = checkpoint.load(checkpoint_dir, tokenizer_sha256=spm_sha)
    model, config = loaded.model.eval(), loaded.model.config
    arch = str(loaded.meta.get("architecture", f"{config.behavior_encoder}+{config.user_encoder}"))
    if demo_heads is None:
        demo_heads = load_demo_heads(checkpoint_dir)
    meta = metadata(
        config,
        architecture=arch,
        spm_sha256=spm_sha,
        data_version=data_version,
        params=params,
        opset=opset,
        id_vocab_sha256=loaded.id_vocab.sha256 if loaded.id_vocab is not None else "",
    )
    inputs = user_inputs(config)
    static_l, static_t = static_lengths(config)
    max_t = 1 if config.behavior_encoder == "id" else config.max_tokens
    if (not static_l and config.max_behaviors < 2) or (not static_t and max_t < 2):
        raise ValueError("dynamic L / T need max_behaviors / max_tokens >= 2")
    # Trace at the maximum for static dims, else at the (clamped) example size.
    ex_l = config.max_behaviors if static_l else min(example_behaviors, config.max_behaviors)
    ex_t = max_t if static_t else min(example_tokens, max_t)
    # The parity check runs at another shape: another batch, and the maximum L / T when the
    # dim is dynamic (unless the example already is the maximum, then one less).
    ck_l = ex_l if static_l else (config.max_behaviors if ex_l < config.max_behaviors else ex_l - 1)
    ck_t = ex_t if static_t else (max_t if ex_t < max_t else ex_t - 1)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    batch = torch.export.Dim("batch")
    L = (
        torch.export.Dim.STATIC
        if static_l
        else torch.export.Dim("behaviors", min=1, max=config.max_behaviors)
    )
    T = torch.export.Dim.STATIC if static_t else torch.export.Dim("tokens", min=1, max=max_t)
    lengths = [ex_l - (i % ex_l) for i in range(example_batch)]  # ex_l, ex_l - 1, ...
    ex = example_inputs(config, lengths, behaviors=ex_l, tokens=ex_t, seed=0)
    ck_lengths = [ck_l, 0, 1, *[(3 * i) % (ck_l + 1) for i in range(example_batch + 1)]]
    ck = example_inputs(config, ck_lengths, behaviors=ck_l, tokens=ck_t, seed=1)
    l_dim, t_dim = (ex_l if static_l else None), (ex_t if static_t else None)
    report: dict[str, Any] = {
        "architecture": arch,
        "opset": opset,
        "exporter": "dynamo",
        "folded": fold,
        "behaviors_dim": meta["behaviors_dim"],
        "tokens_dim": meta["tokens_dim"],
        "files": {},
        "parity": {},
    }

    served = serving_model(model, fold=fold, fused_attention=opset >= ATTENTION_OPSET)
    path = tmp / "user_model.onnx"
    shapes = {
        k: {0: batch, 1: L, 2: T} if k.startswith("token") else {0: batch, 1: L} for k in inputs
    }
    _to_onnx(
        served,
        tuple(serving_ids(model, ex)[k] for k in inputs),
        path,
        input_names=list(inputs),
        output_names=["user"],
        dynamic_shapes=shapes,
        opset=opset,
        meta=meta,
    )
    _check_dims(
        path,
        {k: [None, l_dim, t_dim] if k.startswith("token") else [None, l_dim] for k in inputs},
    )
    report["parity"]["user_model"] = _parity(path, model, ck, serving_ids(model, ck))

    path = tmp / "behavior_encoder.onnx"
    item_inputs = [k for k in inputs if k in ("tokens", "token_mask", "item_ids")]
    items = {k: serving_ids(model, ex)[k].flatten(0, 1) for k in item_inputs}  # (B * L, ...)
    _to_onnx(
        served.behavior_encoder,
        tuple(items.values()),
        path,
        input_names=item_inputs,
        output_names=["behavior"],
        dynamic_shapes={
            k: {0: torch.export.Dim("items"), 1: T}
            if k != "item_ids"
            else {0: torch.export.Dim("items")}
            for k in items
        },
        opset=opset,
        meta=meta,
    )
    _check_dims(path, {k: [None, t_dim] if k != "item_ids" else [None] for k in items})
    ck_items = {k: ck[k].flatten(0, 1) for k in item_inputs}
    report["parity"]["behavior_encoder"] = _parity(
        path, model.behavior_encoder, ck_items, serving_ids(model, ck_items)
    )

    report["parity"]["ctr_head"] = export_head(
        (ctr_head or CtrHead()).eval(),
        tmp / "ctr_head.onnx",
        dim=config.dim,
        opset=opset,
        meta=meta,
        example_batch=example_batch,
    )
    for label, (head, classes) in sorted(demo_heads.items()):
        if len(classes) != head.classes:
            raise ValueError(
                f"demographic head {label!r}: {len(classes)} class names for {head.classes} classes"
            )
        head_meta = meta | {"label": label, "classes": json.dumps([str(c) for c in classes])}
        report["parity"][f"demo_{label}"] = export_head(
            head.eval(),
            tmp / f"demo_{label}.onnx",
            dim=config.dim,
            opset=opset,
            meta=head_meta,
            example_batch=example_batch,
        )

    shutil.copyfile(spm_model, tmp / "spm.model")
    if loaded.id_vocab is not None:
        (tmp / "id_vocab.json").write_bytes(loaded.id_vocab.to_json())
    report["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
    report["input_dims"] = {
        p.stem: {k: "(" + ", ".join(map(str, v)) + ")" for k, v in input_dims(p).items()}
        for p in sorted(tmp.glob("*.onnx"))
    }
    full = report | {"metadata": meta}
    (tmp / "export.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return report
