"""End to end: deployment `ptum/full` served against a real Prefect server, in a copy of the repo.

The module copies the project's files (tracked, plus untracked ones git does not ignore) into a
temporary git repository, starts `prefect server start` on a free 127.0.0.1 port with its own
PREFECT_HOME and sqlite database, starts `python -m flows.serve` in the copy and triggers runs
with `prefect deployment run ptum/full --watch`, as a user would. Nothing touches the real
workspace's DVC state. Every process started here is stopped (its whole process group) at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from flows.pipeline import pipeline_stages, select_stages

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The whole pipeline (ingest -> ... -> tune -> export -> report) on the quick preset: the tiny
# synthetic log, tiny encoders, one model per task; a few minutes on 2 CPUs.
QUICK_RUN = (
    "quick=true",
    "source=synthetic",  # explicit: the workspace keeps the previous run's params
    "data_path=",
)
WATCH_TIMEOUT = 1200


@dataclass
class Served:
    copy: Path
    api: str  # http://127.0.0.1:PORT/api
    env: dict[str, str]
    logs: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_project(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():  # skip files deleted in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=ptum-test", "-c", "user.email=test@ptum.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy for the flow test"], cwd=dest, check=True)


def _start(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _kill_leftovers(root: Path) -> None:
    """Kill what still runs inside `root` once serve is stopped: a stage command the flow started
    in its own session (to stop it as a group) outlives serve if the run was cut short."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout}s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("flow")
    copy = tmp / "project"
    copy.mkdir()
    _copy_project(copy)

    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
        "PYTHONPATH": str(copy),  # `ptum` and `flows` import the copy's code
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick runs up within a second
        "DVC_NO_ANALYTICS": "1",
    }
    port = api.split(":")[-1].split("/")[0]
    logs = tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        server_log = logs / "server.log"
        server = _start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
            cwd=tmp,
            env=env,
            log=server_log,
        )
        procs.append(server)
        _wait_for(
            "prefect server",
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
            server,
            server_log,
            timeout=120,
        )

        serve_log = logs / "serve.log"
        serve = _start([sys.executable, "-m", "flows.serve"], cwd=copy, env=env, log=serve_log)
        procs.append(serve)
        _wait_for(
            "python -m flows.serve",
            lambda: httpx.get(f"{api}/deployments/name/ptum/full", timeout=2).status_code == 200,
            serve,
            serve_log,
            timeout=90,
        )
        yield Served(copy=copy, api=api, env=env, logs=logs)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        _kill_leftovers(copy)


def _deployment_run(served: Served, name: str, *params: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "prefect"), "deployment", "run", "ptum/full", "--watch"]
    cmd += ["--watch-timeout", str(WATCH_TIMEOUT), "--flow-run-name", name]
    for p in params:
        cmd += ["--param", p]
    return subprocess.run(
        cmd,
        cwd=served.copy,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=WATCH_TIMEOUT + 60,
    )


def _post(served: Served, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{served.api}/{path}", json=body, timeout=10)
    r.raise_for_status()
    return r.json()


def _flow_run(served: Served, name: str) -> dict:
    (run,) = _post(served, "flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return run


def _task_runs(served: Served, run_id: str) -> dict[str, dict]:
    runs = _post(served, "task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"]: r for r in runs}


def _log_messages(served: Served, **where: dict) -> list[str]:
    """Messages of the logs matching `where` (a LogFilter: flow_run_id, task_run_id, level)."""
    return [log["message"] for log in _post(served, "logs/filter", {"logs": where, "limit": 200})]


def _dvc(served: Served, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=served.copy,
        env=served.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _explain(served: Served, result: subprocess.CompletedProcess) -> str:
    serve_log = (served.logs / "serve.log").read_text()[-6000:]
    return f"{result.stdout}\n{result.stderr}\n--- serve.log ---\n{serve_log}"


def test_quick_run_completes_versions_and_publishes(served):
    name = f"quick-{uuid.uuid4().hex[:8]}"
    result = _deployment_run(served, name, *QUICK_RUN)
    assert result.returncode == 0, _explain(served, result)

    run = _flow_run(served, name)
    assert run["state_type"] == "COMPLETED"
    task_runs = _task_runs(served, run["id"])
    states = {name: r["state_type"] for name, r in task_runs.items()}
    for stage in select_stages(None, pipeline_stages(served.copy)):
        assert states.get(stage) == "COMPLETED", states
    assert set(states.values()) == {"COMPLETED"}, states

    # The stage's own output was streamed into its task run's logs.
    messages = _log_messages(served, task_run_id={"any_": [task_runs["tokenize"]["id"]]})
    assert any("Running stage 'tokenize'" in m for m in messages), messages
    assert any("ptum tokenize: done" in m for m in messages), messages

    artifacts = _post(
        served,
        "artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
    )
    by_key = {a["key"]: a for a in artifacts}
    assert {"ptum-results", "ptum-metrics"} <= set(by_key), artifacts
    results = by_key["ptum-results"]["data"]
    # The report stage ran, so the artifact is reports/results.md with both tasks' tables.
    assert results == (served.copy / "reports/results.md").read_text(encoding="utf-8")
    assert "## Demographic prediction" in results and "## CTR" in results, results
    table = by_key["ptum-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert set(table[0]) == {"file", "metric", "value"}
    assert any(
        r["file"] == "data/tokenized/report.json" and r["metric"] == "vocab_size" for r in table
    ), table

    # Versioned: params.yaml holds the run's values, DVC is clean, the run is an experiment.
    params = yaml.safe_load((served.copy / "params.yaml").read_text(encoding="utf-8"))
    assert params["data"]["size"] == "tiny"
    assert params["pretrain"]["architectures"] == ["hsa", "nativectr"]
    for out in (
        "models/onnx/hsa/user_model.onnx",
        "reports/tune/best_params.json",
        "reports/finetune/ctr.json",
        "reports/sensitivity.json",
    ):
        assert (served.copy / out).exists(), out
    assert json.loads(_dvc(served, "status", "--json", "dvc.yaml") or "{}") == {}
    experiment = f"ptum-{name}-{run['id'][:8]}"
    assert experiment in _dvc(served, "exp", "list", "--name-only")
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=served.copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    (ref,) = [r for r in refs if r.endswith(f"/{experiment}")]
    committed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref],
        cwd=served.copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"params.yaml", "dvc.lock"} | {r["file"] for r in table} <= set(committed)


def test_failing_stage_fails_the_run_with_its_error_in_the_logs(served, tmp_path):
    name = f"broken-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "no-such-logs"
    result = _deployment_run(served, name, "quick=true", "source=generic", f"data_path={missing}")
    assert result.returncode != 0, _explain(served, result)

    run = _flow_run(served, name)
    assert run["state_type"] == "FAILED"
    states = {name: r["state_type"] for name, r in _task_runs(served, run["id"]).items()}
    assert states.get("ingest") == "FAILED", states
    assert not {"prepare", "tokenize"} & set(states), states  # nothing ran after the failure

    # The stage's own error line (from `ptum ingest`, through DVC) is in an ERROR log.
    errors = _log_messages(served, flow_run_id={"any_": [run["id"]]}, level={"ge_": 40})
    assert any("ptum ingest: error" in m and str(missing) in m for m in errors), errors
