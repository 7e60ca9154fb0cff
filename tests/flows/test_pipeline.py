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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import write_ptum_tsv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The whole pipeline (ingest -> ... -> tune -> export -> report) on the quick preset: the tiny
# synthetic log, tiny encoders, one model per task; a few minutes on 2 CPUs.
QUICK_RUN = ("quick=true",)
WATCH_TIMEOUT = 1200
# Vocabulary sizes of the two concurrent runs: both differ from the quick preset's 400.
VOCABS = (320, 360)
USERS = 60  # users of the PTUM behavior.tsv written for the flow


@dataclass
class Served:
    copy: Path
    api: str  # http://127.0.0.1:PORT/api
    env: dict[str, str]
    logs: Path
    serve: subprocess.Popen


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
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
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
        yield Served(copy=copy, api=api, env=env, logs=logs, serve=serve)
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


def _log_messages(served: Served, until: Callable[[list[str]], bool], **where: dict) -> list[str]:
    """Messages of the logs matching `where` (a LogFilter: flow_run_id, task_run_id, level),
    polled for up to 30 s until `until(messages)` holds: Prefect ships a run's last lines in
    batches, so they may reach the server after `--watch` has seen the final state."""
    deadline = time.monotonic() + 30
    while True:
        body = {"logs": where, "limit": 200}
        messages = [log["message"] for log in _post(served, "logs/filter", body)]
        if until(messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


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


def _params_bytes(served: Served) -> bytes:
    return (served.copy / "params.yaml").read_bytes()


def _experiments(served: Served) -> dict[str, str]:
    """{experiment name: ref} of every DVC experiment in the copy."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=served.copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {r.rsplit("/", 1)[1]: r for r in refs if not r.startswith("refs/exps/exec/")}


def _show(served: Served, ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{ref}:{path}"],
        cwd=served.copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _artifacts(served: Served, run_id: str) -> dict[str, dict]:
    found = _post(served, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"]: a for a in found}


def test_quick_run_is_an_experiment_and_leaves_the_workspace_alone(served):
    params_before = _params_bytes(served)
    lock_before = (served.copy / "dvc.lock").read_bytes()
    name = f"quick-{uuid.uuid4().hex[:8]}"
    result = _deployment_run(served, name, *QUICK_RUN)
    assert result.returncode == 0, _explain(served, result)
    assert _params_bytes(served) == params_before
    assert (served.copy / "dvc.lock").read_bytes() == lock_before

    run = _flow_run(served, name)
    assert run["state_type"] == "COMPLETED"
    task_runs = _task_runs(served, run["id"])
    states = {n: r["state_type"] for n, r in task_runs.items()}
    assert set(states.values()) == {"COMPLETED"}, states
    stages = {"ingest", "prepare", "tokenize", "pretrain@hsa", "pretrain@nativectr", "report"}
    assert stages <= set(states), states
    assert "pretrain@han" not in states  # the quick preset's architectures only
    # The run graph is the pipeline's DAG: tokenize waits for prepare, export@hsa for
    # pretrain@hsa (task inputs name the upstream task runs).
    ids = {r["id"]: n for n, r in task_runs.items()}

    def upstream(stage):
        inputs = task_runs[stage]["task_inputs"].get("wait_for", [])
        return {ids.get(i["id"]) for i in inputs}

    assert "prepare" in upstream("tokenize")
    assert "pretrain@hsa" in upstream("export@hsa")

    # Readable logs: the stage's own lines where they matter, not every line.
    def tokenize_lines(ms: list[str]) -> bool:
        return any("Running stage 'tokenize'" in m for m in ms) and any(
            "ptum tokenize: done" in m for m in ms
        )

    messages = _log_messages(
        served, tokenize_lines, task_run_id={"any_": [task_runs["tokenize"]["id"]]}
    )
    assert tokenize_lines(messages), messages
    all_logs = _post(
        served, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
    )
    assert len(all_logs) < 200, len(all_logs)
    (log_file,) = (served.copy / "logs" / "flows").glob(f"{name}.log")
    assert "ptum pretrain" in log_file.read_text()

    # Versioned as a DVC experiment whose params.yaml holds the run's values.
    artifacts = _artifacts(served, run["id"])
    assert {"ptum-params", "ptum-results", "ptum-metrics", "ptum-log"} <= set(artifacts)
    params_table = artifacts["ptum-params"]["data"]
    params_table = json.loads(params_table) if isinstance(params_table, str) else params_table
    assert {"param": "data.size", "value": '"tiny"', "from": "override"} in params_table
    exps = _experiments(served)
    assert len(exps) == 1, exps
    ((experiment, ref),) = exps.items()
    recorded = yaml.safe_load(_show(served, ref, "params.yaml"))
    assert recorded["data"]["size"] == "tiny"
    assert recorded["pretrain"]["architectures"] == ["hsa", "nativectr"]
    results = artifacts["ptum-results"]["data"]
    assert results == _show(served, ref, "reports/results.md")
    assert "## Demographic prediction" in results and "## CTR" in results, results
    table = artifacts["ptum-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert any(
        r["file"] == "data/tokenized/report.json" and r["metric"] == "vocab_size" for r in table
    ), table
    assert json.loads(_show(served, ref, "reports/pretrain/hsa/metrics.json"))

    # The same run again is a no-op: nothing runs, no second experiment.
    again = f"again-{uuid.uuid4().hex[:8]}"
    result = _deployment_run(served, again, *QUICK_RUN)
    assert result.returncode == 0, _explain(served, result)
    assert _experiments(served) == exps
    exists = f"experiment {experiment} exists"
    messages = _log_messages(
        served,
        lambda ms: any(exists in m for m in ms),
        flow_run_id={"any_": [_flow_run(served, again)["id"]]},
    )
    assert any(exists in m for m in messages), messages
    assert _params_bytes(served) == params_before


def test_failing_stage_fails_the_run_and_leaves_params_alone(served, tmp_path):
    params_before = _params_bytes(served)
    name = f"broken-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "no-such-logs"
    result = _deployment_run(served, name, "quick=true", "source=generic", f"data_path={missing}")
    assert result.returncode != 0, _explain(served, result)
    assert _params_bytes(served) == params_before

    run = _flow_run(served, name)
    assert run["state_type"] == "FAILED"
    task_runs = _task_runs(served, run["id"])
    states = {n: r["state_type"] for n, r in task_runs.items()}
    assert states.get("ingest") == "FAILED", states
    assert states.get("experiment") == "FAILED", states
    # Exit code 2 (a ConfigError/DataError) is not worth a retry: one attempt only.
    assert task_runs["experiment"]["run_count"] == 1, task_runs["experiment"]
    assert not {"COMPLETED", "RUNNING"} & {states.get(s) for s in ("prepare", "tokenize")}

    def named(ms: list[str]) -> bool:
        return any("ptum ingest: error" in m and str(missing) in m for m in ms)

    errors = _log_messages(served, named, flow_run_id={"any_": [run["id"]]}, level={"ge_": 40})
    assert named(errors), errors


def test_two_runs_at_once_are_serialized_and_each_records_its_own_params(served):
    """Two runs of the tokenize stage with different vocabulary sizes, triggered together."""
    names = {vocab: f"vocab{vocab}-{uuid.uuid4().hex[:6]}" for vocab in VOCABS}
    before = set(_experiments(served))
    procs = {
        vocab: subprocess.Popen(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "ptum/full",
                "--watch",
                "--watch-timeout",
                str(WATCH_TIMEOUT),
                "--flow-run-name",
                name,
                "--param",
                "quick=true",
                "--param",
                'stages=["tokenize"]',
                "--param",
                f'overrides=["tokenize.vocab_size={vocab}"]',
            ],
            cwd=served.copy,
            env=served.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for vocab, name in names.items()
    }
    for proc in procs.values():
        out, _ = proc.communicate(timeout=WATCH_TIMEOUT + 60)
        assert proc.returncode == 0, out

    runs = {vocab: _flow_run(served, name) for vocab, name in names.items()}
    first, second = sorted(runs.values(), key=lambda r: r["start_time"])
    assert second["start_time"] >= first["end_time"], (first, second)
    states = httpx.get(
        f"{served.api}/flow_run_states/", params={"flow_run_id": second["id"]}, timeout=10
    ).json()
    assert "AwaitingConcurrencySlot" in {s["name"] for s in states}, [s["name"] for s in states]

    new = {n: r for n, r in _experiments(served).items() if n not in before}
    assert len(new) == 2, new
    seen = set()
    for ref in new.values():
        vocab = yaml.safe_load(_show(served, ref, "params.yaml"))["tokenize"]["vocab_size"]
        computed = json.loads(_show(served, ref, "data/tokenized/report.json"))
        assert computed["vocab_size_requested"] == vocab, (ref, vocab, computed)
        lock = yaml.safe_load(_show(served, ref, "dvc.lock"))
        locked = lock["stages"]["tokenize"]["params"]["params.yaml"]["tokenize"]
        assert locked["vocab_size"] == vocab
        seen.add(vocab)
    assert seen == set(VOCABS)


def test_a_run_on_a_ptum_behavior_tsv_outside_the_project_says_which_tasks_it_allows(
    served, tmp_path
):
    """The flow's `source` and `data_path` parameters on a file outside the project (the paper's
    layout, behaviors only), up to `prepare`: the run completes and its experiment records what
    the data allows. (The whole pipeline on this layout: tests/test_ptum_format.py.)"""
    src = write_ptum_tsv(tmp_path / "behavior.tsv", users=USERS, seed=1)
    name = f"ptumtsv-{uuid.uuid4().hex[:8]}"
    before = set(_experiments(served))
    result = _deployment_run(
        served,
        name,
        "quick=true",
        "source=ptum_tsv",
        f"data_path={src}",
        'stages=["prepare"]',
    )
    assert result.returncode == 0, _explain(served, result)
    run = _flow_run(served, name)
    assert run["state_type"] == "COMPLETED"
    states = {n: r["state_type"] for n, r in _task_runs(served, run["id"]).items()}
    assert states.get("ingest") == states.get("prepare") == "COMPLETED", states
    (ref,) = [r for n, r in _experiments(served).items() if n not in before]
    report = json.loads(_show(served, ref, "data/prepared/report.json"))
    assert report["behaviors"]["users"] == USERS, report["behaviors"]
    assert report["tasks"]["ctr"] is False and not report["tasks"]["demo"], report["tasks"]
    assert set(report["tasks"]["why_not"]) == {"ctr", "demo"}, report["tasks"]


def test_serve_stops_cleanly_on_sigterm(served):
    served.serve.send_signal(signal.SIGTERM)
    try:
        served.serve.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("python -m flows.serve did not exit within 30 s of SIGTERM")
