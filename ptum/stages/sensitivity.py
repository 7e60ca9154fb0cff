"""Stage `sensitivity`: MBP/NBP ablation and the λ / K sweeps (paper Figs. 3-5)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.finetune import sensitivity as sens
from ptum.stages.errors import reading
from ptum.stages.finetune import grid_options, split_spec
from ptum.stages.pretrain import pretrain_one


def sweep(p: Params) -> sens.Sweep:
    """The experiments, from the sensitivity section and the main pre-training's settings."""
    s, pre = p.sensitivity, p.pretrain
    return sens.Sweep(
        models={t: s.demo_model if t == "demo" else s.ctr_model for t in s.tasks},
        main=sens.Variant(mbp=pre.mbp, nbp=pre.nbp, lam=pre.lam, k=pre.k),
        lams=tuple(s.lams),
        ks=tuple(s.ks),
        ratio=s.ratio,
        repeats=s.repeats,
    )


def run(p: Params) -> dict:
    """Pre-train the variants, fine-tune each; write reports/sensitivity.json, plot tables and
    figures; return the mean test score of every experiment per task."""

    def pretrain(v: sens.Variant, arch: str, out_dir: Path, report_dir: Path) -> None:
        variant = replace(p.pretrain, mbp=v.mbp, nbp=v.nbp, lam=v.lam, k=v.k)
        pretrain_one(
            variant,
            arch,
            prepared=paths.PREPARED,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            out_dir=out_dir,
            report_dir=report_dir,
        )

    grid = grid_options(
        p.finetune,
        split=split_spec(p),
        prepared=paths.PREPARED,
        tokenized=paths.TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        ckpt_root=paths.PRETRAIN_MODELS,
        cache_dir=paths.SENSITIVITY_CACHE,
    )
    with reading(paths.PREPARED, paths.TOKENIZED, paths.PRETRAIN_MODELS, paths.SENSITIVITY_CACHE):
        results = sens.run(
            sweep(p),
            grid,
            pretrain=pretrain,
            models_root=paths.SENSITIVITY_MODELS,
            reports=paths.REPORTS,
        )
    sens.write_outputs(results, paths.REPORTS)
    return {
        t: {k: round(e["mean"], 4) for k, e in r["experiments"].items()} for t, r in results.items()
    }
