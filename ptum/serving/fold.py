"""The serving twin of a user model: the same function, cheaper to run and to export.

`serving_model(model)` is what `ptum.serving.export` exports: an eval-mode copy with the
self-attention behavior encoder's consecutive linear maps multiplied out (`FoldedSelfAttnEncoder`,
~5x fewer FLOPs per paper-sized user) and, at opset >= ATTENTION_OPSET (23, the default), every
self-attention as the custom op `ptum::attention_3d` on (N, T, heads * head_dim) rows, which
`ONNX_TRANSLATIONS` turns into one ONNX `Attention` node. Below opset 23 the same function is
exported without Attention. The parity check compares the export with the model as trained.

A hybrid encoder's served copy reads ids of the exported id vocabulary (`serving_ids`) where the
trained one reads pre-training item ids through its `id_index`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from onnxscript import opset23
from torch import Tensor, nn

from ptum.models.behavior import HybridBehaviorEncoder, SelfAttnBehaviorEncoder
from ptum.models.layers import MultiHeadSelfAttention
from ptum.models.user_model import UserModel

# From this opset on the folded encoder's attention is one ONNX `Attention` node on (N, T, H*hd)
# inputs: no head transposes, mask add and softmax fused (~16% off a CPU-default user's batch-1
# latency in onnxruntime, benchmarks/serve.py).
ATTENTION_OPSET = 23


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


# torch.onnx.export's custom_translation_table: op overload -> onnxscript function.
ONNX_TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.ptum.attention_3d.default: _attention_3d_onnx
}


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

    # Buffers registered in __init__, declared for the type checker.
    words_qkv: Tensor
    pos_qkv: Tensor
    score_w: Tensor
    score_b: Tensor
    query: Tensor
    out_w: Tensor
    out_b: Tensor
    proj_b: Tensor

    def __init__(self, enc: SelfAttnBehaviorEncoder, *, fused_attention: bool = False) -> None:
        super().__init__()
        attn, pool = enc.attn, enc.pool
        H, hd = attn.heads, attn.head_dim
        self.heads, self.head_dim = H, hd
        self.fused_attention = fused_attention
        f64 = torch.float64
        with torch.no_grad():
            w_qkv, b_qkv = attn.qkv.weight.to(f64), attn.qkv.bias.to(f64)  # (3Hhd, word_dim)
            words = enc.words.weight.to(f64) @ w_qkv.T  # (V, 3Hhd)
            pos = enc.positions.weight.to(f64) @ w_qkv.T + b_qkv  # (max_tokens, 3Hhd)
            scale = torch.tensor([hd**-0.5, 1.0, 1.0], dtype=f64).repeat_interleave(H * hd)
            words, pos = words * scale, pos * scale
            w_out, b_out = attn.out.weight.to(f64), attn.out.bias.to(f64)  # (Hhd, Hhd)
            w_pool, b_pool = pool.proj.weight.to(f64), pool.proj.bias.to(f64)
            w_proj, b_proj = enc.proj.weight.to(f64), enc.proj.bias.to(f64)
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


def serving_ids(model: UserModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """`inputs` of the trained model as the exported graphs take them: a hybrid model's
    pre-training item_ids become ids of the exported vocabulary (its `id_index` rows)."""
    if "item_ids" not in inputs:
        return inputs
    index = model.behavior_encoder.id_index  # a registered buffer (nn.Module types it loosely)
    assert isinstance(index, Tensor)
    return inputs | {"item_ids": index[inputs["item_ids"]]}
