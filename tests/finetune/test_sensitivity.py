"""The sensitivity plan, on small hand-made inputs."""

from ptum.config import PretrainConfig, SensitivityConfig
from ptum.finetune.sensitivity import _variant_config, plan


def test_sensitivity_plan_shares_identical_pretrainings():
    pre = PretrainConfig(k=2, lam=1.0)
    opts = SensitivityConfig(
        tasks=("demo",),
        demo_model="hsa",
        ctr_model="bert4rec",
        lams=(0.0, 1.0, 4.0),
        ks=(1, 2),
        ratio=0.2,
        repeats=2,
    )
    p = plan(pre, opts)
    # λ = 0 is MBP only; the default λ and K are the "both" run.
    assert p["lam=0"]["variant"] == p["mbp_only"]["variant"] == "mbp_only"
    assert p["lam=1"]["variant"] == p["K=2"]["variant"] == p["both"]["variant"]
    assert len({e["variant"] for e in p.values()}) == 5  # mbp, nbp, both, lam4, K1
    assert _variant_config(pre, p["both"]["variant"]) == pre  # reuses the main checkpoint
    v = _variant_config(pre, p["nbp_only"]["variant"])
    assert (v.mbp, v.nbp, v.k) == (False, True, 2)
    assert _variant_config(pre, p["lam=4"]["variant"]).lam == 4.0


def test_outputs_hold_a_small_headline_metrics_file(tmp_path):
    import json

    from ptum.finetune.sensitivity import write_outputs

    exp = {"group": "ablation", "variant": "v", "gender_mean": 0.61, "gender_std": 0.02}
    results = {
        "demo": {
            "model": "hsa",
            "metric": "acc",
            "ratio": 0.2,
            "experiments": {
                x: exp | {"x": x, "mean": 0.6 + i / 100}
                for i, x in enumerate(["none", "MBP", "NBP", "MBP+NBP"])
            },
        }
    }
    write_outputs(results, tmp_path)
    headline = json.loads((tmp_path / "sensitivity" / "metrics.json").read_text())
    assert headline == {"demo": {"none": 0.6, "MBP": 0.61, "NBP": 0.62, "MBP+NBP": 0.63}}
    full = json.loads((tmp_path / "sensitivity.json").read_text())
    assert full["demo"]["experiments"]["MBP"]["gender_std"] == 0.02
    assert (tmp_path / "figures" / "demo_ablation.png").stat().st_size > 0
