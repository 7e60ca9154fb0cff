"""Running DVC: one `dvc exp run --temp` and the stage events read from its output, the retry
rule, and the experiment's name."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptum.locks import die_with_parent

ERROR_TAIL = 40  # stage output lines quoted in a failed stage's exception


class StageError(RuntimeError):
    """A command (or a stage of the experiment) failed; the message ends with its last lines."""

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


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
                # the group, which reaches DVC and the stage it runs. And DVC dies with this
                # process (Linux), even when it is killed by SIGKILL; the stage dies with DVC.
                preexec_fn=die_with_parent,
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


def experiment_name(baseline: str, diff: str, overrides: Mapping[str, Any], targets: list[str]):
    """`ptum-<hash>` of what the experiment computes from: the commit, the uncommitted changes
    of tracked files (which `dvc exp run --temp` includes), the overrides and the targets."""
    key = json.dumps([baseline, diff, sorted(overrides.items()), targets], default=str)
    return "ptum-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def experiment_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
