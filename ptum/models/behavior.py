"""Behavior encoders: one item (a tokenized text, or a bare id) -> one behavior vector.

Every encoder has the same tensor-only interface,
`forward(tokens (N, T) long, token_mask (N, T) bool) -> (N, out_dim)`, where token id 0 is padding
and rows are right-padded. Padded tokens never influence the output, and the all-pad row of
item 0 gives a finite vector (it is masked out later by the user encoder).
"""

import torch
from torch import Tensor, nn

from ptum.models.layers import AdditiveAttention, BiLstm, MaskedConv1d, MultiHeadSelfAttention


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
        self.drop = nn.Dropout(dropout)
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
        self.drop = nn.Dropout(dropout)
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
        self.drop = nn.Dropout(dropout)
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


BEHAVIOR_ENCODERS: dict[str, type[nn.Module]] = {
    "selfattn": SelfAttnBehaviorEncoder,
    "cnn": CnnBehaviorEncoder,
    "lstm": LstmBehaviorEncoder,
    "id": IdBehaviorEncoder,
}
