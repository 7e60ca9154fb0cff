"""Reading an export directory for serving, every file verified against `export.json`.

`ptum export` records each file's SHA-256 in `export.json`; serving reads a file's bytes once,
checks them against that record and only then builds an onnxruntime session or a tokenizer from
the same bytes, so a corrupt or replaced file is refused (a flipped byte in an ONNX weight would
otherwise serve NaN vectors without an error). Torch-free, like `ptum.serving.embed`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ptum.data.errors import DataError

REPORT = "export.json"
RERUN = "rerun `ptum export` to rewrite the export"


@dataclass(frozen=True)
class ExportDir:
    """An export directory and what its export.json records (file name -> SHA-256)."""

    path: Path
    files: dict[str, str]

    def read(self, name: str) -> bytes:
        """The bytes of file `name`, after checking them against export.json (DataError if the
        file is missing, unrecorded or changed)."""
        path = self.path / name
        if name not in self.files:
            raise DataError(path, None, f"not listed in {REPORT}; {RERUN}")
        if not path.is_file():
            raise DataError(path, None, f"missing (listed in {REPORT}); {RERUN}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[name]:
            raise DataError(
                path,
                None,
                f"sha256 differs from the one {REPORT} records (the file is corrupt or was "
                f"replaced); {RERUN}",
            )
        return data

    def session(self, name: str) -> ort.InferenceSession:
        """A CPU onnxruntime session of the verified ONNX file `name`."""
        return ort.InferenceSession(self.read(name), providers=["CPUExecutionProvider"])

    def demo_heads(self) -> list[str]:
        """The demo_<label>.onnx files the export recorded, sorted."""
        return sorted(n for n in self.files if n.startswith("demo_") and n.endswith(".onnx"))


def open_export(model_dir: Path) -> ExportDir:
    """The export in `model_dir`, every file export.json lists checked against its SHA-256
    (a corrupt file is refused even when this command would not read it); DataError with what
    to run when there is none or a file is missing or changed."""
    report = model_dir / REPORT
    if not report.is_file():
        what = "does not exist" if not model_dir.exists() else f"has no {REPORT}"
        raise DataError(
            model_dir,
            None,
            f"no ONNX export here (the directory {what}); run `ptum export --arch ARCH` first, "
            "or point --model at the directory it wrote",
        )
    try:
        files = json.loads(report.read_bytes().decode("utf-8"))["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(report, None, f"unreadable ({type(e).__name__}: {e}); {RERUN}") from None
    if not isinstance(files, dict):
        raise DataError(report, None, f"'files' is not a mapping; {RERUN}")
    export = ExportDir(model_dir, {str(k): str(v) for k, v in files.items()})
    for name in export.files:  # the whole export, not only the files this command will read
        export.read(name)
    return export
