"""The schema: every `params.yaml` section's frozen dataclass, `Params` holding them all with
the constraints between sections, and `SECTIONS`, the loader's section -> dataclass table.

Each section's dataclass, with its range checks and each key's documentation, lives in the
module of its stages: `data` (ingest, prepare, tokenize), `pretrain`, `finetune` (finetune,
sensitivity, regime), `tune` and `serving` (export, embed). Their defaults are the root
params.yaml's values (tests/test_config.py checks that key by key): params.yaml is where a
default is chosen. Every enumerated key is checked when params load: a `Literal` type by the
loader, a list of names (`ptum.config.names`) in the section's checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ptum.config.data import DataConfig, PrepareConfig, TokenizeConfig
from ptum.config.errors import require
from ptum.config.finetune import FinetuneConfig, RegimeConfig, SensitivityConfig
from ptum.config.pretrain import PretrainConfig
from ptum.config.serving import EmbedConfig, ExportConfig
from ptum.config.tune import TuneConfig


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
