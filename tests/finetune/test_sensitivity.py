"""The sensitivity plan, on small hand-made inputs."""

from ptum.config import PretrainConfig
from ptum.finetune.sensitivity import SensitivityOptions, _variant_config, plan


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
