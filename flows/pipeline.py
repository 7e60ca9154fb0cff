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

This module holds the flow and its tasks; the plain parts they call live beside it:
`flows.params` (flow parameters -> overrides, effective params), `flows.plan` (dvc.yaml ->
stages and their upstream stages), `flows.experiment` (running `dvc exp run --temp` and reading
its output by stage, the retry rule, the experiment's name), `flows.artifacts` (the tables and
markdown a run publishes).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
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

from flows.artifacts import flatten_metrics, metrics_markdown, params_rows
from flows.experiment import (
    Experiment,
    StageError,
    experiment_name,
    experiment_ref,
    git,
    is_retryable,
    retry_if_transient,
)
from flows.params import effective_params, overrides_for, set_args
from flows.plan import select_stages, stage_plan
from ptum import paths

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = paths.RESULTS_MD
LOG_DIR = paths.FLOW_LOGS
EXPERIMENT_RETRIES = 1
RETRY_DELAY_S = 30
PROGRESS_EVERY_S = 60.0  # a stage's plain output reaches the run logs at most this often
# Lines a person wants to see when they happen: warnings, errors, a stage's last word.
NOTABLE = re.compile(r"(?i)warn|error|exception|traceback|failed|: done in|killed")
WARNISH = re.compile(r"(?i)warn")
ERRORISH = re.compile(r"(?i)error|exception|traceback|failed|killed")


@dataclass(frozen=True)
class Setup:
    """What the `params` task decided: the command's arguments and the experiment's name."""

    overrides: dict[str, Any]
    stages: list[str]  # in run order (upstream stages first)
    upstream: dict[str, list[str]]
    targets: list[str]
    name: str
    baseline: str
    existing: bool  # the experiment exists: nothing to run


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

    exp = _experiment(setup, rerun=rerun)
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


def _experiment(setup: Setup, *, rerun: bool) -> Experiment:
    """The `dvc exp run` of this flow run, its log file linked from the Prefect UI."""
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
    return exp


if __name__ == "__main__":
    ptum_flow()
