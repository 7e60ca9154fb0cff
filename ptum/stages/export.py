"""Stage `export@ARCH`: a pre-trained model and its serving heads as ONNX (models/onnx/ARCH)."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.checkpoint import read_meta
from ptum.config import Params, to_dict
from ptum.serving.export import export
from ptum.stages.errors import reading
from ptum.stages.finetune import cell_options


def run(
    p: Params, *, arch: str | None = None, ckpt: Path | None = None, out: Path | None = None
) -> dict:
    """Export checkpoint `ckpt` (default models/pretrain/ARCH) into `out` (models/onnx/ARCH);
    with export.heads, serving heads trained on its frozen user vectors go along."""
    arch = arch or p.pretrain.architectures[0]
    ckpt = ckpt or paths.pretrain_model(arch)
    with reading(ckpt, paths.PREPARED, paths.TOKENIZED):
        return _export(p, arch, ckpt, out)


def _export(p: Params, arch: str, ckpt: Path, out: Path | None) -> dict:
    """Serving heads (export.heads), then the ONNX files and export.json."""
    e = p.export
    meta = read_meta(ckpt)
    demo_heads, ctr_head = None, None
    if e.heads:
        from ptum.serving.training import serving_heads

        demo_heads, ctr_head = serving_heads(
            ckpt,
            prepared=paths.PREPARED,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            opts=cell_options(p.finetune),
            demo_select=p.finetune.demo_select,
            seed=e.head_seed,
        )
    # The params the checkpoint was trained with (its meta), not today's params.yaml.
    params = {
        "pretrain": meta.get("pretrain_params"),
        "max_behaviors": meta.get("max_behaviors"),
        "export": to_dict(e),
    }
    return export(
        ckpt,
        out or paths.onnx_model(arch),
        opset=e.opset,
        spm_model=paths.SPM_MODEL,
        data_version=e.data_version or meta.get("data_sha256", "unknown"),
        params=params,
        example_batch=e.example_batch,
        example_behaviors=e.example_behaviors,
        example_tokens=e.example_tokens,
        demo_heads=demo_heads,
        ctr_head=ctr_head,
    )
