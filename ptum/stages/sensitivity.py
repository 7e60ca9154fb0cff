"""Stage `sensitivity`: MBP/NBP ablation and the λ / K sweeps (paper Figs. 3-5)."""

from __future__ import annotations

from ptum import paths
from ptum.config import Params
from ptum.finetune import sensitivity as sens
from ptum.stages.errors import reading
from ptum.stages.finetune import split_spec


def run(p: Params) -> dict:
    """Pre-train the variants, fine-tune each; write reports/sensitivity.json, plot tables and
    figures; return the mean test score of every experiment per task."""
    s = p.sensitivity
    opts = sens.SensitivityOptions(
        tasks=s.tasks,
        demo_model=s.demo_model,
        ctr_model=s.ctr_model,
        lams=s.lams,
        ks=s.ks,
        ratio=s.ratio,
        repeats=s.repeats,
    )
    with reading(paths.PREPARED, paths.TOKENIZED, paths.PRETRAIN_MODELS, paths.SENSITIVITY_CACHE):
        results = sens.run(
            p.pretrain,
            p.finetune,
            opts,
            prepared=paths.PREPARED,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            models_root=paths.SENSITIVITY_MODELS,
            main_ckpts=paths.PRETRAIN_MODELS,
            cache_dir=paths.SENSITIVITY_CACHE,
            reports=paths.REPORTS,
            split=split_spec(p),
        )
    sens.write_outputs(results, paths.REPORTS)
    return {
        t: {k: round(e["mean"], 4) for k, e in r["experiments"].items()} for t, r in results.items()
    }
