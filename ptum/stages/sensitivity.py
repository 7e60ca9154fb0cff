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
    with reading(paths.PREPARED, paths.TOKENIZED, paths.PRETRAIN_MODELS, paths.SENSITIVITY_CACHE):
        results = sens.run(
            p.pretrain,
            p.finetune,
            p.sensitivity,
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
