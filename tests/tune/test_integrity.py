"""The study a tune run reads back is checked: a damaged SQLite file and impossible stored values
end `ptum tune` with one line naming the file (and the trial), exit code 2, and never reach
best_params.json."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ptum.cli import main
from ptum.config import TuneConfig
from ptum.stages.tune import study_spec
from ptum.tune import StudyDamaged, StudySpec, check_store, check_values, open_study, run_trials

DB = Path("data/tune/optuna.db")  # tune.storage's default, relative to the project
SPACE = {
    "k": IntDistribution(1, 5),
    "lam": CategoricalDistribution([0.0, 0.25, 0.5, 1.0, 2.0, 4.0]),
    "p": IntDistribution(1, 16),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
}


def _spec(storage: str) -> StudySpec:
    """params.yaml's tune section, study "s" in `storage`, no pruner."""
    return replace(study_spec(TuneConfig(), study_name="s"), storage=storage, pruner="none")


@pytest.fixture(autouse=True)
def quiet_optuna():
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(before)


def _study(db: Path, values: list[float], name: str = "s") -> optuna.Study:
    """A study of complete trials with these values (and the tune stage's parameters)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{db}", study_name=name, direction="maximize", load_if_exists=True
    )
    for i, v in enumerate(values):
        params = {"k": 1 + i % 5, "lam": 0.5, "p": 4, "lr": 1e-3}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=SPACE, value=v, intermediate_values={1: v - 0.05}
            )
        )
    return study


def _sql(db: Path, statement: str, *args: object) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(statement, args)
    con.close()


def _set_value(db: Path, number: int, value: float) -> None:
    """What two changed bytes of the stored double do: another value, same row."""
    _sql(
        db,
        "UPDATE trial_values SET value = ? WHERE trial_id = "
        "(SELECT trial_id FROM trials WHERE number = ?)",
        value,
        number,
    )


_TRIAL_2 = "(SELECT trial_id FROM trials WHERE number = 2)"


def _garbage(data: bytes) -> bytes:
    return b"these are not the bytes of a database " * 200


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _page_size_flipped(data: bytes) -> bytes:
    # Byte 16 is the high byte of the page size in the 100-byte header.
    return data[:16] + bytes([data[16] ^ 0x01]) + data[17:]


def _magic_flipped(data: bytes) -> bytes:
    return bytes([data[0] ^ 0x01]) + data[1:]


def _tune(proj: Path, monkeypatch, capsys, *overrides: str) -> tuple[int, list[str]]:
    """`ptum tune` in `proj`; its exit code and its stderr lines."""
    monkeypatch.chdir(proj)
    monkeypatch.delenv("PTUM_DEBUG", raising=False)
    sets = [a for o in ("tune.study_name=s", *overrides) for a in ("--set", o)]
    if not (proj / "params.yaml").exists():
        (proj / "params.yaml").write_text("")  # every default
    rc = main(["tune", "--params", str(proj / "params.yaml"), *sets])
    return rc, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _page_size_flipped, _magic_flipped])
def test_a_damaged_study_file_ends_ptum_tune_with_one_line(damage, tmp_path, monkeypatch, capsys):
    _study(tmp_path / DB, [0.6, 0.7, 0.65])
    db = tmp_path / DB
    db.write_bytes(damage(db.read_bytes()))
    rc, err = _tune(tmp_path, monkeypatch, capsys)
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"ptum tune: error: {DB}: "), line
    assert "not a SQLite database" in line or "damaged SQLite database" in line
    assert f"mv {DB} {DB}.damaged" in line and f"dvc checkout {DB.parent}" in line
    assert not (tmp_path / "reports" / "tune" / "best_params.json").exists()


def test_damaged_rows_that_pass_the_integrity_check_are_named_too(tmp_path):
    db = tmp_path / "optuna.db"
    _study(db, [0.6, 0.7])
    # A flipped byte in a distribution's JSON: SQLite's structure is intact, Optuna's is not.
    _sql(db, "UPDATE trial_params SET distribution_json = substr(distribution_json, 2)")
    check_store(f"sqlite:///{db}")  # the file itself is sound
    spec = _spec(f"sqlite:///{db}")
    with pytest.raises(StudyDamaged, match=rf"^{db}: the study cannot be read \(JSONDecodeError"):
        open_study(spec, directions=["maximize"], attrs={}, epochs=2, worker=0)


def test_an_empty_or_missing_file_is_a_new_study(tmp_path):
    check_store(f"sqlite:///{tmp_path / 'missing.db'}")
    (tmp_path / "empty.db").touch()
    check_store(f"sqlite:///{tmp_path / 'empty.db'}")
    spec = _spec(f"sqlite:///{tmp_path / 'empty.db'}")
    study = open_study(spec, directions=["maximize"], attrs={}, epochs=2, worker=0)
    run_trials(study, lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_an_out_of_range_stored_value_is_refused_before_best_params(
    tiny_pipeline, tmp_path, monkeypatch, capsys
):
    for d in ("prepared", "tokenized"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / d).symlink_to(tiny_pipeline / d)
    _study(tmp_path / DB, [0.61, 0.58, 0.64])
    settings = ("tune.n_trials=3", "prepare.max_behaviors=20")
    # The study is full: a sound one goes straight to best_params.json (trial 2, 0.64).
    rc, err = _tune(tmp_path, monkeypatch, capsys, *settings)
    best = tmp_path / "reports" / "tune" / "best_params.json"
    assert rc == 0, err
    assert '"value": 0.64' in best.read_text()
    best.unlink()
    _set_value(tmp_path / DB, 1, 25206.15)
    rc, err = _tune(tmp_path, monkeypatch, capsys, *settings)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"ptum tune: error: {DB}: study 's', trial 1 (COMPLETE) holds ")
    assert "value of demo_valid_acc = 25206.15, outside [0, 1]" in err[0]
    assert not best.exists()


@pytest.mark.parametrize(
    ("table", "update", "what"),
    [
        ("trial_values", "value = -0.2", "value of demo_valid_acc = -0.2"),
        ("trial_values", "value = 1.5", "value of demo_valid_acc = 1.5"),
        ("trial_values", "value = NULL, value_type = 'INF_POS'", "value of demo_valid_acc = inf"),
        (
            "trial_intermediate_values",
            "intermediate_value = 3.0",
            "intermediate value of demo_valid_acc at epoch 1 = 3.0",
        ),
        (
            "trial_intermediate_values",
            "intermediate_value = NULL, intermediate_value_type = 'NAN'",
            "intermediate value of demo_valid_acc at epoch 1 = nan",
        ),
    ],
)
def test_impossible_or_non_finite_stored_values_are_refused(tmp_path, table, update, what):
    db = tmp_path / "optuna.db"
    study = _study(db, [0.6, 0.7, 0.65])
    url = f"sqlite:///{db}"
    check_values(study, url, ["demo_valid_acc"])  # sound
    _sql(db, f"UPDATE {table} SET {update} WHERE trial_id = {_TRIAL_2}")
    reread = optuna.load_study(study_name="s", storage=url)
    with pytest.raises(StudyDamaged, match=r"trial 2 \(COMPLETE\) holds ") as e:
        check_values(reread, url, ["demo_valid_acc"])
    assert what in str(e.value) and str(e.value).startswith(f"{db}: study 's'")


def test_a_stored_value_optuna_cannot_decode_is_named(tmp_path):
    db = tmp_path / "optuna.db"
    _study(db, [0.6, 0.7, 0.65])
    # A value type that says NaN beside a stored number: Optuna asserts on it.
    _sql(db, f"UPDATE trial_values SET value_type = 'NAN' WHERE trial_id = {_TRIAL_2}")
    url = f"sqlite:///{db}"
    with pytest.raises(StudyDamaged, match=rf"^{db}: the study cannot be read \(.*Error"):
        check_values(optuna.load_study(study_name="s", storage=url), url, ["demo_valid_acc"])


def test_objectives_of_no_known_metric_need_only_be_finite(tmp_path):
    db = tmp_path / "optuna.db"
    study = _study(db, [3.5, -2.0])
    check_values(study, f"sqlite:///{db}", ["loss"])
    with pytest.raises(StudyDamaged, match="outside"):
        check_values(study, f"sqlite:///{db}", ["demo_valid_macro_f1"])


def test_a_postgresql_password_is_not_shown(monkeypatch):
    from ptum.tune.integrity import store_name

    assert store_name("postgresql://ptum:s3cret@db.example/tune") == (
        "postgresql://ptum:***@db.example/tune"
    )
