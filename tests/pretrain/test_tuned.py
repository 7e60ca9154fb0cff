"""`pretrain.use_tuned`: the tune stage's best_params.json is read with clear refusals."""

import json

import pytest

from ptum.pretrain.tuned import read_tuned


def test_tuned_values_are_read(tmp_path):
    path = tmp_path / "best_params.json"
    path.write_text(json.dumps({"k": 3, "lam": 0.5, "p": 4, "lr": 0.002, "number": 7}))
    assert read_tuned(path) == {"k": 3, "lam": 0.5, "p": 4, "lr": 0.002}


def test_a_study_without_a_task_to_score_on_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "best_params.json"
    why = "no label columns (the source has no labels table)"
    path.write_text(json.dumps({"available": False, "why_not": why}))
    with pytest.raises(ValueError, match="holds no tuned values") as e:
        read_tuned(path)
    assert why in str(e.value) and "use_tuned: false" in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("k", 2.5, "an integer >= 1 and < prepare.max_behaviors"),
        ("k", 200, r"an integer >= 1 and < prepare.max_behaviors \(100\)"),
        ("p", 0, "an integer >= 1"),
        ("lam", -1.0, "a finite number >= 0"),
        ("lr", -0.003, "a finite number > 0"),
        ("lr", 0, "a finite number > 0"),
    ],
)
def test_a_tuned_value_pretraining_cannot_use_is_refused_naming_the_file(
    tmp_path, key, value, expected
):
    # An edited best_params.json: `k: 2.5` indexed past the end, `k: 200` (> max_behaviors)
    # trained, `lr: -0.003` failed inside the optimizer without the file.
    path = tmp_path / "best_params.json"
    path.write_text(json.dumps({"k": 3, "lam": 0.5, "p": 4, "lr": 0.002} | {key: value}))
    with pytest.raises(ValueError, match=rf"best_params.json: {key} = .*expected {expected}"):
        read_tuned(path, max_behaviors=100)
