"""The report's claim checks and the sensitivity plan, on small hand-made inputs."""

from scipy import stats

from ptum.config import PretrainConfig
from ptum.finetune.grid import summarize
from ptum.finetune.sensitivity import SensitivityOptions, _variant_config, plan
from ptum.report import all_tests, claims


def _cell(label, model, mode, ratio, acc):
    return {
        "label": label,
        "model": model,
        "mode": mode,
        "ratio": ratio,
        "acc_mean": acc,
        "acc_std": 0.0,
    }


def test_claims_count_what_the_numbers_say():
    res = {
        "summary": [
            _cell("g", "hsa", "scratch", 0.2, 0.60),
            _cell("g", "hsa", "frozen", 0.2, 0.64),
            _cell("g", "hsa", "finetune", 0.2, 0.70),
            _cell("g", "hsa", "scratch", 1.0, 0.70),
            _cell("g", "hsa", "frozen", 1.0, 0.73),
            _cell("g", "hsa", "finetune", 1.0, 0.72),
        ],
        "tests": [
            {
                "label": "g",
                "model": "hsa",
                "ratio": 0.2,
                "comparison": "finetune - scratch",
                "metric": "acc",
                "p_ttest": 0.01,
            },
            {
                "label": "g",
                "model": "hsa",
                "ratio": 1.0,
                "comparison": "finetune - scratch",
                "metric": "acc",
                "p_ttest": 0.3,
            },
            # A test on another metric is not this claim's evidence.
            {
                "label": "g",
                "model": "hsa",
                "ratio": 1.0,
                "comparison": "finetune - scratch",
                "metric": "macro_f1",
                "p_ttest": 0.001,
            },
        ],
    }
    text = "\n".join(claims(res, "acc"))
    assert "at 20% labels on 1/1 (label, model) pairs; 1 with paired t-test p < 0.05" in text
    assert "at 100% labels on 1/1 (label, model) pairs; 0 with" in text
    assert "larger at 20% than at 100% labels on 1/1 pairs (mean gain +10.00 vs +2.00 pts)" in text
    assert "finetune beats frozen (no finetune) in 1/2" in text


def test_sensitivity_plan_shares_identical_pretrainings():
    pre = PretrainConfig(k=2, lam=1.0)
    opts = SensitivityOptions(
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


def test_all_tests_cover_every_metric_from_the_runs():
    """The report adds paired tests on the non-primary metric, computed from the per-seed runs,
    pairing by seed; the stage's own tests (primary metric) are kept as they are."""
    f1 = {
        "scratch": [0.20, 0.25, 0.22, 0.30],
        "finetune": [0.31, 0.30, 0.35, 0.33],
        "frozen": [0.20, 0.26, 0.21, 0.31],
    }
    runs = [
        {
            "label": "age",
            "model": "han",
            "mode": mode,
            "ratio": 0.2,
            "seed": seed,
            "test": {"acc": 0.5, "macro_f1": v},
        }
        for mode, vals in f1.items()
        for seed, v in enumerate(vals)
    ]
    stage = summarize(runs, ["acc", "macro_f1"], "acc")  # what finetune@TASK writes
    res = {"runs": runs, "tests": stage["tests"], "summary": stage["cells"]}
    tests = all_tests(res, ["acc", "macro_f1"])
    assert {t["metric"] for t in tests} == {"acc", "macro_f1"}
    ft = [t for t in tests if t["metric"] == "macro_f1" and t["comparison"] == "finetune - scratch"]
    assert len(ft) == 1 and ft[0]["wins"] == 4 and ft[0]["n"] == 4
    assert abs(ft[0]["mean_diff"] - 0.08) < 1e-9
    assert abs(ft[0]["p_ttest"] - stats.ttest_rel(f1["finetune"], f1["scratch"]).pvalue) < 1e-12
    text = "\n".join(claims(res, "macro_f1", tests))
    assert "at 20% labels on 1/1 (label, model) pairs; 1 with paired t-test p < 0.05" in text
    # On accuracy every run ties: no wins, and no test counted as significant.
    assert "on 0/1 (label, model) pairs; 0 with" in "\n".join(claims(res, "acc", tests))
