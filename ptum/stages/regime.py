"""Stage `regime`: pre-training pools of 1x, 5x, 25x ... the labeled users (the paper's regime)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.finetune import regime as reg
from ptum.stages.errors import reading
from ptum.stages.finetune import grid_options, split_spec
from ptum.stages.pretrain import pretrain_one


def experiment(p: Params) -> reg.Regime:
    """The experiment, from the regime section."""
    r = p.regime
    return reg.Regime(
        models={t: r.demo_model if t == "demo" else r.ctr_model for t in r.tasks},
        pools=tuple(r.pools),
        ratios=tuple(r.ratios),
        repeats=r.repeats,
        bootstrap=p.finetune.bootstrap,
        seed=p.finetune.seed,
        labeled=r.labeled_users or None,
    )


def run(p: Params) -> dict:
    """Pre-train each pool, run each pool's grid; write reports/regime.json, regime.md, the
    plot table and figures; return the number of comparisons per task."""

    def pretrain(users: list[str], arch: str, out_dir: Path, report_dir: Path) -> None:
        # The main pre-training's settings and epochs, whatever the pool's size; never tuned
        # values (the study tuned on the whole corpus).
        pretrain_one(
            replace(p.pretrain, use_tuned=False),
            arch,
            prepared=paths.PREPARED,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            out_dir=out_dir,
            report_dir=report_dir,
            pool=users,
        )

    grid = grid_options(
        p.finetune,
        split=split_spec(p),
        prepared=paths.PREPARED,
        tokenized=paths.TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        ckpt_root=paths.REGIME_MODELS,
        cache_dir=paths.REGIME_CACHE,
    )
    with reading(paths.PREPARED, paths.TOKENIZED, paths.REGIME_MODELS, paths.REGIME_CACHE):
        results = reg.run(
            experiment(p),
            grid,
            pretrain=pretrain,
            models_root=paths.REGIME_MODELS,
            pretrain_reports=paths.REGIME_PRETRAIN_REPORTS,
        )
    reg.write_outputs(
        results,
        json_path=paths.REGIME_JSON,
        md_path=paths.REGIME_MD,
        figures=paths.REGIME_FIGURES,
        plot=paths.REGIME_PLOT,
    )
    return {t: len(r.get("rows", [])) for t, r in results["tasks"].items()}
