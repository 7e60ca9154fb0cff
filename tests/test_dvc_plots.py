"""`dvc plots show` draws the charts dvc.yaml means: categorical sweeps with every label and no
smoothing, pre-training curves of this run's models only, the PNG figures as images.

Runs DVC on a copy of dvc.yaml, params.yaml (pretrain.architectures cut to one model) and the
plot template, with small plot files written here, plus a stale history of a model that did not
run: it must not be drawn.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_plots_show_draws_the_intended_charts(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["pretrain"]["architectures"] = ["hsa"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")

    history = [{"epoch": e, "valid_mbp_acc": 0.2 + e / 10, "valid_loss": 3 - e} for e in (1, 2)]
    _write_json(tmp_path / "reports/pretrain/hsa/history.json", history)
    _write_json(tmp_path / "reports/pretrain/han/history.json", history)  # stale: han did not run
    sweep = [{"x": x, "age": 0.4, "gender": 0.6} for x in ("none", "MBP", "NBP", "MBP+NBP")]
    for name in ("demo_ablation", "demo_lambda", "demo_k"):
        _write_json(tmp_path / f"reports/plots/{name}.json", sweep)
    (tmp_path / "reports/figures").mkdir(parents=True)
    shutil.copy(ROOT / ".dvc/plots/categorical.json", tmp_path / "reports/figures/x.png")

    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(shown)
    assert not data.get("errors"), data["errors"]
    plots = {path: renders[0] for path, renders in data["data"].items()}

    pretrain = [p for p in plots if p.startswith("reports/pretrain/")]
    assert pretrain == ["reports/pretrain/hsa/history.json"], pretrain
    assert "loess" not in json.dumps(plots[pretrain[0]]["content"])

    for name in ("demo_ablation", "demo_lambda", "demo_k"):
        (key,) = [p for p in plots if p.endswith(f"reports/plots/{name}.json")]
        content = plots[key]["content"]
        assert plots[key]["type"] == "vega"
        assert content["encoding"]["x"]["type"] in ("ordinal", "nominal"), content["encoding"]
        assert "loess" not in json.dumps(content) and "transform" not in content
        values = content["data"]["values"]
        assert {v["field"] for v in values} == {"age", "gender"}  # every label, not only one
        assert [v["x"] for v in values if v["field"] == "age"] == [s["x"] for s in sweep]

    assert plots["reports/figures/x.png"]["type"] == "image"
