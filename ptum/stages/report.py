"""Stage `report`: reports/results.md from the pipeline's outputs."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params, to_dict
from ptum.report import build
from ptum.stages.errors import reading


def run(p: Params, *, out: Path = paths.RESULTS_MD) -> dict:
    """Write results.md from whatever results exist (every param goes into it)."""
    inputs = (paths.FINETUNE_REPORTS, paths.SENSITIVITY_JSON, paths.PRETRAIN_REPORTS)
    with reading(*inputs, paths.PREPARED_REPORT, paths.RAW_MANIFEST):
        text = build(
            finetune={t: paths.finetune_result(t) for t in paths.TASKS},
            sensitivity=paths.SENSITIVITY_JSON,
            pretrain={a: paths.pretrain_metrics(a) for a in p.pretrain.architectures},
            data_report=paths.PREPARED_REPORT,
            raw_manifest=paths.RAW_MANIFEST,
            params=to_dict(p),
            out=out,
        )
    return {"lines": text.count("\n")}
