"""The report's claim checks and the sensitivity plan, on small hand-made inputs."""

from ptum.config import PretrainConfig
from ptum.finetune.sensitivity import SensitivityOptions, _variant_config, plan
from ptum.report import claims


def _cell(label, model, mode, ratio, acc):
    return {"label": label, "model": model, "mode": mode, "ratio": ratio, "acc_mean": acc,
            "acc_std": 0.0}


def test_claims_count_what_the_numbers_say():
    res = {"summary": [
        _cell("g", "hsa", "scratch", 0.2, 0.60), _cell("g", "hsa", "frozen", 0.2, 0.64),
        _cell("g", "hsa", "finetune", 0.2, 0.70), _cell("g", "hsa", "scratch", 1.0, 0.70),
        _cell("g", "hsa", "frozen", 1.0, 0.73), _cell("g", "hsa", "finetune", 1.0, 0.72),
    ], "tests": [
        {"label": "g", "model": "hsa", "ratio": 0.2, "comparison": "finetune - scratch",
         "p_ttest": 0.01},
        {"label": "g", "model": "hsa", "ratio": 1.0, "comparison": "finetune - scratch",
         "p_ttest": 0.3},
    ]}
    text = "\n".join(claims(res, "acc"))
    assert "at 20% labels on 1/1 (label, model) pairs; 1 with paired t-test p < 0.05" in text
    assert "at 100% labels on 1/1 (label, model) pairs; 0 with" in text
    assert "larger at 20% than at 100% labels on 1/1 pairs (mean gain +10.00 vs +2.00 pts)" in text
    assert "finetune beats frozen (no finetune) in 1/2" in text


def test_sensitivity_plan_shares_identical_pretrainings():
    pre = PretrainConfig(k=2, lam=1.0)
    opts = SensitivityOptions(tasks=("demo",), demo_model="hsa", ctr_model="bert4rec",
                              lams=(0.0, 1.0, 4.0), ks=(1, 2), ratio=0.2, repeats=2)
    p = plan(pre, opts)
    # λ = 0 is MBP only; the default λ and K are the "both" run.
    assert p["lam=0"]["variant"] == p["mbp_only"]["variant"] == "mbp_only"
    assert p["lam=1"]["variant"] == p["K=2"]["variant"] == p["both"]["variant"]
    assert len({e["variant"] for e in p.values()}) == 5  # mbp, nbp, both, lam4, K1
    assert _variant_config(pre, p["both"]["variant"]) == pre  # reuses the main checkpoint
    v = _variant_config(pre, p["nbp_only"]["variant"])
    assert (v.mbp, v.nbp, v.k) == (False, True, 2)
    assert _variant_config(pre, p["lam=4"]["variant"]).lam == 4.0
