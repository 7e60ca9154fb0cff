"""Command `embed`: user vectors from a behavior log with onnxruntime, no torch."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.data.generic import find_table
from ptum.serving.embed import embed
from ptum.stages.errors import reading


def run(
    p: Params,
    *,
    arch: str | None = None,
    src: Path = paths.RAW,
    model: Path | None = None,
    out: Path | None = None,
) -> dict:
    """Embed every user of `src` (a behaviors file, or a directory holding one) with the
    exported model `model` (default models/onnx/ARCH) into `out` (data/embeddings/ARCH.parquet).
    Exact duplicate events are dropped or refused as prepare.on_duplicates says."""
    arch = arch or p.pretrain.architectures[0]
    if src.is_dir():
        found = find_table(src, "behaviors")
        if found is None:
            raise FileNotFoundError(f"{src}: no behaviors.parquet / behaviors.tsv")
        src = found
    model = model or paths.onnx_model(arch)
    with reading(src, model):
        return embed(
            src,
            model,
            out or paths.embeddings(arch),
            batch_size=p.embed.batch_size,
            demo=p.embed.demo,
            on_duplicates=p.prepare.on_duplicates,
        )
