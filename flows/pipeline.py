"""Flow `ptum`: the DVC pipeline as Prefect tasks, one task per stage, run in pipeline order.

    ingest -> prepare -> tokenize -> pretrain -> finetune -> sensitivity -> tune -> export -> report

Only the stages that dvc.yaml defines are run (a `foreach` stage such as `pretrain` is one task:
`dvc repro pretrain` runs all its items); a dvc.yaml stage missing from STAGES runs too, after
the stage it follows in dvc.yaml (see pipeline_order). Each stage task runs `dvc repro <stage>` in the project
root as a subprocess, one at a time (DVC holds one lock per repository), streams the stage's
stdout and stderr lines into the Prefect run logger as they come, and raises with the stage's last
stderr lines when the command fails, so the flow run ends Failed with the stage's error in its
logs. The stage code (`ptum`) never imports Prefect; this module only drives DVC.

How the flow parameters map to DVC: a flow run is `dvc exp run -S ...` split into tasks.
  1. The flow parameters become `section.key=value` overrides, the syntax of `dvc exp run -S`
     and `ptum STAGE --set`: quick -> the preset ptum.presets.QUICK (tiny data, tiny models, one
     epoch), then source -> data.source, data_path -> data.path, size -> data.size, then
     `overrides` (a list of such strings) as given; later ones win. A parameter left at None
     keeps the value that params.yaml has.
  2. Task `params` validates the overrides with ptum's config schema, then writes the keys that
     differ into the workspace's params.yaml before any stage runs (only those lines change;
     comments and layout are kept), which is what `dvc exp run -S` does first.
  3. Each stage task runs `dvc repro <stage>`: DVC sees the changed params, reruns what depends on
     them and records them in dvc.lock. Asking for a subset (`stages=["tokenize"]`) also brings
     that stage's upstream stages up to date, as `dvc repro tokenize` always does.
  4. Task `save-experiment`: when `dvc status` is clean, `dvc exp save -n ptum-<run name>-<id>`
     records the run (params.yaml, dvc.lock, metrics and plots files) as a DVC experiment, so
     `dvc exp show` lists every flow run with its parameters and metrics. When a stage is out of date (only a subset
     was run) it saves nothing and logs why: `dvc exp save` force-commits every stage, which would
     record stale outputs as up to date.
The workspace keeps the run's params.yaml, dvc.lock and outputs, as after `dvc exp run`, and
`dvc status` is clean afterwards. A later run without parameters reuses the workspace's values;
`git checkout params.yaml` or `dvc exp apply <name>` go back.

The final task publishes two artifacts: markdown `ptum-results` (reports/results.md, or tables of
the DVC metrics until a `report` stage writes that file) and table `ptum-metrics` (every scalar of
`dvc metrics show --json` as a {file, metric, value} row).

Serve it as deployment `full` with `python -m flows.serve`; commands in flows/USAGE.md.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from ptum.config import load_params, parse_override
from ptum.presets import QUICK

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "ingest",
    "prepare",
    "tokenize",
    "pretrain",
    "finetune",
    "sensitivity",
    "tune",
    "export",
    "report",
)
RESULTS_MD = Path("reports/results.md")

# Retries per stage. A retry only helps when the failure can go away by itself; a deterministic
# stage fails the same way again, so it gets none.
RETRIES = {
    "ingest": 0,  # deterministic from params; the flow gives it 1 when it downloads MovieLens
    "prepare": 0,  # pure transform of data/raw
    "tokenize": 0,  # deterministic SentencePiece training
    # The next four keep their partial work (`persist: true` outs in dvc.yaml), so a retry after
    # a crash (out of memory, a lost GPU, a killed worker) only redoes what was unfinished.
    "pretrain": 2,  # long; resumes from its last checkpoint
    "finetune": 1,  # finished grid cells are cached
    "sensitivity": 1,  # its pre-trained variants and finished cells are kept
    "tune": 1,  # the Optuna study resumes from its storage; killed trials are re-queued
    "export": 0,  # deterministic conversion of a checkpoint
    "report": 0,  # deterministic summary of metrics
}
RETRY_DELAY_S = 30
ERROR_TAIL = 40  # stderr lines quoted in a failed stage's exception


class StageError(RuntimeError):
    """A DVC command exited non-zero; the message ends with its last stderr lines."""


def stage_env(root: Path) -> dict[str, str]:
    """Environment for DVC and the stage commands it runs.

    This interpreter's bin directory goes first on PATH so that the `ptum` commands in dvc.yaml
    resolve to this environment; the project root goes first on PYTHONPATH so that they import
    this checkout's `ptum` (the code DVC hashes as the stages' deps) even if another copy is
    installed. PYTHONUNBUFFERED makes the stages print lines as they happen, not at exit.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_streaming(
    cmd: list[str], *, cwd: Path, log: Callable[[str], None], label: str | None = None
) -> None:
    """Run `cmd` in `cwd`, handing each stdout/stderr line to `log` as it arrives.

    Raises StageError (naming the command as `label`, with its last ERROR_TAIL stderr lines)
    when it exits non-zero.
    The command runs in its own process group, which is killed if this function is interrupted
    (e.g. the flow run is cancelled), so no stage keeps running behind the flow's back.
    """
    lines: queue.Queue[tuple[bool, str | None]] = queue.Queue()

    def pump(stream: IO[str], is_err: bool) -> None:
        for line in stream:
            lines.put((is_err, line.rstrip("\r\n")))
        lines.put((is_err, None))

    err_tail: deque[str] = deque(maxlen=ERROR_TAIL)
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=stage_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    ) as proc:
        try:
            # Two readers, one consumer: the logger is only called from this thread, where the
            # Prefect run context lives.
            for stream, is_err in ((proc.stdout, False), (proc.stderr, True)):
                threading.Thread(target=pump, args=(stream, is_err), daemon=True).start()
            open_streams = 2
            while open_streams:
                is_err, line = lines.get()
                if line is None:
                    open_streams -= 1
                    continue
                if is_err:
                    err_tail.append(line)
                log(line)
            code = proc.wait()
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            raise
    if code != 0:
        raise StageError(
            f"`{label or ' '.join(cmd)}` exited with code {code}; its last error "
            "output:\n" + "\n".join(err_tail)
        )


def dvc(*args: str, root: Path) -> str:
    """Run a short DVC command (status, metrics, exp save) and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=stage_env(root),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    if proc.returncode != 0:
        raise StageError(
            f"`dvc {' '.join(args)}` exited with code {proc.returncode}:\n"
            + (proc.stderr.strip() or proc.stdout.strip())
        )
    return proc.stdout


def pipeline_stages(root: Path) -> list[str]:
    """Stage names defined in root/dvc.yaml, in file order (a foreach stage is one name)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list(spec.get("stages") or {})


def pipeline_order(defined: Iterable[str]) -> list[str]:
    """dvc.yaml's stages in pipeline order: those of STAGES in STAGES' order, and any other
    stage (one added to dvc.yaml since, e.g. `sensitivity`) right after the stage of STAGES that
    precedes it in dvc.yaml. Any order would give the same results (`dvc repro X` first brings
    X's upstream stages up to date); this one puts each stage's work, and logs, in its own task.
    """
    rank: dict[str, tuple[int, int, int]] = {}
    anchor = -1
    for i, stage in enumerate(defined):
        if stage in STAGES:
            anchor = STAGES.index(stage)
            rank[stage] = (anchor, 0, i)
        else:
            rank[stage] = (anchor, 1, i)
    return sorted(rank, key=rank.__getitem__)


def select_stages(requested: Iterable[str] | None, defined: Iterable[str]) -> list[str]:
    """The stages to run, in pipeline order (requested=None: every stage dvc.yaml defines).

    Naming a stage that dvc.yaml does not define is an error, not a silent skip.
    """
    ordered = pipeline_order(defined)
    if requested is None:
        return ordered
    requested = list(requested)
    missing = [s for s in requested if s not in ordered]
    if missing:
        raise ValueError(f"stage(s) {missing} are not in dvc.yaml, which defines {ordered}")
    return [s for s in ordered if s in requested]


def parse_overrides(texts: Iterable[str]) -> dict[str, Any]:
    """`section.key=value` strings (value in YAML, as for `ptum --set`) -> {"section.key": value}."""
    out: dict[str, Any] = {}
    for text in texts:
        parts, value = parse_override(text)
        out[".".join(parts)] = value
    return out


def overrides_for(
    *,
    source: str | None,
    data_path: str | None,
    size: str | None,
    quick: bool,
    extra: Iterable[str] = (),
) -> dict[str, Any]:
    """Flow parameters -> {"section.key": value} overrides; None keeps params.yaml's value.

    Later ones win: the QUICK preset, then source/data_path/size, then the `extra` strings.
    """
    out = parse_overrides(QUICK) if quick else {}
    if quick and size is not None and size != out.get("data.size", size):
        raise ValueError(f"quick=True means data.size={out['data.size']}; got size={size!r}")
    for key, value in (("data.source", source), ("data.path", data_path), ("data.size", size)):
        if value is not None:
            out[key] = value
    out.update(parse_overrides(extra))
    return out


def write_params(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Write the overrides that differ from params_file into it; return {key: (old, new)}.

    Round-trips with ruamel.yaml (installed with DVC, which edits params the same way for
    `dvc exp run -S`), keeping quotes and never re-wrapping, so only the changed lines differ.
    The file is not touched when nothing changes.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(params_file.read_text(encoding="utf-8"))
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = doc
        for name in sections:
            node = node.setdefault(name, {})
        old = node.get(leaf)
        if old != value:
            new = value
            if isinstance(old, CommentedSeq) and isinstance(value, list) and old.fa.flow_style():
                new = CommentedSeq(value)  # keep `[a, b]` on one line
                new.fa.set_flow_style()
            node[leaf] = new
            changed[key] = (_plain(old), value)
    if changed:
        with params_file.open("w", encoding="utf-8") as f:
            rt.dump(doc, f)
    return changed


def _plain(value: Any) -> Any:
    """ruamel's commented containers -> plain lists and dicts (for logs and task results)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def untracked_outputs(root: Path) -> list[str]:
    """Stage outputs that belong in git but are not tracked yet, relative to root.

    These are the outputs DVC does not cache (metrics, plots: `cache: false`) and the .gitignore
    files it writes next to cached ones. `dvc exp run` stages them itself; `dvc exp save` only
    commits them when named with --include-untracked, so the flow names them.
    """
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    outs = {o["path"] for s in (lock.get("stages") or {}).values() for o in s.get("outs") or []}
    gitignores = {(Path(p).parent / ".gitignore").as_posix() for p in outs}
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(
        p
        for p in filter(None, listed.split("\0"))
        if p in outs or p in gitignores or any(p.startswith(f"{o}/") for o in outs)
    )


def flatten_metrics(shown: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`dvc metrics show --json` output -> [{"file", "metric", "value"}], one row per scalar.

    Nested keys are joined with dots and list items named by index (behaviors.click_rate.test,
    label_columns.0). A metrics file DVC could not read gives one row with metric "error".
    """
    rows: list[dict[str, Any]] = []
    for rev in shown.values():  # only the workspace, "", unless revisions were asked for
        for file, entry in sorted((rev.get("data") or {}).items()):
            if "error" in entry:
                rows.append({"file": file, "metric": "error", "value": str(entry["error"])})
                continue
            rows += [
                {"file": file, "metric": metric, "value": value}
                for metric, value in _leaves(entry.get("data") or {})
            ]
    return rows


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping | list):
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        for key, value in items:
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def metrics_markdown(rows: list[dict[str, Any]], experiment: str | None) -> str:
    """A markdown page with one metric/value table per metrics file."""
    lines = ["# ptum results", ""]
    if experiment:
        lines += [
            f"Saved as DVC experiment `{experiment}` (`dvc exp show`, "
            f"`dvc exp apply {experiment}`).",
            "",
        ]
    if not rows:
        return "\n".join(lines + ["No metrics yet: `dvc metrics show` is empty.", ""])
    for file in dict.fromkeys(r["file"] for r in rows):
        lines += [f"## `{file}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {r['metric']} | {_cell(r['value'])} |" for r in rows if r["file"] == file]
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", r"\|")


def experiment_name(run_name: str | None, run_id: str | None) -> str:
    """`ptum-<flow run name>-<first 8 of its id>`, reduced to what a git ref name allows."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"ptum-{run_name or 'run'}-{(run_id or '')[:8]}")
    return name.strip("-")


@task(name="params", cache_policy=NO_CACHE)
def apply_params(root: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the overrides, write those that differ into params.yaml; return the data section."""
    logger = get_run_logger()
    params_file = Path(root) / "params.yaml"
    if overrides:
        # Fail here, before params.yaml is touched, on an unknown key or a wrong value type.
        load_params(params_file, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    changed = write_params(params_file, overrides)
    for key, (old, new) in changed.items():
        logger.info("params.yaml: %s: %r -> %r", key, old, new)
    if changed:
        logger.info(
            "as with `dvc exp run %s`",
            " ".join(
                f"-S {shlex.quote(f'{k}={json.dumps(new)}')}" for k, (_, new) in changed.items()
            ),
        )
    else:
        logger.info("params.yaml unchanged")
    spec = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    return dict(spec.get("data") or {})


@task(cache_policy=NO_CACHE)
def dvc_repro(stage: str, root: str) -> None:
    """Run one pipeline stage with `dvc repro <stage>`, its output streamed into the run logs."""
    logger = get_run_logger()
    # --wait-for-lock: if someone runs dvc by hand in this repository, wait instead of failing.
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", stage]
    label = f"dvc repro {stage}"
    logger.info("$ %s", label)
    run_streaming(cmd, cwd=Path(root), log=logger.info, label=label)


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(root: str) -> str | None:
    """`dvc exp save` the workspace if every stage is up to date; return the experiment name."""
    logger = get_run_logger()
    # The root pipeline only: experiments/*/dvc.yaml are other pipelines, run on their own.
    stale = json.loads(dvc("status", "--json", "dvc.yaml", root=Path(root)) or "{}")
    if stale:
        logger.warning(
            "not saving a DVC experiment: %s out of date; run all stages to version this run",
            sorted(stale),
        )
        return None
    name = experiment_name(flow_run.name, flow_run.id)
    include = [arg for path in untracked_outputs(Path(root)) for arg in ("-I", path)]
    message = f"ptum flow run {flow_run.name} ({flow_run.id})"
    logger.info(dvc("exp", "save", "--name", name, "-m", message, *include, root=Path(root)))
    return name


@task(name="publish", cache_policy=NO_CACHE)
def publish(root: str, experiment: str | None, report_ran: bool = True) -> None:
    """Markdown artifact `ptum-results` and table artifact `ptum-metrics`.

    reports/results.md is published only when this run ran the `report` stage: a file left from
    an earlier run would describe other numbers than this run's metrics.
    """
    rows = flatten_metrics(json.loads(dvc("metrics", "show", "--json", root=Path(root)) or "{}"))
    results = Path(root) / RESULTS_MD
    where = f" (DVC experiment {experiment})" if experiment else ""
    if report_ran and results.is_file():
        markdown, source = results.read_text(encoding="utf-8"), str(RESULTS_MD)
    else:
        markdown, source = metrics_markdown(rows, experiment), "dvc metrics show"
    create_markdown_artifact(
        markdown=markdown, key="ptum-results", description=f"ptum results from {source}{where}"
    )
    create_table_artifact(
        table=rows, key="ptum-metrics", description=f"every metric of `dvc metrics show`{where}"
    )
    get_run_logger().info(
        "published ptum-results (%s) and ptum-metrics (%d rows)", source, len(rows)
    )


@flow(name="ptum", description="Pre-train user models: the DVC pipeline, one task per stage.")
def ptum_flow(
    source: str | None = None,
    data_path: str | None = None,
    size: str | None = None,
    quick: bool = False,
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
) -> str | None:
    """Run the pipeline stages in order; return the saved DVC experiment's name (or None).

    Args:
        source: data.source (synthetic | movielens | generic | ptum_tsv); None keeps params.yaml's.
        data_path: data.path (a directory or file; "" for synthetic); None keeps params.yaml's.
        size: data.size, the synthetic preset (tiny | small | default | large).
        quick: ptum.presets.QUICK, every stage shrunk for a smoke run of a few minutes.
        stages: stage names to run (pipeline order is kept); None runs every stage in dvc.yaml.
        overrides: any other `section.key=value` overrides, applied last (e.g.
            "pretrain.epochs=5"; values in YAML, as for `ptum STAGE --set`).
    """
    logger = get_run_logger()
    root = str(ROOT)
    selected = select_stages(stages, pipeline_stages(ROOT))
    logger.info("project %s; stages: %s", root, " -> ".join(selected) or "(none)")
    unplanned = [s for s in selected if s not in RETRIES]
    if unplanned:
        logger.info("stage(s) %s are not in flows.pipeline.STAGES: no retries", unplanned)

    data = apply_params(
        root,
        overrides_for(
            source=source, data_path=data_path, size=size, quick=quick, extra=overrides or ()
        ),
    )
    for stage in selected:
        retries = RETRIES.get(stage, 0)
        if stage == "ingest" and data.get("source") == "movielens" and not data.get("path"):
            retries = 1  # it downloads MovieLens: a network error may not happen twice
        stage_task = dvc_repro.with_options(
            name=stage, task_run_name=stage, retries=retries, retry_delay_seconds=RETRY_DELAY_S
        )
        stage_task(stage, root)
    experiment = save_experiment(root)
    publish(root, experiment, report_ran="report" in selected)
    return experiment


if __name__ == "__main__":
    ptum_flow()
