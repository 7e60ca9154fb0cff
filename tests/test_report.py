"""The report's pre-training learning curves (read from each model's history.json)."""

import json

from ptum.data.verified import write_manifest
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


def test_a_task_that_was_not_available_is_a_section_that_says_why(tmp_path):
    from ptum.report import build

    why = "no label columns (the source has no labels table)"
    (tmp_path / "demo.json").write_text(json.dumps({"available": False, "why_not": why}))
    sens = {"demo": {"model": "hsa", "metric": "acc", "ratio": 0.2, "available": False}}
    sens["demo"].update(why_not=why, experiments={})
    (tmp_path / "sensitivity.json").write_text(json.dumps(sens))
    data = {"behaviors": {"users": 6, "rows_kept": 30, "items": 9}}
    data.update(labels={"rows_kept": 0}, impressions={})
    (tmp_path / "report.json").write_text(json.dumps(data))
    write_manifest(tmp_path, "prepare")
    text = build(
        finetune={"demo": tmp_path / "demo.json", "ctr": tmp_path / "absent.json"},
        sensitivity=tmp_path / "sensitivity.json",
        pretrain={},
        data_report=tmp_path / "report.json",
        raw_manifest=tmp_path / "absent_manifest.json",
        params={},
        out=tmp_path / "results.md",
    )
    demo = text.split("## Demographic prediction (cf. paper Table 2)\n", 1)[1]
    assert demo.lstrip().startswith(f"Not available on this data: {why}.")
    assert f"demo: not available on this data: {why}." in text
    assert "## CTR" not in text  # a task that was not run at all is left out


def test_the_revision_is_marked_dirty_by_code_changes_only(tmp_path):
    import subprocess

    from ptum.report import _git_rev

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    code = tmp_path / "ptum"
    code.mkdir()
    (code / "m.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    rev = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (tmp_path / "dvc.lock").write_text("b\n")  # the run's own output: not a code change
    assert _git_rev(code) == rev
    (code / "m.py").write_text("x = 2\n")
    assert _git_rev(code) == f"{rev} (with uncommitted changes to ptum/)"
    assert _git_rev(tmp_path / "missing") == "unknown"
