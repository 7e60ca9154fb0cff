from pathlib import Path

import pytest

from ptum.config import ConfigError, DataConfig, build, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "synthetic"
    assert p.prepare.label_ratios == (0.2, 0.5, 1.0)
    assert p.tokenize.max_tokens == 30


def test_unknown_key_is_rejected(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  sorce: synthetic\n")
    with pytest.raises(ConfigError, match=r"params.yaml:data: unknown key\(s\) \['sorce'\]"):
        load_params(f)


def test_unknown_section_is_rejected(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("tokenise:\n  vocab_size: 10\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_params(f)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prepare.max_behaviors=abc", "expected an integer"),
        ("prepare.max_behaviors=true", "expected an integer"),
        ("data.source=csv", "is not one of"),
        ("prepare.demo_split=[0.8, 0.2]", "expected 3 items"),
        ("tokenize.byte_fallback=1", "expected true/false"),
        ("prepare.nope=1", "unknown key"),
        ("nosection.key=1", "unknown section"),
        ("justakey", "expected section.key=value"),
    ],
)
def test_bad_overrides(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "missing.yaml", [override])


def test_overrides_apply_and_coerce(tmp_path):
    p = load_params(
        tmp_path / "missing.yaml",
        [
            "prepare.max_behaviors=50",
            "prepare.ctr_test_frac=1e-1",
            "data.age_edges=[20, 40]",
            "data.path=../x",
        ],
    )
    assert p.prepare.max_behaviors == 50
    assert p.prepare.ctr_test_frac == 0.1
    assert p.data.age_edges == (20, 40)
    assert p.data.path == "../x"


def test_configs_are_frozen():
    cfg = build(DataConfig, {"size": "tiny"}, "test")
    with pytest.raises(AttributeError):
        cfg.size = "default"  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.batch_size=0", "pretrain.batch_size = 0"),
        ("pretrain.epochs=-2", "pretrain.epochs = -2"),
        ("pretrain.model.dim=0", "pretrain.model.dim = 0"),
        ("pretrain.p=0", "pretrain.p = 0"),
        ("pretrain.lr=0", "pretrain.lr = 0"),
        ("pretrain.model.dropout=1.0", "pretrain.model.dropout = 1.0"),
        ("pretrain.k=100", "pretrain.k = 100"),  # >= prepare.max_behaviors
        ("finetune.repeats=0", "finetune.repeats = 0"),
        ("finetune.ratios=[0.3]", "finetune.ratios = (0.3,)"),  # not a prepared subset
        ("finetune.class_weights=[inverse]", "finetune.class_weights"),
        ("finetune.workers=0", "finetune.workers = 0"),
        ("sensitivity.ratio=0.3", "sensitivity.ratio = 0.3"),
    ],
)
def test_out_of_range_params_name_the_key_value_and_range(override, key):
    with pytest.raises(ConfigError, match="out of range: must be") as e:
        load_params(ROOT / "params.yaml", [override])
    assert str(e.value).startswith(key)


def test_override_below_a_scalar_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"pretrain.lr is a value .* not a section"):
        load_params(ROOT / "params.yaml", ["pretrain.lr.x=1"])
