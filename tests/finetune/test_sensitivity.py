"""The sensitivity experiments: the plan on small hand-made inputs, the outputs, and a run on
the tiny data."""

import json
from dataclasses import replace

from ptum.config import FinetuneConfig, ModelParams, Params, PretrainConfig, SensitivityConfig
from ptum.finetune.sensitivity import Sweep, Variant, plan, run, variant_of, write_outputs
from ptum.stages.finetune import grid_options
from ptum.stages.pretrain import pretrain_one
from ptum.stages.sensitivity import sweep
from tests.finetune.conftest import SPLIT

MAIN = Variant(mbp=True, nbp=True, lam=1.0, k=2)


def _sweep(**kw) -> Sweep:
    return Sweep(
        **{
            "models": {"demo": "hsa"},
            "main": MAIN,
            "lams": (0.0, 1.0),
            "ks": (2,),
            "ratio": 1.0,
            "repeats": 2,
        }
        | kw
    )


def test_sensitivity_plan_shares_identical_pretrainings():
    p = plan(_sweep(lams=(0.0, 1.0, 4.0), ks=(1, 2)))
    # λ = 0 is MBP only; the default λ and K are the "both" run.
    assert p["lam=0"]["variant"] == p["mbp_only"]["variant"] == "mbp_only"
    assert p["lam=1"]["variant"] == p["K=2"]["variant"] == p["both"]["variant"]
    assert len({e["variant"] for e in p.values()}) == 5  # mbp, nbp, both, lam4, K1
    assert variant_of(MAIN, p["both"]["variant"]) == MAIN  # reuses the main checkpoint
    assert variant_of(MAIN, p["nbp_only"]["variant"]) == Variant(False, True, 1.0, 2)
    assert variant_of(MAIN, p["lam=4"]["variant"]) == Variant(True, True, 4.0, 2)
    assert variant_of(MAIN, p["K=1"]["variant"]) == Variant(True, True, 1.0, 1)


def test_the_stage_builds_the_sweep_from_its_sections():
    p = Params(
        pretrain=PretrainConfig(mbp=True, nbp=False, lam=0.5, k=3),
        sensitivity=SensitivityConfig(
            tasks=("ctr", "demo"), demo_model="han", ctr_model="bert4rec", lams=(2.0,), ks=(4,)
        ),
    )
    s = sweep(p)
    assert list(s.models.items()) == [("ctr", "bert4rec"), ("demo", "han")]
    assert s.main == Variant(mbp=True, nbp=False, lam=0.5, k=3)
    assert (s.lams, s.ks, s.ratio, s.repeats) == ((2.0,), (4,), 0.2, 3)


def test_outputs_hold_a_small_headline_metrics_file(tmp_path):
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


def _grid(cfg, prepared, tokenized, ckpt_root, cache_dir):
    return grid_options(
        cfg,
        split=SPLIT,
        prepared=prepared,
        tokenized=tokenized,
        max_behaviors=20,
        ckpt_root=ckpt_root,
        cache_dir=cache_dir,
    )


def test_run_pretrains_only_the_variants_the_main_model_is_not(tiny_pipeline, tmp_path):
    """λ = 1, K = 2 is the main pre-training (its checkpoints are reused); MBP only, NBP only
    and λ = 0 (= MBP only) are pre-trained once each; every experiment aggregates its cells."""
    sizes = ModelParams(word_dim=8, dim=8, heads=2, head_dim=4, attn_hidden=8, layers=1)
    pre = PretrainConfig(architectures=("hsa",), model=sizes, epochs=1, batch_size=32, k=2, lam=1.0)
    data = dict(
        prepared=tiny_pipeline / "prepared", tokenized=tiny_pipeline / "tokenized", max_behaviors=20
    )
    main = tmp_path / "pretrain"
    pretrain_one(pre, "hsa", out_dir=main / "hsa", report_dir=tmp_path / "r", **data)
    trained: list[Variant] = []

    def pretrain(v: Variant, arch: str, out_dir, report_dir) -> None:
        trained.append(v)
        variant = replace(pre, mbp=v.mbp, nbp=v.nbp, lam=v.lam, k=v.k)
        pretrain_one(variant, arch, out_dir=out_dir, report_dir=report_dir, **data)

    ft = FinetuneConfig(max_epochs=1, head_hidden=8, workers=1, class_weights=("none",))
    grid = _grid(ft, data["prepared"], data["tokenized"], main, tmp_path / "cache")
    s = _sweep()
    res = run(
        s,
        grid,
        pretrain=pretrain,
        models_root=tmp_path / "sensitivity",
        reports=tmp_path / "reports",
    )
    assert trained == [Variant(True, False, 1.0, 2), Variant(False, True, 1.0, 2)]
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
        assert e["n"] == s.repeats * len(labels) and 0 < e["mean"] < 1


def test_tasks_the_data_does_not_allow_are_skipped_with_the_reason(behaviors_only, tmp_path):
    """No label, no impression: no variant is pre-trained, no cell runs, each task says why,
    and the stage's outputs are still written."""

    def pretrain(*args) -> None:
        raise AssertionError("nothing is pre-trained")

    never = tmp_path / "never_read"
    grid = _grid(
        FinetuneConfig(workers=1), behaviors_only / "prepared", never, never, tmp_path / "cache"
    )
    s = _sweep(models={"demo": "hsa", "ctr": "nativectr"})
    res = run(
        s,
        grid,
        pretrain=pretrain,
        models_root=tmp_path / "sensitivity",
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
