"""Writing ONNX files: the dynamo exporter, quietly, with metadata, checked by onnx.checker.

All graphs come from the torch.export-based exporter (`torch.onnx.export(dynamo=True)`); the
legacy TorchScript exporter was not needed for any architecture. The custom attention op of
`ptum.serving.fold` is translated through `ONNX_TRANSLATIONS`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from ptum.serving.fold import ONNX_TRANSLATIONS


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's warnings and progress logs (they drown a CLI run)."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._dynamo",
            "torch.fx.experimental.symbolic_shapes",
        )
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, Any]],
    opset: int,
    meta: Mapping[str, str],
) -> None:
    """torch.onnx.export (dynamo) + metadata_props + onnx.checker, into one self-contained file."""
    with quiet(), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            args,
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            external_data=False,
            custom_translation_table=ONNX_TRANSLATIONS,
            verbose=False,
        )
    model = onnx.load(str(path))
    strip_stack_traces(model)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


# Node metadata the exporter adds for debugging: the Python stack of each op, with the absolute
# path of the source file. It would make the bytes of an export depend on where the code is
# checked out (two clones of one commit: two hashes in dvc.lock).
_STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node source stack traces, in the graph, its subgraphs and the
    model's local functions (in place)."""

    def graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else []
                for g in [*subgraphs, *attr.graphs]:
                    yield from graph_nodes(g)

    nodes = [*graph_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    for node in nodes:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key != _STACK_TRACE_KEY]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)


def input_dims(path: Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: an int where static, the symbol's name where dynamic."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def check_dims(path: Path, expected: dict[str, list[int | None]]) -> None:
    """Raise unless each input dim is symbolic where `expected` has None, else that int.

    A size-1 example dim, or a specialization inside the model, silently fixes a dim.
    """
    got = input_dims(path)
    for name, want in expected.items():
        dims = got[name]
        ok = len(dims) == len(want) and all(
            isinstance(d, str) if w is None else d == w for d, w in zip(dims, want)
        )
        if not ok:
            raise RuntimeError(
                f"{path.name}: input {name} has dims {dims}, expected "
                f"{['dynamic' if w is None else w for w in want]}"
            )
