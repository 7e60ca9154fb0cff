"""The experiment's stage plan: dvc.yaml's stages (foreach resolved) and each stage's upstream
stages, which the flow turns into its run graph."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StagePlan:
    """The experiment's stages in an order they can run in (foreach stages resolved:
    `pretrain@hsa`; dvc.yaml's order wherever the dependencies allow) and,
    per stage, the stages whose outputs it reads."""

    order: list[str]
    upstream: dict[str, list[str]] = field(default_factory=dict)


def _paths(entries: Iterable[Any]) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries (a path, or {path: options}) -> paths."""
    out = []
    for entry in entries or ():
        out += list(entry) if isinstance(entry, Mapping) else [entry]
    return [str(p).rstrip("/") for p in out]


def _param_files(entries: Iterable[Any] | None) -> list[str]:
    """The files of dvc.yaml `params` entries ({file: [keys]}) other than params.yaml."""
    files = [f for e in entries or () if isinstance(e, Mapping) for f in e]
    return [str(f) for f in files if str(f) != "params.yaml"]


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _substitute(text: str, item: Any, params: Mapping[str, Any]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        return str(item) if name == "item" else str(_lookup(params, name))

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", one, text)


def stage_plan(dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> StagePlan:
    """Resolve dvc.yaml's stages with `params` (foreach over a list) and link each stage to the
    stages producing what it depends on (a dep equal to, inside or above another stage's out;
    a params file other than params.yaml is a dep too, as for `dvc dag`)."""
    io: dict[str, tuple[list[str], list[str]]] = {}
    for name, spec in (dvc_yaml.get("stages") or {}).items():
        if "foreach" in spec:
            items = spec["foreach"]
            if isinstance(items, str):
                items = _lookup(params, items.strip()[2:-1].strip())
            body = spec["do"]
        else:
            items, body = [None], spec
        for item in items:
            stage = name if item is None else f"{name}@{item}"
            deps = [
                _substitute(p, item, params)
                for p in _paths(body.get("deps")) + _param_files(body.get("params"))
            ]
            outs = [
                _substitute(p, item, params)
                for kind in ("outs", "metrics", "plots")
                for p in _paths(body.get(kind))
            ]
            io[stage] = (deps, outs)

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    upstream = {
        stage: [
            other
            for other, (_, outs) in io.items()
            if other != stage and any(overlaps(d, o) for d in deps for o in outs)
        ]
        for stage, (deps, _) in io.items()
    }
    return StagePlan(order=_run_order(list(io), upstream), upstream=upstream)


def _run_order(stages: list[str], upstream: Mapping[str, list[str]]) -> list[str]:
    """`stages` reordered so that each comes after its upstream stages; otherwise as given
    (dvc.yaml's order need not be one: pretrain may read the params file tune writes)."""
    order: list[str] = []
    while len(order) < len(stages):
        ready = [s for s in stages if s not in order and set(upstream[s]) <= set(order)]
        if not ready:
            raise ValueError(
                f"dvc.yaml: a dependency cycle among {sorted(set(stages) - set(order))}"
            )
        order.append(ready[0])
    return order


def select_stages(plan: StagePlan, requested: Iterable[str] | None) -> list[str]:
    """The stages an experiment with these targets runs (targets and everything upstream), in
    run order. A target is a stage (`tokenize`), a foreach group (`pretrain`) or one of its
    items (`pretrain@hsa`); naming none of the plan's stages is an error, not a silent skip."""
    if requested is None:
        return list(plan.order)
    wanted: set[str] = set()
    for target in requested:
        found = [s for s in plan.order if s == target or s.split("@")[0] == target]
        if not found:
            raise ValueError(f"stage {target!r} is not in dvc.yaml, which defines {plan.order}")
        wanted.update(found)
    todo = list(wanted)
    while todo:
        for up in plan.upstream[todo.pop()]:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    return [s for s in plan.order if s in wanted]
