"""The sections of serving: stage `export@ARCH` (ONNX files) and the command `embed`.

Each field's comment documents the key; the defaults are the root params.yaml's values
(`ptum.config.schema` gathers every section).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptum.config.errors import require, require_seed


@dataclass(frozen=True)
class ExportConfig:
    """Section of stage `export@ARCH`: ONNX files of a pre-trained model (+ serving heads)."""

    opset: int = 23
    # Trace sizes of the dynamic dims; each >= 2 (a size-1 example dim is fixed in the graph).
    example_batch: int = 3
    example_behaviors: int = 5
    example_tokens: int = 7
    # Stored in the ONNX metadata; "" = the checkpoint's data_sha256.
    data_version: str = ""
    # Serving heads are trained on the frozen pre-trained user vectors with all training
    # labels (the "+PTUM (no finetune)" setting), so one user model serves every head.
    heads: bool = True
    head_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("example_batch", "example_behaviors", "example_tokens"):
            v = getattr(self, name)
            require(v >= 2, f"export.{name}", v, "an integer >= 2 (a size-1 dim is fixed)")
        require_seed(self.head_seed, "export.head_seed")


@dataclass(frozen=True)
class EmbedConfig:
    """Command `embed`: user vectors from a behavior log with onnxruntime (no torch)."""

    batch_size: int = 256
    # Also predict every demographic label that has an exported demo_<label>.onnx head.
    demo: bool = False

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "embed.batch_size", self.batch_size, "an integer >= 1")
