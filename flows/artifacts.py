"""What a flow run publishes, as plain data: the effective params and the metrics as table rows,
the metrics as markdown."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


def params_rows(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One {param, value, from} row per leaf of the effective params (lists kept whole)."""
    rows = []
    for key, value in _leaves(spec, lists=False):
        source = "override" if key in overrides else "params.yaml"
        rows.append({"param": key, "value": json.dumps(value), "from": source})
    return rows


def flatten_metrics(shown: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`dvc metrics show --json`-shaped data -> [{"file", "metric", "value"}], one row per
    scalar. Nested keys are joined with dots, list items named by index; a file DVC could not
    read gives one row with metric "error"."""
    rows: list[dict[str, Any]] = []
    for rev in shown.values():
        for file, entry in sorted((rev.get("data") or {}).items()):
            if "error" in entry:
                rows.append({"file": file, "metric": "error", "value": str(entry["error"])})
                continue
            rows += [
                {"file": file, "metric": metric, "value": value}
                for metric, value in _leaves(entry.get("data") or {})
            ]
    return rows


def _leaves(node: Any, prefix: str = "", *, lists: bool = True) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping) or (lists and isinstance(node, list)):
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        for key, value in items:
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key), lists=lists)
    else:
        yield prefix, node


def metrics_markdown(rows: list[dict[str, Any]], experiment: str | None) -> str:
    """A markdown page with one metric/value table per metrics file."""
    lines = ["# ptum results", ""]
    if experiment:
        lines += [f"DVC experiment `{experiment}` (`dvc exp apply {experiment}`).", ""]
    if not rows:
        return "\n".join(lines + ["No metrics yet.", ""])
    for file in dict.fromkeys(r["file"] for r in rows):
        lines += [f"## `{file}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {r['metric']} | {_cell(r['value'])} |" for r in rows if r["file"] == file]
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", r"\|")
