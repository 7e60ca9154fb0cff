"""Typed configuration: one frozen dataclass per `params.yaml` section.

Only stage entry points (`ptum.stages`) read configuration; library functions take explicit
arguments. Loading rejects unknown keys, keys given twice, wrong types and values out of range
with a message naming the section and key, so a typo in `params.yaml` or in a
`--set section.key=value` override fails loudly instead of being ignored.

Defaults: the root `params.yaml` chooses every default and lists every key; the dataclass
defaults are the same values (tests/test_config.py compares them key by key), so library code
and tests that build a config without a file get what the pipeline gets.

Modules, one job each:
    schema     `Params` (every section, the constraints between them) and `SECTIONS`
    data       the `data`, `prepare` and `tokenize` sections (each key documented), their checks
    pretrain   the `pretrain` section and its encoder sizes (`ModelParams`), their checks
    finetune   the `finetune`, `sensitivity` and `regime` sections, their checks
    tune       the `tune` section, its range checks and the names it may take
    serving    the `export` and `embed` sections
    names      the names an enumerated key may take
    load       `load_params`: YAML -> checked dataclasses; `build`, `to_dict`
    overrides  `--set section.key=value` parsing and application
    errors     `ConfigError`
"""

from ptum.config.data import DataConfig, PrepareConfig, TokenizeConfig
from ptum.config.errors import ConfigError
from ptum.config.finetune import FinetuneConfig, RegimeConfig, SensitivityConfig
from ptum.config.load import build, load_params, to_dict
from ptum.config.overrides import parse_override
from ptum.config.pretrain import ModelParams, PretrainConfig
from ptum.config.schema import SECTIONS, Params
from ptum.config.serving import EmbedConfig, ExportConfig
from ptum.config.tune import TuneConfig

__all__ = [
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "EmbedConfig",
    "ExportConfig",
    "FinetuneConfig",
    "ModelParams",
    "Params",
    "PrepareConfig",
    "PretrainConfig",
    "RegimeConfig",
    "SensitivityConfig",
    "TokenizeConfig",
    "TuneConfig",
    "build",
    "load_params",
    "parse_override",
    "to_dict",
]
