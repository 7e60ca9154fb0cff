"""dvc.yaml names the same paths as ptum/paths.py, the one place the code takes them from.

DVC needs the paths literally in dvc.yaml, so that copy cannot be avoided; this test keeps the
two equal: every data path dvc.yaml names (deps, outs, metrics, plots) is one of ptum.paths, and
every path of ptum.paths is, contains or lies inside one of dvc.yaml's (but the few that are not
DVC outputs). The CLI, the stage modules and the flow write no path literal of their own.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptum import paths

ROOT = Path(__file__).resolve().parents[1]
NOT_DVC = {paths.EMBEDDINGS, paths.FLOW_LOGS, paths.PARAMS}  # command embed, Prefect logs


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _entries(body: Mapping[str, Any], kinds=("deps", "outs", "metrics", "plots")) -> Iterator[str]:
    for kind in kinds:
        for entry in body.get(kind) or []:
            yield str(entry if isinstance(entry, str) else next(iter(entry))).rstrip("/")


def dvc_paths(root: Path = ROOT) -> set[Path]:
    """Every data path dvc.yaml names (foreach resolved with params.yaml)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    found: set[Path] = set()
    for stage in spec["stages"].values():
        items = stage.get("foreach", [None])
        if isinstance(items, str):
            items = _lookup(params, items.strip()[2:-1].strip())
        body = stage.get("do", stage)
        for item in items:
            for text in _entries(body):
                text = re.sub(r"\$\{\s*item\s*\}", str(item), text)
                if not text.startswith("ptum/"):
                    found.add(Path(text))
    found |= {Path(p) for p in _entries({"plots": spec.get("plots")})}
    return found


def _architectures() -> list[str]:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["pretrain"][
        "architectures"
    ]


def module_paths() -> set[Path]:
    """Every path ptum.paths defines: its constants, and its functions for every architecture
    of params.yaml, every task, table and sweep."""
    values = {
        "arch": _architectures(),
        "task": paths.TASKS,
        "name": paths.PREPARED_TABLES,
        "group": paths.SENSITIVITY_GROUPS,
    }
    found: set[Path] = set()
    for obj in vars(paths).values():
        if isinstance(obj, Path):
            found.add(obj)
        elif (
            inspect.isfunction(obj)
            and obj.__module__ == paths.__name__
            and obj is not paths.producer
        ):
            args = list(inspect.signature(obj).parameters)
            found.update(obj(*combo) for combo in itertools.product(*(values[a] for a in args)))
    return found


def test_every_dvc_yaml_path_is_one_of_ptum_paths():
    named = dvc_paths()
    known = module_paths()
    assert not named - known, f"dvc.yaml paths missing from ptum/paths.py: {sorted(named - known)}"


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def test_every_ptum_path_is_in_dvc_yaml():
    named = dvc_paths()
    for path in module_paths():
        if any(path == x or x in path.parents for x in NOT_DVC):
            continue
        assert any(_related(path, d) for d in named), f"ptum/paths.py {path} is not in dvc.yaml"


def test_finetune_runs_every_task():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    assert tuple(spec["stages"]["finetune"]["foreach"]) == paths.TASKS


def test_producer_names_the_stage_that_writes_each_dvc_output():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        for item in _architectures() if name in ("pretrain", "export") else paths.TASKS:
            for text in _entries(body, ("outs", "metrics", "plots")):
                out = Path(re.sub(r"\$\{\s*item\s*\}", str(item), text))
                assert paths.producer(out) == name, f"{out}: producer {paths.producer(out)}"
    assert paths.producer(Path.cwd() / "data/prepared/items.parquet") == "prepare"
    assert paths.producer("elsewhere/items.parquet") is None


def test_a_renamed_path_is_caught(monkeypatch):
    monkeypatch.setattr(paths, "TOKENS", Path("data/tokenized/ids.npy"))
    named = dvc_paths()
    assert Path("data/tokenized/tokens.npy") in named - module_paths()


@pytest.mark.parametrize(
    "file",
    ["ptum/cli.py", *sorted(p.as_posix() for p in (ROOT / "ptum/stages").glob("*.py"))]
    + sorted(p.as_posix() for p in (ROOT / "flows").glob("*.py")),
)
def test_entry_points_take_their_paths_from_ptum_paths(file):
    text = (ROOT / file).read_text(encoding="utf-8")
    literal = re.findall(r"""["'](?:data|models|reports|logs)/[\w./-]*["']""", text)
    assert not literal, f"{file}: path literals {literal}; use ptum.paths"
