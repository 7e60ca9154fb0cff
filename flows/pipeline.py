"""Flow `ptum`: one flow run = one DVC experiment, run in isolation by `dvc exp run --temp`.

    params -> experiment (`dvc exp run --temp -S ...`) -> one task per stage -> publish

A flow run never edits the workspace. Its parameters become `-S section.key=value` overrides of
`dvc exp run --temp`, which runs the whole pipeline in a temporary copy of the repository
(.dvc/tmp/exps/...) sharing the DVC cache, and saves the result as an experiment: params.yaml
with the overrides applied, dvc.lock, metrics and plots, committed under refs/exps (`dvc exp
show`, `dvc exp apply NAME`). The checkout's params.yaml and dvc.lock stay what the user wrote,
whatever the run does, and two experiments never share a params.yaml or a dvc.lock.

Tasks:
  * `params`: the flow parameters -> overrides (quick -> ptum.presets.QUICK, then source,
    data_path, size, then `overrides`; later ones win), checked with ptum's config schema before
    anything runs; the effective parameters (params.yaml + overrides) are published as the table
    artifact `ptum-params`. A run whose experiment exists already (same commit, same uncommitted
    changes, same overrides and stages: the name `ptum-<hash>` says so) is a no-op: nothing is
    run or saved, the existing experiment is reported.
  * `experiment`: runs `dvc exp run --temp` once, writes its whole output to
    logs/flows/<flow run>.log and hands each line to the stage it belongs to. Retried (the whole
    experiment, stages whose outputs DVC has cached are restored, not recomputed) only when the
    failure can pass: a stage or DVC killed by a signal (out of memory, a lost machine), or an
    OSError starting it; a stage that exits with an error (a Python exception, a ConfigError's
    exit code 2) fails the same way again and is not retried.
  * one task per stage (`pretrain@hsa`, ...), waiting for its upstream stages' tasks (the run
    graph is the pipeline's DAG): it follows its stage in the experiment's output and logs a
    readable summary (start, warnings, errors, a progress line at most every PROGRESS_EVERY_S
    seconds, the end); it fails with the stage's error.
  * `publish`: markdown artifact `ptum-results` (the experiment's reports/results.md, or its
    metrics as tables) and table artifact `ptum-metrics` (every scalar metric of the experiment).

Deployment `full` (flows/serve.py) has a server-side concurrency limit of 1: runs started while
one is running wait in state AwaitingConcurrencySlot and start in turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from ptum import paths
from ptum.config import load_params, parse_override
from ptum.presets import QUICK

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = paths.RESULTS_MD
LOG_DIR = paths.FLOW_LOGS
EXPERIMENT_RETRIES = 1
RETRY_DELAY_S = 30
ERROR_TAIL = 40  # stage output lines quoted in a failed stage's exception
PROGRESS_EVERY_S = 60.0  # a stage's plain output reaches the run logs at most this often
# Lines a person wants to see when they happen: warnings, errors, a stage's last word.
NOTABLE = re.compile(r"(?i)warn|error|exception|traceback|failed|: done in|killed")
WARNISH = re.compile(r"(?i)warn")
ERRORISH = re.compile(r"(?i)error|exception|traceback|failed|killed")


class StageError(RuntimeError):
    """A command (or a stage of the experiment) failed; the message ends with its last lines."""

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


# --- parameters -------------------------------------------------------------------------------


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


def hydra_value(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): strings always quoted, so
    that "", "1e-4" or "a: b" stay strings; lists and dicts written out element by element."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """{"section.key": value} -> ["-S", "section.key=value", ...] for `dvc exp run`."""
    return [a for k, v in overrides.items() for a in ("-S", f"{k}={hydra_value(v)}")]


def effective_params(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml with the overrides applied (what the experiment's params.yaml will hold).

    Validated with ptum's schema first: an unknown key or a wrong type fails here, before DVC
    runs anything.
    """
    load_params(params_file, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    spec = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = spec
        for name in sections:
            node = node.setdefault(name, {})
        node[leaf] = value
    return spec


def params_rows(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One {param, value, from} row per leaf of the effective params (lists kept whole)."""
    rows = []
    for key, value in _leaves(spec, lists=False):
        source = "override" if key in overrides else "params.yaml"
        rows.append({"param": key, "value": json.dumps(value), "from": source})
    return rows


# --- the stage plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """The experiment's stages in dvc.yaml order (foreach stages resolved: `pretrain@hsa`) and,
    per stage, the stages whose outputs it reads."""

    order: list[str]
    upstream: dict[str, list[str]] = field(default_factory=dict)


def _paths(entries: Iterable[Any]) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries (a path, or {path: options}) -> paths."""
    out = []
    for entry in entries or ():
        out += list(entry) if isinstance(entry, Mapping) else [entry]
    return [str(p).rstrip("/") for p in out]


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
    stages producing what it depends on (a dep equal to, inside or above another stage's out)."""
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
            deps = [_substitute(p, item, params) for p in _paths(body.get("deps"))]
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
    return StagePlan(order=list(io), upstream=upstream)


def select_stages(plan: StagePlan, requested: Iterable[str] | None) -> list[str]:
    """The stages an experiment with these targets runs (targets and everything upstream), in
    dvc.yaml order. A target is a stage (`tokenize`), a foreach group (`pretrain`) or one of its
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


# --- running DVC ------------------------------------------------------------------------------


def stage_env(root: Path) -> dict[str, str]:
    """Environment for DVC and the stage commands it runs.

    This interpreter's bin directory goes first on PATH so that the `ptum` commands in dvc.yaml
    resolve to this environment; PYTHONUNBUFFERED makes the stages print lines as they happen.
    (No PYTHONPATH: the stages run in DVC's temporary copy and import the `ptum` installed in
    the environment, which `pip install -e .` points at this checkout.)
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(*args: str, root: Path) -> str:
    """Run a short DVC command and return its stdout (StageError when it fails)."""
    return _run([sys.executable, "-m", "dvc", *args], root)


def git(*args: str, root: Path) -> str:
    return _run(["git", *args], root)


def _run(cmd: list[str], root: Path) -> str:
    proc = subprocess.run(
        cmd,
        cwd=root,
        env=stage_env(root),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    if proc.returncode != 0:
        raise StageError(
            f"`{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` exited with code "
            f"{proc.returncode}:\n" + (proc.stderr.strip() or proc.stdout.strip()),
            returncode=proc.returncode,
        )
    return proc.stdout


# DVC's lines that mark where a stage starts or is skipped (dvc/stage/run.py, stage/cache.py).
_STAGE_LINE = re.compile(
    r"^(?:Running stage '(?P<run>[^']+)':"
    r"|Stage '(?P<same>[^']+)' didn't change, skipping"
    r"|Stage '(?P<cached>[^']+)' is cached - skipping run, checking out outputs)"
)
_EXIT_STATUS = re.compile(r"exited with (-?\d+)")


@dataclass
class Event:
    kind: str  # start | unchanged | cached | line | done | failed | absent | retrying
    text: str = ""
    returncode: int | None = None


class Experiment:
    """One `dvc exp run --temp` (restarted on a retry) and the stage events read from its output.

    A reader thread splits the output by stage (DVC runs one stage at a time and says which) and
    puts Events on one queue per stage; the whole output goes to `log_file`.
    """

    def __init__(self, cmd: list[str], *, root: Path, stages: list[str], log_file: Path) -> None:
        self.cmd, self.root, self.stages, self.log_file = cmd, root, stages, log_file
        self.queues: dict[str, queue.Queue[Event]] = {s: queue.Queue() for s in stages}
        self.finished: set[str] = set()  # stages done (in this or an earlier attempt)
        self.final = threading.Event()  # no further attempt will come
        self.current: str | None = None
        self.tail: deque[str] = deque(maxlen=ERROR_TAIL)
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        """Run the command to its end, dispatching its lines; StageError if it fails."""
        self.current = None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(self.cmd)}\n")
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.root,
                env=stage_env(self.root),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                # In this process's group: a runner stopping or cancelling the flow run signals
                # the group, which reaches DVC and the stage it runs.
            )
            try:
                for raw in self.proc.stdout:  # type: ignore[union-attr]
                    line = raw.rstrip("\r\n")
                    log.write(raw if raw.endswith("\n") else raw + "\n")
                    log.flush()
                    self._dispatch(line)
                code = self.proc.wait()
            except BaseException:
                self.stop()
                raise
        if code == 0:
            self._end_current("done")
            return
        status = [int(s) for s in _EXIT_STATUS.findall("\n".join(self.tail))]
        stage_code = status[-1] if status else code
        raise StageError(
            "`dvc exp run` failed"
            + (f" in stage '{self.current}'" if self.current else "")
            + f" (exit status {stage_code}); last output:\n"
            + "\n".join(self.tail),
            returncode=stage_code,
        )

    def stop(self) -> None:
        """Stop DVC (it stops the stage it runs) when this run is interrupted."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _dispatch(self, line: str) -> None:
        m = _STAGE_LINE.match(line)
        if m:
            self._end_current("done")
            kind = "start" if m["run"] else "unchanged" if m["same"] else "cached"
            stage = m["run"] or m["same"] or m["cached"]
            self._put(stage, Event(kind, line))
            if kind == "start":
                self.current, self.tail = stage, deque(maxlen=ERROR_TAIL)
            else:
                self.finished.add(stage)
            return
        self.tail.append(line)
        if self.current is not None:
            self._put(self.current, Event("line", line))
            if line.startswith("Updating lock file"):  # DVC's last word on a stage it ran
                self._end_current("done")

    def _end_current(self, kind: str) -> None:
        if self.current is not None:
            self.finished.add(self.current)
            self._put(self.current, Event(kind))
            self.current = None

    def _put(self, stage: str, event: Event) -> None:
        if stage in self.queues:
            self.queues[stage].put(event)

    def settle(self, error: StageError | None, *, will_retry: bool) -> None:
        """After an attempt: tell the failed stage (if any) what happened; when no attempt
        follows, tell every stage that never finished that it will not run."""
        if error is not None and self.current is not None:
            kind = "retrying" if will_retry else "failed"
            self._put(self.current, Event(kind, str(error), error.returncode))
            if not will_retry:
                self.finished.add(self.current)  # it has had its say
            self.current = None
        if not will_retry:
            self.final.set()
            for stage in self.stages:
                if stage not in self.finished:
                    self._put(stage, Event("absent", str(error or "")))


def is_retryable(exc: BaseException) -> bool:
    """Can this failure pass on a second try? A process killed by a signal (out of memory, a
    lost machine, a restart) or an OSError starting it: yes. A non-zero exit (an exception in
    the stage, a ConfigError's code 2): no, it fails the same way again."""
    if isinstance(exc, StageError):
        code = exc.returncode
        # A signal's exit status: -N from Popen, 128+N from a shell (DVC's own errors are 255).
        return code is not None and (code < 0 or 128 < code <= 128 + 64)
    return isinstance(exc, OSError)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only what is_retryable says can pass."""
    try:
        state.result()
    except Exception as exc:  # the failure that ended this attempt
        return is_retryable(exc)
    return False


# --- tasks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the `params` task decided: the command's arguments and the experiment's name."""

    overrides: dict[str, Any]
    stages: list[str]  # in dvc.yaml order
    upstream: dict[str, list[str]]
    targets: list[str]
    name: str
    baseline: str
    existing: bool  # the experiment exists: nothing to run


def experiment_name(baseline: str, diff: str, overrides: Mapping[str, Any], targets: list[str]):
    """`ptum-<hash>` of what the experiment computes from: the commit, the uncommitted changes
    of tracked files (which `dvc exp run --temp` includes), the overrides and the targets."""
    key = json.dumps([baseline, diff, sorted(overrides.items()), targets], default=str)
    return "ptum-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def experiment_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


@task(name="params", task_run_name="params", cache_policy=NO_CACHE)
def plan_run(root: str, overrides: dict[str, Any], stages: list[str] | None) -> Setup:
    """Validate the overrides, publish the effective params, plan the stages, name the run."""
    logger = get_run_logger()
    root_path = Path(root)
    spec = effective_params(root_path / "params.yaml", overrides)
    dvc_yaml = yaml.safe_load((root_path / "dvc.yaml").read_text(encoding="utf-8")) or {}
    plan = stage_plan(dvc_yaml, spec)
    selected = select_stages(plan, stages)
    baseline = git("rev-parse", "HEAD", root=root_path).strip()
    diff = git("diff", "HEAD", "--binary", root=root_path)
    name = experiment_name(baseline, diff, overrides, list(stages or []))
    existing = bool(git("for-each-ref", experiment_ref(baseline, name), root=root_path).strip())
    create_table_artifact(
        table=params_rows(spec, overrides),
        key="ptum-params",
        description=f"effective parameters of experiment {name}: params.yaml + "
        f"{len(overrides)} override(s)",
    )
    logger.info(
        "experiment %s on %s%s: %d override(s); stages: %s",
        name,
        baseline[:8],
        " + uncommitted changes" if diff else "",
        len(overrides),
        " ".join(selected),
    )
    return Setup(
        overrides=overrides,
        stages=selected,
        upstream={s: [u for u in plan.upstream[s] if u in selected] for s in selected},
        targets=list(stages or []),
        name=name,
        baseline=baseline,
        existing=existing,
    )


@task(
    name="experiment",
    task_run_name="experiment",
    cache_policy=NO_CACHE,
    retries=EXPERIMENT_RETRIES,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=retry_if_transient,
)
def run_experiment(exp: Experiment) -> str:
    """`dvc exp run --temp`: the whole pipeline in a temporary copy; returns the experiment."""
    logger = get_run_logger()
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx else 1
    logger.info("$ %s  (attempt %d; full output: %s)", " ".join(exp.cmd[2:]), attempt, exp.log_file)
    try:
        exp.run()
    except Exception as exc:
        retries = ctx.task.retries if ctx else 0
        will_retry = is_retryable(exc) and attempt <= retries
        exp.settle(exc if isinstance(exc, StageError) else None, will_retry=will_retry)
        raise
    exp.settle(None, will_retry=False)
    return exp.cmd[exp.cmd.index("--name") + 1]


@task(cache_policy=NO_CACHE)
def follow_stage(stage: str, exp: Experiment) -> str:
    """Follow one stage in the experiment's output; log what a person needs to read."""
    logger = get_run_logger()
    last_progress = 0.0
    held: str | None = None  # the latest plain line not logged yet
    plain = 0
    while True:
        event = exp.queues[stage].get()
        if event.kind == "line":
            text = event.text
            now = time.monotonic()
            if NOTABLE.search(text):
                level = logging.ERROR if ERRORISH.search(text) else logging.INFO
                logger.log(logging.WARNING if WARNISH.search(text) else level, text)
            elif now - last_progress >= PROGRESS_EVERY_S:
                logger.info(text)
                last_progress, held = now, None
            else:
                held, plain = text, plain + 1
            continue
        if event.kind == "start":
            logger.info(event.text)
            last_progress = time.monotonic()
        elif event.kind in ("unchanged", "cached"):
            logger.info(event.text)
            return event.kind
        elif event.kind == "done":
            if held:
                logger.info(held)
            logger.info("stage %s finished (%d progress lines in %s)", stage, plain, exp.log_file)
            return "ran"
        elif event.kind == "retrying":
            logger.warning(
                "stage %s was interrupted; the experiment is retried:\n%s", stage, event.text
            )
        elif event.kind == "failed":
            raise StageError(event.text, returncode=event.returncode)
        elif event.kind == "absent":
            return Cancelled(message=f"not run: the experiment ended before stage {stage}")


@task(name="publish", task_run_name="publish", cache_policy=NO_CACHE)
def publish(root: str, name: str, ref: str) -> None:
    """Markdown artifact `ptum-results` and table artifact `ptum-metrics` of the experiment."""
    from dvc.repo import Repo

    root_path = Path(root)
    with Repo(root) as repo:
        rows = flatten_metrics(repo.metrics.show(revs=[ref]))
        recorded = repo.params.show(revs=[ref])
    try:
        markdown = git("show", f"{ref}:{RESULTS_MD.as_posix()}", root=root_path)
        source = str(RESULTS_MD)
    except StageError:  # the experiment did not run the report stage
        markdown, source = metrics_markdown(rows, name), "dvc metrics"
    create_markdown_artifact(
        markdown=markdown, key="ptum-results", description=f"{source} of DVC experiment {name}"
    )
    create_table_artifact(
        table=rows, key="ptum-metrics", description=f"every metric of DVC experiment {name}"
    )
    n_params = sum(len(f.get("data") or {}) for r in recorded.values() for f in r["data"].values())
    get_run_logger().info(
        "published ptum-results (%s) and ptum-metrics (%d rows) of experiment %s "
        "(%d param sections recorded): `dvc exp show`, `dvc exp apply %s`",
        source,
        len(rows),
        name,
        n_params,
        name,
    )


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


def exp_command(setup: Setup, message: str, *, rerun: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", setup.name]
    cmd += ["--message", message, *set_args(setup.overrides)]
    return cmd + (["--force"] if rerun else []) + setup.targets


@flow(
    name="ptum",
    description="Pre-train user models: the DVC pipeline as one isolated DVC experiment.",
    task_runner=ThreadPoolTaskRunner(max_workers=64),  # stage tasks mostly wait
)
def ptum_flow(
    source: str | None = None,
    data_path: str | None = None,
    size: str | None = None,
    quick: bool = False,
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    rerun: bool = False,
) -> str:
    """Run the pipeline as DVC experiment `ptum-<hash>`; return its name.

    Args:
        source: data.source (synthetic | movielens | generic | ptum_tsv); None keeps params.yaml's.
        data_path: data.path (a directory or file; "" for synthetic); None keeps params.yaml's.
        size: data.size, the synthetic preset (tiny | small | default | large).
        quick: ptum.presets.QUICK, every stage shrunk for a smoke run of a few minutes.
        stages: stages to run (with everything upstream); None runs the whole dvc.yaml.
        overrides: any other `section.key=value` overrides, applied last (e.g.
            "pretrain.epochs=5"; values in YAML, as for `ptum STAGE --set`).
        rerun: run every stage again even if the same experiment exists (`dvc exp run -f`).
    """
    logger = get_run_logger()
    root = str(ROOT)
    wanted = overrides_for(
        source=source, data_path=data_path, size=size, quick=quick, extra=overrides or ()
    )
    setup = plan_run(root, wanted, stages)
    ref = experiment_ref(setup.baseline, setup.name)
    if setup.existing and not rerun:
        logger.info(
            "experiment %s exists (same commit, changes, parameters and stages): nothing to "
            "run; pass rerun=true to compute it again",
            setup.name,
        )
        publish(root, setup.name, ref)
        return setup.name

    run_name = flow_run.name or "run"
    exp = Experiment(
        exp_command(setup, f"ptum flow run {run_name} ({flow_run.id})", rerun=rerun),
        root=ROOT,
        stages=setup.stages,
        log_file=ROOT / LOG_DIR / f"{run_name}.log",
    )
    create_link_artifact(
        link=exp.log_file.as_uri(),
        link_text=str(LOG_DIR / exp.log_file.name),
        key="ptum-log",
        description="the experiment's whole output (every stage's log)",
    )
    experiment = run_experiment.submit(exp)
    futures: dict[str, Any] = {}
    for stage in setup.stages:
        futures[stage] = follow_stage.with_options(name=stage, task_run_name=stage).submit(
            stage, exp, wait_for=[futures[u] for u in setup.upstream[stage]]
        )
    for future in futures.values():
        future.wait()
    name = experiment.result()  # raises (the flow fails) if the experiment failed
    published = publish.submit(root, name, ref, wait_for=list(futures.values()))
    published.result()
    return name


if __name__ == "__main__":
    ptum_flow()
