"""The PTUM user model: a behavior encoder + a user encoder + the [MASK] behavior vector.

`UserModel.forward` is the serving path (tokens of every behavior -> user vector) and is
tensor-only so it exports to ONNX. Pre-training encodes items and users separately
(`encode_items`, `encode_users`) so candidate behaviors share the behavior encoder and the masked
behavior of MBP can be swapped for `mask_vector`.

The "hybrid" behavior encoder (text encoder + item-id embedding) also needs each item's id:
`encode_items` and `forward` take an optional `item_ids` that only it reads (and requires).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ptum.models.behavior import (
    BEHAVIOR_ENCODERS,
    ID_MIN_COUNT,
    TEXT_ENCODERS,
    HybridBehaviorEncoder,
)
from ptum.models.user import USER_ENCODERS

# Paper-default (behavior encoder, user encoder) per user model name (paper Sec. 3.2).
# GRU4Rec's behavior encoder is not stated in the paper; it runs on the same ad/webpage text as
# NativeCTR in the CTR experiments, so it gets the same CNN text encoder.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "hsa": ("selfattn", "hsa"),
    "han": ("lstm", "han"),
    "hura": ("cnn", "hura"),
    "gru4rec": ("cnn", "gru4rec"),
    "nativectr": ("cnn", "nativectr"),
    "bert4rec": ("selfattn", "bert4rec"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; saved as JSON next to checkpoint weights.

    Inner sizes not listed here follow `dim`: LSTM hidden = dim // 2 per direction, CNN filters =
    dim, GRU hidden = dim.

    behavior_encoder "hybrid" = the text encoder named by `hybrid_text` (`for_architecture` picks
    the architecture's own) + an item-id embedding of `id_vocab` rows (0 padding, 1 UNKNOWN, one
    per item seen at least `id_min_count` times in pre-training; see `ptum.models.id_vocab`).
    """

    behavior_encoder: str
    user_encoder: str
    vocab_size: int
    max_tokens: int  # longest token row (T) the behavior encoder accepts
    max_behaviors: int  # positions (recency ranks) must be < max_behaviors
    word_dim: int = 300
    dim: int = 256  # behavior and user vector size
    heads: int = 16
    head_dim: int = 16
    attn_hidden: int = 200
    dropout: float = 0.2
    layers: int = 2  # Transformer blocks (bert4rec)
    num_items: int = 0  # item-id vocabulary, incl. padding item 0 (behavior encoders id, hybrid)
    hybrid_text: str = ""  # hybrid only: the text encoder it wraps (selfattn | cnn | lstm)
    id_vocab: int = 0  # hybrid only: id-embedding rows (padding, UNKNOWN, the frequent items)
    # hybrid only: pre-training behaviors an item needs for its own id row
    id_min_count: int = ID_MIN_COUNT

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok = (
                isinstance(value, float | int) and not isinstance(value, bool)
                if f.type is float
                else type(value) is f.type
            )
            if not ok:
                raise ValueError(
                    f"ModelConfig.{f.name} must be {cast(type, f.type).__name__}, got {value!r}"
                )
        if self.behavior_encoder not in BEHAVIOR_ENCODERS:
            raise ValueError(
                f"unknown behavior_encoder {self.behavior_encoder!r}; "
                f"choose from {sorted(BEHAVIOR_ENCODERS)}"
            )
        if self.user_encoder not in USER_ENCODERS:
            raise ValueError(
                f"unknown user_encoder {self.user_encoder!r}; choose from {sorted(USER_ENCODERS)}"
            )
        if self.behavior_encoder == "id" and self.num_items < 1:
            raise ValueError("behavior_encoder 'id' needs num_items >= 1 (item 0 is padding)")
        if self.behavior_encoder == "hybrid":
            if self.hybrid_text not in TEXT_ENCODERS:
                raise ValueError(
                    f"behavior_encoder 'hybrid' needs hybrid_text in {list(TEXT_ENCODERS)}, "
                    f"got {self.hybrid_text!r}"
                )
            if self.num_items < 1 or self.id_vocab < 2:
                raise ValueError(
                    "behavior_encoder 'hybrid' needs num_items >= 1 and id_vocab >= 2 "
                    f"(padding and unknown rows), got {self.num_items} and {self.id_vocab}"
                )
        elif self.hybrid_text or self.id_vocab:
            raise ValueError("hybrid_text and id_vocab are for behavior_encoder 'hybrid' only")
        if self.id_min_count < 1:
            raise ValueError(f"id_min_count must be >= 1, got {self.id_min_count}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def for_architecture(
        cls, name: str, *, behavior_encoder: str = "", **kwargs: Any
    ) -> "ModelConfig":
        """Config for a paper user model name (a key of ARCHITECTURES) plus the other fields.

        behavior_encoder: "" = the architecture's own; "hybrid" wraps the architecture's own
        text encoder (unless `hybrid_text` is given).
        """
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
        own, user = ARCHITECTURES[name]
        if behavior_encoder == "hybrid":
            kwargs.setdefault("hybrid_text", own)
        return cls(behavior_encoder=behavior_encoder or own, user_encoder=user, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`; rejects unknown and missing keys with a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing ModelConfig keys {missing}")
        return cls(**data)


def build_behavior_encoder(config: ModelConfig) -> nn.Module:
    """The behavior encoder named by `config.behavior_encoder`, with out_dim = config.dim."""
    c = config
    if c.behavior_encoder == "hybrid":
        text_config = dataclasses.replace(
            c, behavior_encoder=c.hybrid_text, hybrid_text="", id_vocab=0
        )
        return HybridBehaviorEncoder(
            text=build_behavior_encoder(text_config),
            num_items=c.num_items,
            id_vocab=c.id_vocab,
            out_dim=c.dim,
        )
    text = dict(vocab_size=c.vocab_size, word_dim=c.word_dim, attn_hidden=c.attn_hidden)
    kwargs: dict[str, dict[str, Any]] = {
        "selfattn": dict(
            **text, max_tokens=c.max_tokens, heads=c.heads, head_dim=c.head_dim, dropout=c.dropout
        ),
        "cnn": dict(**text, filters=c.dim, dropout=c.dropout),
        "lstm": dict(**text, hidden=c.dim // 2, dropout=c.dropout),
        "id": dict(num_items=c.num_items),
    }
    return BEHAVIOR_ENCODERS[c.behavior_encoder](**kwargs[c.behavior_encoder], out_dim=c.dim)


def build_user_encoder(config: ModelConfig) -> nn.Module:
    """The user encoder named by `config.user_encoder`, mapping (B, L, dim) -> (B, dim)."""
    c = config
    attn = dict(heads=c.heads, head_dim=c.head_dim, attn_hidden=c.attn_hidden)
    kwargs: dict[str, dict[str, Any]] = {
        "hsa": attn,
        "han": dict(hidden=c.dim // 2, attn_hidden=c.attn_hidden),
        "hura": dict(filters=c.dim, attn_hidden=c.attn_hidden),
        "gru4rec": dict(hidden=c.dim),
        "nativectr": dict(attn_hidden=c.attn_hidden),
        "bert4rec": dict(**attn, layers=c.layers),
    }
    return USER_ENCODERS[c.user_encoder](
        **kwargs[c.user_encoder], dim=c.dim, max_len=c.max_behaviors, dropout=c.dropout
    )


class UserModel(nn.Module):
    """Behavior encoder + user encoder, plus the learned [MASK] behavior vector for MBP."""

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.behavior_encoder = build_behavior_encoder(config)
        self.user_encoder = build_user_encoder(config)
        self.mask_vector = nn.Parameter(torch.randn(config.dim) * 0.02)

    @property
    def uses_item_ids(self) -> bool:
        """Whether the behavior encoder reads item ids (the hybrid one): then `encode_items` and
        `forward` need `item_ids`."""
        return isinstance(self.behavior_encoder, HybridBehaviorEncoder)

    def encode_items(
        self, tokens: Tensor, token_mask: Tensor, item_ids: Tensor | None = None
    ) -> Tensor:
        """Behavior vectors of items.

        Args:
            tokens: (N, T) long, pad id 0 (for the id encoder: (N, 1) item ids).
            token_mask: (N, T) bool.
            item_ids: (N,) long item ids (rows of the token matrix); required by the hybrid
                encoder, ignored by the others.

        Returns:
            (N, D) float.
        """
        if not self.uses_item_ids:
            return self.behavior_encoder(tokens, token_mask)
        if item_ids is None:
            raise ValueError(
                "the hybrid behavior encoder needs item_ids; encode items with "
                "ptum.models.user_model.encode_ids(model, tokens, [ids])"
            )
        return self.behavior_encoder(tokens, token_mask, item_ids)

    def encode_users(
        self,
        vecs: Tensor,
        mask: Tensor,
        positions: Tensor,
        gap_buckets: Tensor,
        mbp_mask: Tensor | None = None,
    ) -> Tensor:
        """User vectors from behavior vectors.

        Args:
            vecs: (B, L, D) behavior vectors, right-padded.
            mask: (B, L) bool, True for real behaviors.
            positions: (B, L) long recency rank (0 = most recent), < max_behaviors.
            gap_buckets: (B, L) long in [0, 32).
            mbp_mask: optional (B, L) bool; where True the behavior vector is replaced by
                `mask_vector` (position, gap and `mask` are kept), so the hidden behavior's content
                cannot reach the user vector.

        Returns:
            (B, D) float.
        """
        if mbp_mask is not None:
            vecs = torch.where(mbp_mask.unsqueeze(-1), self.mask_vector.to(vecs.dtype), vecs)
        return self.user_encoder(vecs, mask, positions, gap_buckets)

    def forward(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        mask: Tensor,
        positions: Tensor,
        gap_buckets: Tensor,
        item_ids: Tensor | None = None,
    ) -> Tensor:
        """Serving path: every behavior's tokens -> user vector.

        Exports with torch.onnx.export(dynamo=True). With an LSTM/GRU inside (behavior encoder
        "lstm", user encoders "han" and "gru4rec") export T and L as static dims and serve inputs
        padded to them: torch.export specializes recurrent sequence lengths. Padding never
        changes the result, so this costs only compute.

        Args:
            tokens: (B, L, T) long.
            token_mask: (B, L, T) bool.
            mask: (B, L) bool.
            positions: (B, L) long.
            gap_buckets: (B, L) long.
            item_ids: (B, L) long, 0 for padded behaviors; hybrid encoder only.

        Returns:
            (B, D) float.
        """
        B, L, T = tokens.shape
        ids = None if item_ids is None else item_ids.reshape(B * L)
        vecs = self.encode_items(tokens.reshape(B * L, T), token_mask.reshape(B * L, T), ids)
        vecs = vecs.reshape(B, L, -1)  # (B, L, D)
        return self.encode_users(vecs, mask, positions, gap_buckets)


def encode_ids(
    model: UserModel, tokens: Tensor, ids: list[Tensor], unique: bool = True
) -> list[Tensor]:
    """Behavior vectors for several id tensors at once.

    The item ids go to the model with their token rows (the hybrid encoder reads both).

    Args:
        tokens: (N + 1, T) token matrix on the model's device.
        ids: item-id tensors of any shapes.

    Returns:
        One (*shape, D) tensor per input.
    """
    flat = torch.cat([i.reshape(-1) for i in ids])
    if unique:
        uniq, inverse = torch.unique(flat, return_inverse=True)
        tok = _trim(tokens[uniq])  # (U, T')
        vecs = model.encode_items(tok, tok != 0, uniq)[inverse]  # (sum, D)
    else:
        tok = _trim(tokens[flat])
        vecs = model.encode_items(tok, tok != 0, flat)
    out, start = [], 0
    for i in ids:
        n = i.numel()
        out.append(vecs[start : start + n].reshape(*i.shape, -1))
        start += n
    return out


def _trim(tok: Tensor) -> Tensor:
    """Drop token columns that are padding in every row (titles are right-padded to
    max_tokens, but most are much shorter); padding is masked, so the output is unchanged."""
    longest = int((tok != 0).sum(1).max()) if tok.numel() else 0
    return tok[:, : max(longest, 1)]
