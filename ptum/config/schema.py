"""The schema: one frozen dataclass per `params.yaml` section, with its range checks.

Each field's comment documents the key. The defaults are the root params.yaml's values
(tests/test_config.py checks that key by key): params.yaml is where a default is chosen.
The `tune` section lives in `ptum.config.tune` (its checks did not fit here). Every enumerated
key is checked when params load: a `Literal` type by the loader, a list of names
(`ptum.config.names`) here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ptum.config.errors import ConfigError, require, require_each, require_one_of
from ptum.config.names import (
    ARCHITECTURE_NAMES,
    BEHAVIOR_ENCODER_NAMES,
    CLASS_WEIGHT_NAMES,
    DEVICE,
    DEVICE_NAMES,
    EXECUTOR_NAMES,
    MODE_NAMES,
    SYNTHETIC_SIZES,
    TASK_NAMES,
)
from ptum.config.tune import TuneConfig


@dataclass(frozen=True)
class DataConfig:
    """Section of stage `ingest`: where the behavior log comes from."""

    source: Literal["synthetic", "movielens", "generic", "ptum_tsv"] = "synthetic"
    # Input directory (movielens, generic) or file (ptum_tsv). Relative paths are resolved from
    # the project root. Empty for synthetic; for movielens, empty means "download from GroupLens".
    path: str = ""
    # Synthetic size preset (see ptum.data.synthetic.PRESETS).
    size: str = "small"
    seed: int = 7
    # MovieLens: an impression is a click when rating >= click_threshold.
    click_threshold: int = 4
    # MovieLens: age bucket edges (years); bucket i holds ages in [edge[i-1], edge[i]).
    age_edges: tuple[int, ...] = (25, 35, 45)
    # MovieLens download variant when path is empty.
    movielens_variant: Literal["ml-100k", "ml-1m"] = "ml-100k"

    def __post_init__(self) -> None:
        require_one_of(self.size, SYNTHETIC_SIZES, "data.size")


@dataclass(frozen=True)
class PrepareConfig:
    """Section of stage `prepare`: validation, item table, user sequences, splits."""

    max_behaviors: int = 100
    # error: stop at the first bad row with file:line and reason. quarantine: drop bad rows into
    # data/prepared/quarantine/ and count them per reason in the data report.
    on_bad_rows: Literal["error", "quarantine"] = "error"
    # Exact duplicate events (same user, second and text): drop (and count them in the data
    # report) or error (stop at the first, with file:line).
    on_duplicates: Literal["drop", "error"] = "drop"
    # CTR time windows: global timestamp cut-offs (one for everyone). "per_user" (each user's
    # own last impressions) is refused, with the reason: it puts other users' future in training.
    ctr_windows: Literal["global", "per_user"] = "global"
    # Fractions of impressions (by time rank) in the CTR-train and CTR-test windows; impressions
    # before the CTR-train window are history and are not used as CTR samples.
    ctr_train_frac: float = 0.15
    ctr_test_frac: float = 0.1
    # Share of CTR-train-window impressions held out for validation (paper: 9:1).
    ctr_valid_frac: float = 0.1
    # Labeled users: train / validation / test shares (paper: 80/10/10).
    demo_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Nested training-label subsets (fractions of the training users / impressions).
    label_ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    # Share of pre-training users held out to measure MBP/NBP accuracy.
    pretrain_valid_frac: float = 0.05
    seed: int = 13
    # A behaviors table with more rows is processed in chunks of whole users of about this
    # many rows (same outputs; peak memory set by the chunk, not the log).
    chunk_rows: int = 4_000_000

    def __post_init__(self) -> None:
        require(self.max_behaviors >= 2, "prepare.max_behaviors", self.max_behaviors, ">= 2")
        require(
            self.on_bad_rows in ("error", "quarantine"),
            "prepare.on_bad_rows",
            self.on_bad_rows,
            "error or quarantine",
        )
        require(
            self.on_duplicates in ("drop", "error"),
            "prepare.on_duplicates",
            self.on_duplicates,
            "drop or error",
        )
        if self.ctr_windows != "global":
            raise ConfigError(
                f"prepare.ctr_windows={self.ctr_windows!r} is refused: per-user windows put "
                "impressions (and pre-training behaviors) that are later than other users' test "
                "impressions into training, so the test window is no longer the future; set "
                "prepare.ctr_windows: global"
            )
        require(
            abs(sum(self.demo_split) - 1.0) <= 1e-6 and min(self.demo_split) >= 0,
            "prepare.demo_split",
            self.demo_split,
            "3 shares >= 0 summing to 1",
        )
        require(
            all(0 < r <= 1 for r in self.label_ratios),
            "prepare.label_ratios",
            self.label_ratios,
            "fractions in (0, 1]",
        )
        train, test = self.ctr_train_frac, self.ctr_test_frac
        require(
            0 < train < 1 and 0 < test < 1 and train + test <= 1,
            "prepare.ctr_train_frac, ctr_test_frac",
            (train, test),
            "each in (0, 1), summing to <= 1",
        )
        require(self.chunk_rows >= 1, "prepare.chunk_rows", self.chunk_rows, "an integer >= 1")


@dataclass(frozen=True)
class TokenizeConfig:
    """Section of stage `tokenize`: SentencePiece over the distinct item texts."""

    model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"
    vocab_size: int = 8000
    byte_fallback: bool = True
    max_tokens: int = 30
    character_coverage: float = 0.9995
    seed: int = 1


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
    # Data-parallel processes (torchrun; gloo on CPU, NCCL on GPU). 1 = plain single process.
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


@dataclass(frozen=True)
class FinetuneConfig:
    """Section of stage `finetune@TASK`: the grid task x model x mode x ratio x seed (Tables 2-3)."""

    # Paper Table 2: han, hura, hsa; Table 3: gru4rec, nativectr, bert4rec (`make paper`).
    demo_models: tuple[str, ...] = ("hsa",)
    ctr_models: tuple[str, ...] = ("nativectr",)
    modes: tuple[str, ...] = ("scratch", "frozen", "finetune")
    ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    repeats: int = 5  # re-drawn splits (paper: 10)
    seed: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 8
    head_hidden: int = 200
    weight_decay: float = 0.0
    # Validation metric that selects the epoch on Demo tasks (CTR uses AUC).
    demo_select: Literal["acc", "macro_f1"] = "acc"
    # Parallel worker processes for independent cells (each uses one thread).
    workers: int = 2
    # Where the cells run: "local" (`workers` processes of this machine) or "dask" (a Dask
    # cluster: each worker process runs one cell at a time on one thread; the results are
    # the same either way). docs/evaluation.md#grid-on-a-dask-cluster.
    executor: str = "local"
    # dask: the scheduler's address (tcp://HOST:8786); "" starts a LocalCluster of `workers`
    # processes on 127.0.0.1. Its workers must see the data and checkpoints at the same paths.
    scheduler_address: str = ""
    # finetune mode only: the pre-trained user model trains at lr * encoder_lr_scale.
    encoder_lr_scale: float = 0.1
    # Demo loss class weighting tried by every neural cell ("none" | "balanced"); the cell keeps
    # the one with the best validation score (same selection budget in every mode).
    class_weights: tuple[str, ...] = ("none", "balanced")
    # CTR head: "dot" (paper: user . candidate) or "bias" (+ user bias and a per-item candidate
    # bias falling back to the item's popularity before the window; ptum.heads.BiasedCtrHead).
    ctr_scoring: Literal["dot", "bias"] = "bias"
    # "bias" head: the per-user / per-item offsets learn at lr * this.
    ctr_bias_lr_scale: float = 10.0
    # Demo heads also get the out-of-fold TF-IDF logistic-regression log-probabilities of the
    # user's bag of items (a "wide" input, the same in every mode).
    demo_wide: bool = True
    # Bootstrap replicates (over test users) of each cell's 95% CI.
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        require(self.repeats >= 1, "finetune.repeats", self.repeats, "an integer >= 1")
        require(self.lr > 0, "finetune.lr", self.lr, "> 0")
        require(self.batch_size >= 1, "finetune.batch_size", self.batch_size, "an integer >= 1")
        require(self.max_epochs >= 1, "finetune.max_epochs", self.max_epochs, "an integer >= 1")
        require(self.patience >= 1, "finetune.patience", self.patience, "an integer >= 1")
        require(self.head_hidden >= 1, "finetune.head_hidden", self.head_hidden, ">= 1")
        require(self.weight_decay >= 0, "finetune.weight_decay", self.weight_decay, ">= 0")
        require(self.workers >= 1, "finetune.workers", self.workers, "an integer >= 1")
        require_one_of(self.executor, EXECUTOR_NAMES, "finetune.executor")
        require(
            self.executor == "dask" or not self.scheduler_address,
            "finetune.scheduler_address",
            self.scheduler_address,
            '"" unless finetune.executor is dask',
        )
        require(
            self.encoder_lr_scale >= 0, "finetune.encoder_lr_scale", self.encoder_lr_scale, ">= 0"
        )
        require(self.bootstrap >= 100, "finetune.bootstrap", self.bootstrap, ">= 100")
        require(
            self.ctr_bias_lr_scale > 0, "finetune.ctr_bias_lr_scale", self.ctr_bias_lr_scale, "> 0"
        )
        require_each(self.demo_models, ARCHITECTURE_NAMES, "finetune.demo_models")
        require_each(self.ctr_models, ARCHITECTURE_NAMES, "finetune.ctr_models")
        require_each(self.modes, MODE_NAMES, "finetune.modes")
        require_each(self.class_weights, CLASS_WEIGHT_NAMES, "finetune.class_weights")
        require(
            len(self.ratios) >= 1 and all(0 < r <= 1 for r in self.ratios),
            "finetune.ratios",
            self.ratios,
            "a non-empty list of shares in (0, 1]",
        )


@dataclass(frozen=True)
class SensitivityConfig:
    """Section of stage `sensitivity`: ablation (none/MBP/NBP/both), λ and K sweeps (Figs. 3-5)."""

    # The paper's: both tasks, BERT4Rec on CTR, λ in {0, 0.25, 0.5, 1, 2, 4}, K in 1..5
    # (experiments/*/params.yaml); the default is the quick subset.
    tasks: tuple[str, ...] = ("demo",)
    demo_model: str = "hsa"
    ctr_model: str = "nativectr"
    lams: tuple[float, ...] = (0.0, 1.0)
    ks: tuple[int, ...] = (2,)
    ratio: float = 0.2
    repeats: int = 3

    def __post_init__(self) -> None:
        require_each(self.tasks, TASK_NAMES, "sensitivity.tasks")
        require_one_of(self.demo_model, ARCHITECTURE_NAMES, "sensitivity.demo_model")
        require_one_of(self.ctr_model, ARCHITECTURE_NAMES, "sensitivity.ctr_model")


@dataclass(frozen=True)
class RegimeConfig:
    """Section of stage `regime`: pre-training pools of growing size around the fixed labeled
    set (the paper's regime: far more unlabeled users than labeled ones), one model per task."""

    # Pool sizes as multiples of the labeled users (a Demo label or a CTR impression); [] = the
    # stage runs nothing (the root default; experiments/synthetic-regime: [1, 5, 25]).
    pools: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ("demo", "ctr")
    demo_model: str = "hsa"
    ctr_model: str = "nativectr"
    ratios: tuple[float, ...] = (0.2, 1.0)
    repeats: int = 5  # re-drawn splits, the same for every pool
    # Keep this many labeled users (seeded; the others' labels and impressions are dropped and
    # they join the pools unlabeled): where every user is labeled (MovieLens-100K). 0 = all.
    labeled_users: int = 0

    def __post_init__(self) -> None:
        require(self.labeled_users >= 0, "regime.labeled_users", self.labeled_users, ">= 0")
        require(
            all(m >= 1 for m in self.pools) and list(self.pools) == sorted(set(self.pools)),
            "regime.pools",
            self.pools,
            "increasing integers >= 1 (multiples of the labeled users)",
        )
        require_each(self.tasks, TASK_NAMES, "regime.tasks")
        require_one_of(self.demo_model, ARCHITECTURE_NAMES, "regime.demo_model")
        require_one_of(self.ctr_model, ARCHITECTURE_NAMES, "regime.ctr_model")
        require(self.repeats >= 2, "regime.repeats", self.repeats, "an integer >= 2 (paired)")


@dataclass(frozen=True)
class ExportConfig:
    """Section of stage `export@ARCH`: ONNX files of a pre-trained model (+ serving heads)."""

    opset: int = 23
    # Trace sizes of the dynamic dims; each >= 2 (a size-1 example dim is fixed in the graph).
    example_batch: int = 3
    example_behaviors: int = 5
    example_tokens: int = 7
    # Stored in the ONNX metadata; "" = the checkpoint's data_sha256.
    data_version: str = ""
    # Serving heads are trained on the frozen pre-trained user vectors with all training
    # labels (the "+PTUM (no finetune)" setting), so one user model serves every head.
    heads: bool = True
    head_seed: int = 0


@dataclass(frozen=True)
class EmbedConfig:
    """Command `embed`: user vectors from a behavior log with onnxruntime (no torch)."""

    batch_size: int = 256
    # Also predict every demographic label that has an exported demo_<label>.onnx head.
    demo: bool = False


@dataclass(frozen=True)
class Params:
    """All sections of params.yaml that this version of ptum knows about."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    def __post_init__(self) -> None:
        """Constraints between sections."""
        ratios = set(self.prepare.label_ratios)
        require(
            set(self.finetune.ratios) <= ratios,
            "finetune.ratios",
            self.finetune.ratios,
            f"among prepare.label_ratios {list(self.prepare.label_ratios)}",
        )
        require(
            self.sensitivity.ratio in ratios,
            "sensitivity.ratio",
            self.sensitivity.ratio,
            f"one of prepare.label_ratios {list(self.prepare.label_ratios)}",
        )
        require(
            bool(self.regime.ratios) and set(self.regime.ratios) <= ratios,
            "regime.ratios",
            self.regime.ratios,
            f"among prepare.label_ratios {list(self.prepare.label_ratios)}",
        )
        require(
            self.pretrain.k < self.prepare.max_behaviors,
            "pretrain.k",
            self.pretrain.k,
            f"< prepare.max_behaviors ({self.prepare.max_behaviors}): NBP needs a history "
            "before the K next behaviors",
        )
        require(
            self.tune.k[1] < self.prepare.max_behaviors,
            "tune.k",
            self.tune.k,
            f"a range below prepare.max_behaviors ({self.prepare.max_behaviors}): NBP needs a "
            "history before the K next behaviors",
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "prepare": PrepareConfig,
    "tokenize": TokenizeConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "sensitivity": SensitivityConfig,
    "regime": RegimeConfig,
    "tune": TuneConfig,
    "export": ExportConfig,
    "embed": EmbedConfig,
}
