"""The `pretrain` section (stage `pretrain@ARCH`) and its encoder sizes, with their range checks.

Each field's comment documents the key; the defaults are the root params.yaml's values
(`ptum.config.schema` gathers every section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ptum.config.errors import require, require_each, require_one_of, require_seed
from ptum.config.names import ARCHITECTURE_NAMES, BEHAVIOR_ENCODER_NAMES, DEVICE, DEVICE_NAMES


@dataclass(frozen=True)
class ModelParams:
    """Encoder sizes, CPU-sized (the paper's: word_dim 300, dim 256, heads 16 x head_dim 16,
    attn_hidden 200)."""

    word_dim: int = 64
    dim: int = 64
    heads: int = 4
    head_dim: int = 16
    attn_hidden: int = 64
    dropout: float = 0.2
    layers: int = 2
    # hybrid encoder: items with fewer behaviors than this in the pre-training corpus share
    # one UNKNOWN id vector (so do items never seen there).
    id_min_count: int = 2

    def __post_init__(self) -> None:
        for name in ("word_dim", "dim", "heads", "head_dim", "attn_hidden", "layers"):
            v = getattr(self, name)
            require(v >= 1, f"pretrain.model.{name}", v, "an integer >= 1")
        require(0 <= self.dropout < 1, "pretrain.model.dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class PretrainConfig:
    """Section of stage `pretrain`: MBP + NBP self-supervision (paper Eq. 1-3)."""

    # User models to pre-train (a DVC foreach runs one stage per entry); names of
    # ptum.models.ARCHITECTURES: hsa, han, hura, gru4rec, nativectr, bert4rec (the paper's six:
    # `make paper`). Default: one model per task.
    architectures: tuple[str, ...] = ("hsa", "nativectr")
    # Override the architecture's behavior encoder (selfattn | cnn | lstm | id | hybrid);
    # "" = default. hybrid = the architecture's text encoder + a learned item-id embedding.
    behavior_encoder: str = ""
    model: ModelParams = field(default_factory=ModelParams)
    mbp: bool = True
    nbp: bool = True
    k: int = 2
    lam: float = 1.0
    p: int = 4
    negatives: Literal["popularity", "uniform"] = "popularity"
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 6
    seed: int = 42
    # Bit-identical reruns: deterministic kernels, 1 torch thread (ptum.pretrain.train).
    deterministic: bool = True
    grad_clip: float = 1.0
    # Data-parallel processes on this machine (ptum.stages.launch: loopback store; gloo on CPU,
    # NCCL on GPU). 1 = plain single process. Several machines: ptum pretrain --nnodes.
    processes: int = 1
    device: str = "auto"
    # Take k / lam / p / lr from the tuning stage's best_params.json.
    use_tuned: bool = False

    def __post_init__(self) -> None:
        require(self.k >= 1, "pretrain.k", self.k, "an integer >= 1")
        require(self.p >= 1, "pretrain.p", self.p, "an integer >= 1 (negatives per positive)")
        require(self.lam >= 0, "pretrain.lam", self.lam, ">= 0")
        require(self.lr > 0, "pretrain.lr", self.lr, "> 0")
        require(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay, ">= 0")
        require(self.batch_size >= 1, "pretrain.batch_size", self.batch_size, "an integer >= 1")
        require(self.epochs >= 1, "pretrain.epochs", self.epochs, "an integer >= 1")
        require_seed(self.seed, "pretrain.seed")
        require(self.grad_clip > 0, "pretrain.grad_clip", self.grad_clip, "> 0")
        require(self.processes >= 1, "pretrain.processes", self.processes, "an integer >= 1")
        require(
            self.mbp or self.nbp, "pretrain.mbp/nbp", (self.mbp, self.nbp), "at least one task on"
        )
        require_each(self.architectures, ARCHITECTURE_NAMES, "pretrain.architectures")
        require_one_of(
            self.behavior_encoder, ("", *BEHAVIOR_ENCODER_NAMES), "pretrain.behavior_encoder"
        )
        require(
            DEVICE.fullmatch(self.device) is not None, "pretrain.device", self.device, DEVICE_NAMES
        )
