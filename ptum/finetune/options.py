"""How one neural cell of the grid trains (`CellOptions`), and the modes a cell can run in.

The fields that params.yaml's `finetune:` section holds have no default here: the stage layer
builds them from that section (`ptum.stages.finetune.cell_options`), so the pipeline, the
benchmarks and the tests cannot run another configuration by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("scratch", "frozen", "finetune")


@dataclass(frozen=True, kw_only=True)
class CellOptions:
    lr: float
    batch_size: int
    max_epochs: int
    patience: int
    head_hidden: int
    weight_decay: float
    # finetune mode: the pre-trained encoder learns at lr * this (the head at lr), so a few
    # thousand labels refine the pre-trained weights instead of overwriting them. 1.0 = one lr.
    encoder_lr_scale: float
    # CTR scoring: "dot" (the paper's user . candidate, with a learned map) or "bias" (plus a
    # user bias and a per-item candidate bias with a popularity fallback; ptum.heads).
    ctr_scoring: str
    # "bias" head: its per-user / per-item offsets learn at lr * this (see loop.optimizer);
    # params.yaml's finetune.ctr_bias_lr_scale.
    bias_lr_scale: float
    # Demo: add the out-of-fold TF-IDF logistic-regression log-probabilities of the user's bag of
    # items to the head's logits (a wide input, the same in every mode; see run_demo's `wide`).
    demo_wide: bool
    # Not in params.yaml:
    # CTR batches hold whole users: all their training impressions share one history encoding.
    ctr_users_per_batch: int = 16
    # Demo loss: "none" (plain cross-entropy) or "balanced" (class weights n / (k * n_c) of the
    # training subset, so a minority class is not ignored on small, imbalanced label sets). The
    # grid sets it per run, once for each entry of finetune.class_weights.
    class_weight: str = "none"
