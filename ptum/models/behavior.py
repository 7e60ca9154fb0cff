"""Behavior encoders: one item (a tokenized text, or a bare id) -> one behavior vector.

Every encoder has the same tensor-only interface,
`forward(tokens (N, T) long, token_mask (N, T) bool) -> (N, out_dim)`, where token id 0 is padding
and rows are right-padded. Padded tokens never influence the output, and the all-pad row of
item 0 gives a finite vector (it is masked out later by the user encoder). The hybrid encoder
also takes the items' ids: `forward(tokens, token_mask, item_ids (N,) long)`.
"""

import torch
from torch import Tensor, nn

from ptum.models.layers import (
    AdditiveAttention,
    BiLstm,
    Dropout,
    MaskedConv1d,
    MultiHeadSelfAttention,
)


class SelfAttnBehaviorEncoder(nn.Module):
    """Word embedding + multi-head self-attention + additive pooling (the official PTUM/NRMS one).

    Used by HSA (Wu et al. 2019b, NRMS) and by the text-based BERT4Rec of the paper.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_tokens: int,
        word_dim: int = 300,
        heads: int = 16,
        head_dim: int = 16,
        attn_hidden: int = 200,
        out_dim: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.positions = nn.Embedding(max_tokens, word_dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.drop = Dropout(dropout)
        # Attention output stays heads * head_dim wide (the NRMS word representation); the
        # pooled vector is projected to out_dim once, at the end.
        self.attn = MultiHeadSelfAttention(
            dim=word_dim, heads=heads, head_dim=head_dim, dropout=dropout, out_dim=heads * head_dim
        )
        self.pool = AdditiveAttention(dim=heads * head_dim, hidden=attn_hidden)
        self.proj = nn.Linear(heads * head_dim, out_dim)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Encode items.

        Args:
            tokens: (N, T) long, pad id 0; T <= max_tokens.
            token_mask: (N, T) bool, True for real tokens.

        Returns:
            (N, out_dim) float.
        """
        T = tokens.shape[1]
        pos = torch.arange(T, device=tokens.device)  # (T,)
        x = self.drop(self.words(tokens) + self.positions(pos))  # (N, T, word_dim)
        h = self.drop(self.attn(x, token_mask))  # (N, T, heads * head_dim)
        return self.proj(self.pool(h, token_mask))  # (N, out_dim)


class CnnBehaviorEncoder(nn.Module):
    """Word embedding + CNN (window 3) + additive pooling (HURA, Wu et al. 2019c; NativeCTR)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        word_dim: int = 300,
        filters: int = 256,
        window: int = 3,
        attn_hidden: int = 200,
        out_dim: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.drop = Dropout(dropout)
        self.conv = MaskedConv1d(in_dim=word_dim, out_dim=filters, window=window)
        self.pool = AdditiveAttention(dim=filters, hidden=attn_hidden)
        # ReLU features are non-negative; a final linear map lets behavior vectors (and so the
        # dot-product scores against user vectors) take either sign.
        self.proj = nn.Linear(filters, out_dim)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Encode items.

        Args:
            tokens: (N, T) long, pad id 0.
            token_mask: (N, T) bool.

        Returns:
            (N, out_dim) float.
        """
        x = self.drop(self.words(tokens))  # (N, T, word_dim)
        h = self.drop(torch.relu(self.conv(x, token_mask)))  # (N, T, filters)
        return self.proj(self.pool(h, token_mask))  # (N, out_dim)


class LstmBehaviorEncoder(nn.Module):
    """Word embedding + bidirectional LSTM + additive pooling (HAN, Yang et al. 2016)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        word_dim: int = 300,
        hidden: int = 128,
        attn_hidden: int = 200,
        out_dim: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.drop = Dropout(dropout)
        self.lstm = BiLstm(in_dim=word_dim, hidden=hidden)
        self.pool = AdditiveAttention(dim=2 * hidden, hidden=attn_hidden)
        self.proj = nn.Linear(2 * hidden, out_dim)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Encode items.

        Args:
            tokens: (N, T) long, pad id 0, right-padded.
            token_mask: (N, T) bool, a prefix of True per row.

        Returns:
            (N, out_dim) float.
        """
        x = self.drop(self.words(tokens))  # (N, T, word_dim)
        h = self.drop(self.lstm(x, token_mask))  # (N, T, 2 * hidden)
        return self.proj(self.pool(h, token_mask))  # (N, out_dim)


class IdBehaviorEncoder(nn.Module):
    """Item-id embedding (YouTubeNet-style) for logs without item text.

    The "token matrix" is (N, 1) and holds the item id itself; item 0 (padding) maps to zeros.
    """

    def __init__(self, *, num_items: int, out_dim: int = 256) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items, out_dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """Look up items.

        Args:
            tokens: (N, 1) long item ids (extra columns are ignored).
            token_mask: (N, 1) bool; unused, kept for the common interface.

        Returns:
            (N, out_dim) float.
        """
        return self.items(tokens[:, 0])  # (N, out_dim)


# Rows of the hybrid encoder's id embedding that are not items.
PAD_ROW, UNKNOWN_ROW = 0, 1
# Default pre-training behaviors an item needs for its own id row: an item seen once trains the
# shared UNKNOWN vector instead, so that vector learns what a new item looks like.
ID_MIN_COUNT = 2


class HybridBehaviorEncoder(nn.Module):
    """A text encoder plus a learned item-id embedding, mixed per dimension by a learned gate.

    Item ids are the rows of the pre-training token matrix: 0 = padding, num_items ids in all (as
    for `IdBehaviorEncoder`). The non-trainable buffer `id_index` (num_items,) maps each to a row
    of the id embedding: PAD_ROW (zeros) for item 0,
    2.. for the items of the id vocabulary (seen at least `id_min_count` times in pre-training,
    `ptum.models.id_vocab`), and UNKNOWN_ROW for every other item. Rare items train the UNKNOWN
    vector during pre-training, so it is a learned "item we know nothing about by id"; a new item
    at serving time gets its text vector mixed with it. The buffer is saved with the weights, so a
    checkpoint carries its own mapping; until `set_id_index` is called every item is unknown.

    Why a gate and not a sum: v = g * t + (1 - g) * e with g = sigmoid(W [t; e] + b). A sum adds
    the same UNKNOWN vector to every new item, and gives text and id the same weight whether the
    id is a well-trained frequent item or the shared UNKNOWN row. The gate sees the id vector, so
    it can learn to lean on the text where the id is UNKNOWN (that vector says nothing about the
    item) and on the id where a frequent item's text is ambiguous.
    """

    def __init__(self, *, text: nn.Module, num_items: int, id_vocab: int, out_dim: int) -> None:
        super().__init__()
        if id_vocab < 2:
            raise ValueError(f"id_vocab must be >= 2 (padding and unknown rows), got {id_vocab}")
        self.text = text
        self.ids = nn.Embedding(id_vocab, out_dim, padding_idx=PAD_ROW)
        nn.init.normal_(self.ids.weight, std=0.02)
        with torch.no_grad():
            self.ids.weight[PAD_ROW].zero_()
        self.gate = nn.Linear(2 * out_dim, out_dim)
        index = torch.full((num_items,), UNKNOWN_ROW, dtype=torch.long)
        index[0] = PAD_ROW
        self.register_buffer("id_index", index)
        self.id_index: Tensor  # (num_items,) long

    def set_id_index(self, id_index: Tensor) -> None:
        """Install the item id -> id-embedding row mapping (num_items,) long.

        Item 0 must map to PAD_ROW and only item 0: a real item never gets the padding zeros.
        """
        id_index = torch.as_tensor(id_index, dtype=torch.long)
        if id_index.shape != self.id_index.shape:
            raise ValueError(
                f"id_index has shape {tuple(id_index.shape)}, expected {tuple(self.id_index.shape)}"
            )
        rows = self.ids.num_embeddings
        if int(id_index[0]) != PAD_ROW or bool((id_index[1:] < UNKNOWN_ROW).any()):
            raise ValueError("id_index: item 0 must map to the padding row, every other item not")
        if int(id_index.max()) >= rows:
            raise ValueError(f"id_index points past the {rows} rows of the id embedding")
        self.id_index.copy_(id_index)

    def forward(self, tokens: Tensor, token_mask: Tensor, item_ids: Tensor) -> Tensor:
        """Encode items from their text and their id.

        Args:
            tokens: (N, T) long, pad id 0 (the wrapped text encoder's input).
            token_mask: (N, T) bool.
            item_ids: (N,) long in [0, num_items); 0 = the padding item.

        Returns:
            (N, out_dim) float.
        """
        t = self.text(tokens, token_mask)  # (N, D)
        e = self.ids(self.id_index[item_ids]).to(t.dtype)  # (N, D)
        g = torch.sigmoid(self.gate(torch.cat([t, e], dim=-1)))  # (N, D)
        return g * t + (1 - g) * e


BEHAVIOR_ENCODERS: dict[str, type[nn.Module]] = {
    "selfattn": SelfAttnBehaviorEncoder,
    "cnn": CnnBehaviorEncoder,
    "lstm": LstmBehaviorEncoder,
    "id": IdBehaviorEncoder,
    "hybrid": HybridBehaviorEncoder,
}
# The encoders that read token text, i.e. those a hybrid encoder can wrap.
TEXT_ENCODERS = ("selfattn", "cnn", "lstm")
