"""User encoders: a user's sequence of behavior vectors -> one user vector.

Every encoder has the same tensor-only interface,
`forward(vecs (B, L, D), mask (B, L), positions (B, L), gap_buckets (B, L)) -> (B, D)`,
with right-padded sequences (oldest -> newest, then pads), `positions` the recency rank (0 = most
recent) and `gap_buckets` from `ptum.models.layers.time_gap_bucket`. The output lives in the same
D-dimensional space as behavior vectors, so a candidate behavior is scored by a dot product.

Padded positions never influence the output, and a user with no behaviors gets a finite vector.
Because positions count back from the most recent behavior, padding a batch to a longer L leaves
every user's vector unchanged.
"""

import torch
from torch import Tensor, nn

from ptum.models.layers import (
    NUM_GAP_BUCKETS,
    AdditiveAttention,
    BiLstm,
    Dropout,
    MaskedConv1d,
    MultiHeadSelfAttention,
)


class BehaviorContext(nn.Module):
    """Adds a learned recency-position embedding and a time-gap embedding, then dropout."""

    def __init__(self, *, dim: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.positions = nn.Embedding(max_len, dim)
        self.gaps = nn.Embedding(NUM_GAP_BUCKETS, dim)
        # Small init so the context nudges, rather than swamps, the behavior vectors.
        nn.init.normal_(self.positions.weight, std=0.02)
        nn.init.normal_(self.gaps.weight, std=0.02)
        self.drop = Dropout(dropout)

    def forward(self, vecs: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) long in [0, max_len), (B, L) long in [0, 32) -> (B, L, D)."""
        return self.drop(vecs + self.positions(positions) + self.gaps(gap_buckets))


class HsaUserEncoder(nn.Module):
    """Multi-head self-attention + additive attention pooling.

    HSA / NRMS user encoder: Wu et al. 2019b, "Neural news recommendation with multi-head
    self-attention", EMNLP-IJCNLP.
    """

    def __init__(
        self,
        *,
        dim: int,
        max_len: int = 100,
        heads: int = 16,
        head_dim: int = 16,
        attn_hidden: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        inner = heads * head_dim
        self.attn = MultiHeadSelfAttention(
            dim=dim, heads=heads, head_dim=head_dim, dropout=dropout, out_dim=inner
        )
        self.drop = Dropout(dropout)
        self.pool = AdditiveAttention(dim=inner, hidden=attn_hidden)
        self.proj = nn.Linear(inner, dim)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool, (B, L) long, (B, L) long -> (B, D)."""
        x = self.context(vecs, positions, gap_buckets)  # (B, L, D)
        h = self.drop(self.attn(x, mask))  # (B, L, heads * head_dim)
        return self.proj(self.pool(h, mask))  # (B, D)


class HanUserEncoder(nn.Module):
    """Bidirectional LSTM + additive attention pooling.

    HAN: Yang et al. 2016, "Hierarchical attention networks for document classification",
    NAACL-HLT. The backward direction runs within each user's own length (no pad leakage).
    """

    def __init__(
        self,
        *,
        dim: int,
        max_len: int = 100,
        hidden: int = 128,
        attn_hidden: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        self.lstm = BiLstm(in_dim=dim, hidden=hidden)
        self.drop = Dropout(dropout)
        self.pool = AdditiveAttention(dim=2 * hidden, hidden=attn_hidden)
        self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool right-padded, (B, L) long, (B, L) long -> (B, D)."""
        x = self.context(vecs, positions, gap_buckets)  # (B, L, D)
        h = self.drop(self.lstm(x, mask))  # (B, L, 2 * hidden)
        return self.proj(self.pool(h, mask))  # (B, D)


class HuraUserEncoder(nn.Module):
    """CNN (window 3) over the behavior sequence + additive attention pooling.

    HURA: Wu et al. 2019c, "Neural demographic prediction using search query", WSDM.
    """

    def __init__(
        self,
        *,
        dim: int,
        max_len: int = 100,
        filters: int = 256,
        window: int = 3,
        attn_hidden: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        self.conv = MaskedConv1d(in_dim=dim, out_dim=filters, window=window)
        self.drop = Dropout(dropout)
        self.pool = AdditiveAttention(dim=filters, hidden=attn_hidden)
        self.proj = nn.Linear(filters, dim)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool, (B, L) long, (B, L) long -> (B, D)."""
        x = self.context(vecs, positions, gap_buckets)  # (B, L, D)
        h = self.drop(torch.relu(self.conv(x, mask)))  # (B, L, filters)
        return self.proj(self.pool(h, mask))  # (B, D)


class Gru4RecUserEncoder(nn.Module):
    """GRU over the behavior sequence; the user vector is the state after the last behavior.

    GRU4Rec: Hidasi et al. 2016, "Session-based recommendations with recurrent neural networks",
    ICLR. Right padding means the state at index length-1 has seen only real behaviors.
    """

    def __init__(
        self, *, dim: int, max_len: int = 100, hidden: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.drop = Dropout(dropout)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool right-padded, (B, L) long, (B, L) long -> (B, D)."""
        x = self.context(vecs, positions, gap_buckets)  # (B, L, D)
        h, _ = self.gru(x)  # (B, L, H)
        last = (mask.sum(dim=-1) - 1).clamp_min(0)  # (B,)
        index = last[:, None, None].expand(-1, 1, h.shape[-1])  # (B, 1, H)
        u = h.gather(1, index).squeeze(1)  # (B, H)
        # An empty user would otherwise read the GRU state over pads.
        u = u * mask.any(dim=-1, keepdim=True)
        return self.proj(self.drop(u))  # (B, D)


class NativeCtrUserEncoder(nn.Module):
    """Behavior attention: additive attention pooling of the behavior vectors.

    NativeCTR: An et al. 2019, "Neural CTR prediction for native ad", CCL.
    """

    def __init__(
        self, *, dim: int, max_len: int = 100, attn_hidden: int = 200, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        self.pool = AdditiveAttention(dim=dim, hidden=attn_hidden)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool, (B, L) long, (B, L) long -> (B, D)."""
        return self.pool(self.context(vecs, positions, gap_buckets), mask)  # (B, D)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm Transformer encoder block with a key padding mask."""

    def __init__(
        self, *, dim: int, heads: int, head_dim: int, ffn_mult: int = 4, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim=dim, heads=heads, head_dim=head_dim, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)
        )
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool -> (B, L, D)."""
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class Bert4RecUserEncoder(nn.Module):
    """Stacked bidirectional Transformer blocks + additive attention pooling.

    BERT4Rec: Sun et al. 2019, "BERT4Rec: Sequential recommendation with bidirectional encoder
    representations from transformer", CIKM. Pre-LN blocks (more stable to train from scratch
    than the original post-LN); pads are excluded as keys and from pooling.
    """

    def __init__(
        self,
        *,
        dim: int,
        max_len: int = 100,
        heads: int = 16,
        head_dim: int = 16,
        layers: int = 2,
        attn_hidden: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.context = BehaviorContext(dim=dim, max_len=max_len, dropout=dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim=dim, heads=heads, head_dim=head_dim, dropout=dropout)
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(dim)
        self.pool = AdditiveAttention(dim=dim, hidden=attn_hidden)

    def forward(self, vecs: Tensor, mask: Tensor, positions: Tensor, gap_buckets: Tensor) -> Tensor:
        """(B, L, D), (B, L) bool, (B, L) long, (B, L) long -> (B, D)."""
        x = self.context(vecs, positions, gap_buckets)  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.pool(self.ln(x), mask)  # (B, D)


USER_ENCODERS: dict[str, type[nn.Module]] = {
    "hsa": HsaUserEncoder,
    "han": HanUserEncoder,
    "hura": HuraUserEncoder,
    "gru4rec": Gru4RecUserEncoder,
    "nativectr": NativeCtrUserEncoder,
    "bert4rec": Bert4RecUserEncoder,
}
