"""The sensitivity plan, on small hand-made inputs."""

import json

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


def test_run_pretrains_only_the_variants_the_main_model_is_not(tiny_pipeline, tmp_path):
    """λ = 1, K = 2 is the main pre-training (its checkpoints are reused); MBP only, NBP only
    and λ = 0 (= MBP only) are pre-trained once each; every experiment aggregates its cells."""
    from ptum.config import FinetuneConfig, ModelParams, PretrainConfig, SensitivityConfig
    from ptum.finetune.sensitivity import run
    from ptum.pretrain.stage import run_stage as pretrain_stage

    sizes = ModelParams(word_dim=8, dim=8, heads=2, head_dim=4, attn_hidden=8, layers=1)
    pre = PretrainConfig(architectures=("hsa",), model=sizes, epochs=1, batch_size=32)
    data = dict(
        prepared=tiny_pipeline / "prepared", tokenized=tiny_pipeline / "tokenized", max_behaviors=20
    )
    main = tmp_path / "pretrain"
    pretrain_stage(pre, "hsa", out_dir=main / "hsa", report_dir=tmp_path / "r", **data)
    ft = FinetuneConfig(max_epochs=1, head_hidden=8, workers=1, class_weights=("none",))
    opts = SensitivityConfig(lams=(0.0, 1.0), ks=(2,), ratio=1.0, repeats=2)
    res = run(
        pre,
        ft,
        opts,
        models_root=tmp_path / "sensitivity",
        main_ckpts=main,
        cache_dir=tmp_path / "cache",
        reports=tmp_path / "reports",
        **data,
    )
    pretrained = sorted(p.name for p in (tmp_path / "sensitivity").iterdir())
    assert pretrained == ["mbp_only", "nbp_only_k2"]
    exps = res["demo"]["experiments"]
    assert set(exps) == {"mbp_only", "nbp_only", "both", "lam=0", "lam=1", "K=2", "none"}
    assert exps["lam=0"]["variant"] == "mbp_only" and exps["both"]["variant"] == "both_lam1_k2"
    # Shared pre-trainings give the same cells: identical aggregates.
    assert exps["lam=0"]["mean"] == exps["mbp_only"]["mean"]
    assert exps["lam=1"]["mean"] == exps["both"]["mean"] == exps["K=2"]["mean"]
    labels = {k.removesuffix("_mean") for k in exps["none"] if k.endswith("_mean")}
    for e in exps.values():
        assert e["n"] == opts.repeats * len(labels) and 0 < e["mean"] < 1


def test_tasks_the_data_does_not_allow_are_skipped_with_the_reason(behaviors_only, tmp_path):
    """No label, no impression: no variant is pre-trained, no cell runs, each task says why,
    and the stage's outputs are still written."""
    from ptum.config import FinetuneConfig, PretrainConfig, SensitivityConfig
    from ptum.finetune.sensitivity import run, write_outputs

    opts = SensitivityConfig(tasks=("demo", "ctr"), lams=(0.0, 1.0), ks=(2,), repeats=2)
    res = run(
        PretrainConfig(architectures=("hsa",)),
        FinetuneConfig(workers=1),
        opts,
        prepared=behaviors_only / "prepared",
        tokenized=tmp_path / "never_read",
        max_behaviors=4,
        models_root=tmp_path / "sensitivity",
        main_ckpts=tmp_path / "never_read",
        cache_dir=tmp_path / "cache",
        reports=tmp_path / "reports",
    )
    assert res["demo"]["available"] is False and res["ctr"]["available"] is False
    assert res["demo"]["why_not"] == "no label columns (the source has no labels table)"
    assert res["ctr"]["why_not"].startswith("no impressions")
    assert res["demo"]["experiments"] == res["ctr"]["experiments"] == {}
    assert not list((tmp_path / "sensitivity").iterdir())
    write_outputs(res, tmp_path / "reports")
    assert json.loads((tmp_path / "reports" / "sensitivity" / "metrics.json").read_text()) == {
        "demo": {},
        "ctr": {},
    }
    assert not list((tmp_path / "reports" / "figures").iterdir())
