"""The names an enumerated key of params.yaml may take, where the config cannot read them from
the library: config sits below the models, data and fine-tuning packages (tests/test_layers.py),
so each list is repeated here and tests/test_config.py checks that it equals the library's."""

from __future__ import annotations

import re

# ptum.models.ARCHITECTURES (pretrain.architectures, finetune.*_models, sensitivity.*_model,
# tune.arch).
ARCHITECTURE_NAMES = ("hsa", "han", "hura", "gru4rec", "nativectr", "bert4rec")
# ptum.models.BEHAVIOR_ENCODERS (pretrain.behavior_encoder; "" = the architecture's own).
BEHAVIOR_ENCODER_NAMES = ("selfattn", "cnn", "lstm", "id", "hybrid")
# ptum.data.synthetic.PRESETS (data.size).
SYNTHETIC_SIZES = (
    "tiny",
    "small",
    "default",
    "large",
    "regime",
    "paper",
    "positive_control",
    "null_control",
)
# ptum.finetune.options.MODES (finetune.modes).
MODE_NAMES = ("scratch", "frozen", "finetune")
# The downstream tasks (sensitivity.tasks, regime.tasks): ptum.finetune.summary.METRICS' keys.
TASK_NAMES = ("demo", "ctr")
# Demo loss weighting (finetune.class_weights): ptum.finetune.options.CellOptions.class_weight.
CLASS_WEIGHT_NAMES = ("none", "balanced")
# ptum.finetune.executors.EXECUTORS (finetune.executor): where the grid's cells run.
EXECUTOR_NAMES = ("local", "dask")
# ptum.tune.PRUNERS (tune.pruner).
PRUNER_NAMES = ("median", "hyperband", "none")
# pretrain.device: what ptum.pretrain.options.pick_device passes on to torch.device.
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_NAMES = "auto | cpu | mps | cuda | cuda:N"
