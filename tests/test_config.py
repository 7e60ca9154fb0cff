import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from ptum.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    Params,
    TuneConfig,
    build,
    load_params,
    names,
    to_dict,
)
from ptum.config.names import ARCHITECTURE_NAMES, PRUNER_NAMES

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
        (  # an address without executor dask would be ignored
            "finetune.scheduler_address=tcp://h:8786",
            "finetune.scheduler_address = 'tcp://h:8786'",
        ),
        ("sensitivity.ratio=0.3", "sensitivity.ratio = 0.3"),
        ("prepare.max_behaviors=1", "prepare.max_behaviors = 1"),
        ("prepare.chunk_rows=0", "prepare.chunk_rows = 0"),
        ("prepare.demo_split=[0.5, 0.5, 0.5]", "prepare.demo_split = (0.5, 0.5, 0.5)"),
        ("prepare.label_ratios=[0.2, 1.5]", "prepare.label_ratios = (0.2, 1.5)"),
        ("prepare.ctr_test_frac=0.9", "prepare.ctr_train_frac, ctr_test_frac = (0.15, 0.9)"),
        ("prepare.ctr_train_frac=0", "prepare.ctr_train_frac, ctr_test_frac = (0.0, 0.1)"),
        ("prepare.ctr_valid_frac=1", "prepare.ctr_valid_frac = 1.0"),
        ("prepare.ctr_valid_frac=0", "prepare.ctr_valid_frac = 0.0"),  # no epoch selection
        ("prepare.pretrain_valid_frac=-0.1", "prepare.pretrain_valid_frac = -0.1"),
        ("prepare.pretrain_valid_frac=0", "prepare.pretrain_valid_frac = 0.0"),
        ("prepare.label_ratios=[0.5, 0.2, 1.0]", "prepare.label_ratios = (0.5, 0.2, 1.0)"),
        ("prepare.label_ratios=[0.2, 0.2, 1.0]", "prepare.label_ratios = (0.2, 0.2, 1.0)"),
        ("prepare.label_ratios=[0.2, 0.201, 1.0]", "prepare.label_ratios = (0.2, 0.201, 1.0)"),
        ("prepare.label_ratios=[0.2, 0.5]", "prepare.label_ratios = (0.2, 0.5)"),  # no 1.0
        ("prepare.label_ratios=[.nan, 1.0]", "prepare.label_ratios = (nan, 1.0)"),
        ("prepare.label_ratios=[]", "prepare.label_ratios = ()"),
        ("tokenize.max_tokens=0", "tokenize.max_tokens = 0"),
        ("tokenize.vocab_size=0", "tokenize.vocab_size = 0"),
        ("tokenize.character_coverage=0.5", "tokenize.character_coverage = 0.5"),
        ("data.age_edges=[40, 20]", "data.age_edges = (40, 20)"),
        ("data.age_edges=[]", "data.age_edges = ()"),
        ("export.example_batch=1", "export.example_batch = 1"),
        ("export.example_tokens=0", "export.example_tokens = 0"),
        ("embed.batch_size=0", "embed.batch_size = 0"),
    ],
)
def test_out_of_range_params_name_the_key_value_and_range(override, key):
    with pytest.raises(ConfigError, match="out of range: must be") as e:
        load_params(ROOT / "params.yaml", [override])
    assert str(e.value).startswith(key)


SEEDS = ["data.seed", "prepare.seed", "tokenize.seed", "pretrain.seed", "finetune.seed"]
SEEDS += ["tune.seed", "export.head_seed"]


def _seed_keys(cls: type, prefix: str) -> set[str]:
    return {f"{prefix}.{k}" for k in _keys(cls) if k == "seed" or k.endswith("_seed")}


def test_the_seed_table_lists_every_seed_key():
    assert set(SEEDS) == set().union(*(_seed_keys(c, s) for s, c in SECTIONS.items()))


@pytest.mark.parametrize("key", SEEDS)
@pytest.mark.parametrize("bad", [-1, 2**31])
def test_every_seed_is_checked_when_params_load(tmp_path, key, bad):
    with pytest.raises(ConfigError, match=r"out of range: must be an integer in \[0, ") as e:
        load_params(tmp_path / "none.yaml", [f"{key}={bad}"])
    assert str(e.value).startswith(f"{key} = {bad} "), str(e.value)


def test_edge_values_that_are_valid_load(tmp_path):
    p = load_params(
        tmp_path / "none.yaml",
        [
            "prepare.label_ratios=[1.0]",
            "finetune.ratios=[1.0]",
            "sensitivity.ratio=1.0",
            "regime.ratios=[1.0]",
            "prepare.ctr_train_frac=0.5",
            "prepare.ctr_test_frac=0.5",  # no history window
            "prepare.ctr_valid_frac=0.99",
            "tokenize.max_tokens=1",
            "tokenize.character_coverage=1",
            "data.seed=0",
            "data.age_edges=[30]",
            f"pretrain.seed={2**31 - 1}",
        ],
    )
    assert p.prepare.label_ratios == (1.0,) and p.pretrain.seed == 2**31 - 1


def test_per_user_ctr_windows_are_refused_when_params_load():
    with pytest.raises(ConfigError, match="prepare.ctr_windows='per_user' is refused: .* future"):
        load_params(ROOT / "params.yaml", ["prepare.ctr_windows=per_user"])


def test_override_below_a_scalar_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"pretrain.lr is a value .* not a section"):
        load_params(ROOT / "params.yaml", ["pretrain.lr.x=1"])


def _keys(cls: type, prefix: str = "") -> set[str]:
    """Every key of a config dataclass, nested sections as dotted paths."""
    keys = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys |= _keys(hint, f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def _flat(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in raw.items():
        keys |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return keys


def test_params_yaml_sets_every_key():
    """The root params.yaml is where every default is chosen (and documented): it lists every
    key of every section, so none silently takes a value from code."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for section, cls in SECTIONS.items():
        missing = _keys(cls) - _flat(raw.get(section) or {})
        assert not missing, f"params.yaml: {section} lacks {sorted(missing)}"


def test_dataclass_defaults_equal_params_yaml():
    """The dataclass defaults (what library code and tests get without a params file) are the
    values of the root params.yaml, key by key: one default per key, not two."""
    shipped = to_dict(load_params(ROOT / "params.yaml"))
    defaults = to_dict(Params())
    differ = {
        f"{s}.{k}": (defaults[s][k], shipped[s][k])
        for s in shipped
        for k in shipped[s]
        if defaults[s][k] != shipped[s][k]
    }
    assert not differ, f"ptum/config.py default vs params.yaml: {differ}"


def test_a_missing_params_file_means_the_shipped_defaults(tmp_path, capsys):
    assert load_params(tmp_path / "missing.yaml") == load_params(ROOT / "params.yaml")
    # ... said on stderr: a run from the wrong directory must not look like a normal one.
    err = capsys.readouterr().err
    assert err == (
        f"ptum: no missing.yaml in {tmp_path}: using the built-in defaults "
        "(run ptum from the project root)\n"
    )


def test_a_missing_params_file_named_by_the_user_is_an_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"typo.yaml: no such params file; check the path"):
        load_params(tmp_path / "typo.yaml", required=True)
    assert capsys.readouterr().err == ""


def test_a_directory_is_not_a_params_file(tmp_path):
    with pytest.raises(ConfigError, match=r": is a directory; name the params file itself"):
        load_params(tmp_path, required=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "prepare:\n  max_behaviors: 10\n  seed: 3\n  max_behaviors: 20\n",
            r"params.yaml:4: key 'max_behaviors' appears twice in section prepare "
            r"\(also line 2\): keep one$",
        ),
        (
            "prepare:\n  max_behaviors: 10\ndata:\n  seed: 1\nprepare:\n  seed: 3\n",
            r"params.yaml:5: section 'prepare' appears twice \(also line 1\): keep one",
        ),
        (
            "pretrain:\n  model: {dim: 8, dim: 9}\n",
            r"params.yaml:2: key 'dim' appears twice in section pretrain.model \(also line 2\)",
        ),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, message):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(f)


def test_the_same_key_in_two_sections_is_fine(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  seed: 1\nprepare:\n  seed: 2\n")
    p = load_params(f)
    assert (p.data.seed, p.prepare.seed) == (1, 2)


def test_a_params_file_that_is_not_utf8_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes("data:\n  path: café\n".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=r"params.yaml: not UTF-8 text \(byte 0xe9 at offset 17\)"
    ):
        load_params(f)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  source: synthetic\n  size: [tiny\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML: .*line 4"):
        load_params(f)


# ---------------------------------------------------------------- the tune section


@pytest.mark.parametrize(
    "override, key",
    [
        ("tune.arch=bert", "tune.arch = 'bert'"),
        ("tune.n_trials=-1", "tune.n_trials = -1"),
        ("tune.n_trials=0", "tune.n_trials = 0"),
        ("tune.workers=0", "tune.workers = 0"),
        ("tune.seed=-1", "tune.seed = -1"),
        ("tune.seed=4294967296", "tune.seed = 4294967296"),
        ("tune.epochs=-1", "tune.epochs = -1"),
        ("tune.finetune_epochs=0", "tune.finetune_epochs = 0"),
        ("tune.k=[0, 3]", "tune.k = (0, 3)"),
        ("tune.k=[4, 2]", "tune.k = (4, 2)"),
        ("tune.k=[1, 100]", "tune.k = (1, 100)"),  # >= prepare.max_behaviors
        ("tune.lam=[]", "tune.lam = ()"),
        ("tune.lam=[0, -1]", "tune.lam = (0.0, -1.0)"),
        ("tune.lam=[1, 1]", "tune.lam = (1.0, 1.0)"),
        ("tune.lam=[.nan]", "tune.lam = (nan,)"),
        ("tune.p=[0, 4]", "tune.p = (0, 4)"),
        ("tune.p=[8, 2]", "tune.p = (8, 2)"),
        ("tune.lr=[0, 0.01]", "tune.lr = (0.0, 0.01)"),
        ("tune.lr=[0.01, 0.001]", "tune.lr = (0.01, 0.001)"),
        ("tune.lr=[0.01, 0.01]", "tune.lr = (0.01, 0.01)"),
        ("tune.lr=[1e-4, .inf]", "tune.lr = (0.0001, inf)"),
        ("tune.prune_startup_trials=-1", "tune.prune_startup_trials = -1"),
        ("tune.storage=data/tune/optuna.db", "tune.storage = 'data/tune/optuna.db'"),
        ("tune.storage=''", "tune.storage = ''"),
        ("tune.storage='sqlite:///:memory:'", "tune.storage = 'sqlite:///:memory:'"),
        ("tune.study_name=' s'", "tune.study_name = ' s'"),
        ("tune.heartbeat_interval=0", "tune.heartbeat_interval = 0"),
        ("tune.grace_period=0", "tune.grace_period = 0"),
        ("tune.grace_period=60", "tune.grace_period = 60"),  # = heartbeat_interval
        ("tune.retry_killed=-1", "tune.retry_killed = -1"),
    ],
)
def test_out_of_range_tune_params_name_the_key(override, key):
    with pytest.raises(ConfigError, match="out of range: must be") as e:
        load_params(ROOT / "params.yaml", [override])
    assert str(e.value).startswith(key), str(e.value)


def test_tune_keys_of_another_type_or_name_are_refused():
    with pytest.raises(ConfigError, match=r"tune.pruner: 'asha' is not one of"):
        load_params(ROOT / "params.yaml", ["tune.pruner=asha"])
    with pytest.raises(ConfigError, match=r"tune.multi_objective: expected true/false"):
        load_params(ROOT / "params.yaml", ["tune.multi_objective=1"])
    # Built without the loader (as library code and tests do), the dataclass checks itself.
    with pytest.raises(ConfigError, match=r"^tune.pruner = 'asha' is out of range"):
        TuneConfig(pruner="asha")  # type: ignore[arg-type]


def test_tune_edge_values_that_are_valid_load():
    p = load_params(
        ROOT / "params.yaml",
        [
            "tune.k=[3, 3]",  # a fixed K
            "tune.p=[1, 1]",
            "tune.lam=[0]",
            "tune.prune_startup_trials=0",
            "tune.retry_killed=0",
            "tune.heartbeat_interval=1",
            "tune.grace_period=2",
            "tune.storage=postgresql://user@host/db",
            "tune.arch=bert4rec",
        ],
    )
    assert (p.tune.k, p.tune.p, p.tune.lam) == ((3, 3), (1, 1), (0.0,))
    assert p.tune.storage == "postgresql://user@host/db" and p.tune.arch == "bert4rec"


def test_tune_names_agree_with_the_models_and_pruners():
    from ptum.models import ARCHITECTURES
    from ptum.tune import PRUNERS

    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    assert PRUNER_NAMES == PRUNERS
    assert typing.get_args(typing.get_type_hints(TuneConfig)["pruner"]) == PRUNERS


def test_the_configs_name_lists_equal_the_librarys():
    """ptum.config.names repeats lists the config layer may not import; each equals its source."""
    from ptum.data.synthetic import PRESETS
    from ptum.finetune.executors import EXECUTORS
    from ptum.finetune.options import MODES
    from ptum.finetune.summary import METRICS
    from ptum.models import ARCHITECTURES, BEHAVIOR_ENCODERS

    assert set(names.ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    assert set(names.BEHAVIOR_ENCODER_NAMES) == set(BEHAVIOR_ENCODERS)
    assert set(names.SYNTHETIC_SIZES) == set(PRESETS)
    assert names.MODE_NAMES == MODES
    assert set(names.TASK_NAMES) == set(METRICS)
    assert names.EXECUTOR_NAMES == EXECUTORS


# One bad value for every enumerated key: refused when params load, naming the key and the
# values it may take.
ENUMERATED = [
    ("data.source", "csv", "synthetic"),
    ("data.size", "huge", "small"),
    ("data.movielens_variant", "ml-20m", "ml-100k"),
    ("prepare.on_bad_rows", "skip", "quarantine"),
    ("prepare.on_duplicates", "keep", "drop"),
    ("prepare.ctr_windows", "per_item", "global"),
    ("tokenize.model_type", "wordpiece", "unigram"),
    ("pretrain.architectures", "[hsa, sasrec]", "hsa"),
    ("pretrain.behavior_encoder", "transformer", "selfattn"),
    ("pretrain.negatives", "hard", "popularity"),
    ("pretrain.device", "gpu", "auto"),
    ("finetune.demo_models", "[hsa, hsa2]", "hsa"),
    ("finetune.ctr_models", "[deepfm]", "nativectr"),
    ("finetune.modes", "[scratch, linear]", "frozen"),
    ("finetune.ctr_scoring", "cosine", "dot"),
    ("finetune.demo_select", "auc", "acc"),
    ("finetune.class_weights", "[inverse]", "balanced"),
    ("finetune.executor", "ray", "dask"),
    ("sensitivity.tasks", "[demo, age]", "ctr"),
    ("sensitivity.demo_model", "lstm", "hsa"),
    ("sensitivity.ctr_model", "din", "nativectr"),
    ("tune.arch", "sasrec", "bert4rec"),
    ("tune.pruner", "asha", "hyperband"),
]


@pytest.mark.parametrize(("key", "bad", "allowed"), ENUMERATED, ids=[e[0] for e in ENUMERATED])
def test_every_enumerated_key_is_checked_when_params_load(tmp_path, key, bad, allowed):
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "none.yaml", [f"{key}={bad}"])
    message = str(e.value)
    assert key in message and allowed in message, message


@pytest.mark.parametrize(
    ("key", "empty"),
    [
        ("pretrain.architectures", "[]"),
        ("finetune.modes", "[]"),
        ("finetune.demo_models", "[]"),
        ("sensitivity.tasks", "[]"),
        ("finetune.modes", "[frozen, frozen]"),
    ],
)
def test_enumerated_lists_are_non_empty_and_distinct(tmp_path, key, empty):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(tmp_path / "none.yaml", [f"{key}={empty}"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_devices_that_torch_takes_load(tmp_path, device):
    assert (
        load_params(tmp_path / "none.yaml", [f"pretrain.device={device}"]).pretrain.device == device
    )


def test_params_yaml_comments_list_the_allowed_values():
    """params.yaml's comment beside an enumerated key names every value the key may take."""
    comments: dict[str, str] = {}
    section, above = "", ""  # a comment line belongs to the key below it
    for line in (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines():
        head, _, comment = line.partition("#")
        if not head.strip():
            above += comment
            continue
        if not line[0].isspace():
            section = head.split(":")[0]
        comments[f"{section}.{head.split(':')[0].strip()}"] = above + comment
        above = ""
    lists = {
        "data.source": typing.get_args(typing.get_type_hints(DataConfig)["source"]),
        "data.size": names.SYNTHETIC_SIZES,
        "prepare.on_bad_rows": ("error", "quarantine"),
        "prepare.on_duplicates": ("drop", "error"),
        "prepare.ctr_windows": ("global", "per_user"),
        "tokenize.model_type": ("unigram", "bpe", "char", "word"),
        "pretrain.architectures": names.ARCHITECTURE_NAMES,
        "pretrain.behavior_encoder": names.BEHAVIOR_ENCODER_NAMES,
        "pretrain.negatives": ("popularity", "uniform"),
        "pretrain.device": ("auto", "cpu", "mps", "cuda"),
        "finetune.modes": names.MODE_NAMES,
        "finetune.demo_select": ("acc", "macro_f1"),
        "finetune.class_weights": names.CLASS_WEIGHT_NAMES,
        "finetune.executor": names.EXECUTOR_NAMES,
        "finetune.ctr_scoring": ("dot", "bias"),
        "sensitivity.tasks": names.TASK_NAMES,
        "tune.pruner": names.PRUNER_NAMES,
    }
    for key, allowed in lists.items():
        missing = [v for v in allowed if v not in comments.get(key, "")]
        assert not missing, f"params.yaml's comment on {key} does not name {missing}"


@pytest.mark.parametrize(
    "path", [ROOT / "params.yaml", *sorted((ROOT / "experiments").glob("*/params.yaml"))]
)
def test_committed_params_files_load(path):
    p = load_params(path)
    assert p.tune.n_trials >= 1 and p.tune.k[1] < p.prepare.max_behaviors
