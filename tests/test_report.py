"""The report's pre-training learning curves (read from each model's history.json)."""

import json

from ptum.report import learning_curves


def test_learning_curves_show_epochs_and_the_last_quarter_change(tmp_path):
    h = [{"epoch": e, "valid_mbp_acc": 0.2 + 0.05 * e, "valid_nbp_acc": 0.3} for e in range(1, 9)]
    (tmp_path / "hsa").mkdir()
    (tmp_path / "hsa" / "history.json").write_text(json.dumps(h))
    lines = learning_curves(
        {"hsa": tmp_path / "hsa" / "history.json", "han": tmp_path / "missing.json"}
    )
    row = next(line for line in lines if line.startswith("| HSA"))
    assert "1: 0.25 / 0.30" in row and "8: 0.60 / 0.30" in row
    assert row.endswith("| +10.0 |")  # epochs 6 -> 8: +0.10
    assert not any(line.startswith("| HAN") for line in lines)


def test_pretraining_speed_not_measured_is_a_dash_not_nan():
    from ptum.report import _speed

    assert _speed(None) == "—" and _speed(float("nan")) == "—"
    assert _speed(829.48) == "829"
