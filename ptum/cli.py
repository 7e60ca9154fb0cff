"""The `ptum` command: argument parsing and dispatch, one subcommand per pipeline stage.

`ptum STAGE` loads params.yaml (plus `--set section.key=value` overrides) and calls
`ptum.stages.STAGE.run`, which reads its section and calls the library:
    ptum prepare --set prepare.max_behaviors=50 --set prepare.on_bad_rows=quarantine

A run holds the lock of the stage's outputs (`ptum.locks`): a second run writing one of them
refuses at once. The `ptum` process stops (SIGTERM) when the process that started it dies, so
a killed `dvc repro` leaves no stage running; `nohup ptum ...` opts out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ptum import locks, paths
from ptum.config import Params, load_params
from ptum.stages import errors

# The parent PID as early as this process can see it: if the parent dies before main() arms the
# parent-death signal, the PID differs by then (the process was re-parented).
STARTED_BY = os.getppid()


def _given(**kwargs: Any) -> dict[str, Any]:
    """The options given on the command line (None = not given: the stage's default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


# One function per stage, named `_STAGE` (tests/test_dvc_deps.py derives each stage's code deps
# from the imports inside it): CLI arguments -> ptum.stages.STAGE.run.


def _ingest(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import ingest

    return ingest.run(p, **_given(out=args.out))


def _prepare(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import prepare

    return prepare.run(p, **_given(raw=args.input, out=args.out))


def _tokenize(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import tokenize

    return tokenize.run(p, **_given(prepared=args.input, out=args.out))


def _pretrain(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import pretrain

    # Each data-parallel rank re-runs this very command, less the options that start ranks (a
    # rank is one process).
    command = args.argv
    for option in _LAUNCH_OPTIONS:
        command = _without_option(command, option)
    return pretrain.run(
        p,
        **_given(arch=args.arch, prepared=args.input, out=args.out),
        nproc=args.nproc,
        **_given(nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint),
        command=command,
    )


_LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _finetune(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import finetune

    return finetune.run(p, **_given(task=args.task, prepared=args.input, out=args.out))


def _sensitivity(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import sensitivity

    return sensitivity.run(p)


def _regime(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import regime

    return regime.run(p)


def _tune(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import tune

    return tune.run(
        p,
        **_given(prepared=args.input, out=args.out),
        workers=args.workers,
        worker=args.worker,
    )


def _export(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import export

    return export.run(p, **_given(arch=args.arch, ckpt=args.input, out=args.out))


def _embed(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import embed

    return embed.run(p, **_given(arch=args.arch, src=args.input, model=args.model, out=args.out))


def _report(p: Params, args: argparse.Namespace) -> dict:
    from ptum.stages import report

    return report.run(p, **_given(out=args.out))


STAGES = {
    "ingest": (_ingest, "bring a data source into the generic format (data/raw)"),
    "prepare": (_prepare, "validate, build items, user sequences and splits (data/prepared)"),
    "tokenize": (_tokenize, "train SentencePiece and encode each item once (data/tokenized)"),
    "pretrain": (_pretrain, "pre-train one user model with MBP + NBP (models/pretrain/ARCH)"),
    "finetune": (_finetune, "fine-tuning grid of one task: demo or ctr (reports/finetune)"),
    "sensitivity": (_sensitivity, "ablation and λ/K sweeps (reports/sensitivity.json, figures)"),
    "regime": (
        _regime,
        "pre-training pools of growing size around the labeled set (reports/regime.md)",
    ),
    "tune": (_tune, "Optuna search over K, λ, P and lr (data/tune/optuna.db, reports/tune)"),
    "export": (_export, "export a pre-trained model and serving heads to ONNX (models/onnx/ARCH)"),
    "embed": (
        _embed,
        "user vectors from a behavior log with onnxruntime, no torch "
        "(data/embeddings/ARCH.parquet)",
    ),
    "report": (_report, "write reports/results.md from the pipeline's outputs"),
}


_ARCH = "architecture (default: the first of pretrain.architectures)"
# Options beyond --params/--set/--input/--out: (flags, add_argument keywords) per stage.
_OPTIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "finetune": [("--task", dict(choices=paths.TASKS, help="downstream task (default: demo)"))],
    "pretrain": [
        ("--arch", dict(help=_ARCH)),
        (
            "--nproc",
            dict(
                type=int,
                default=0,
                help="data-parallel processes on this machine (default: pretrain.processes)",
            ),
        ),
        (
            "--nnodes",
            dict(
                type=int,
                metavar="N",
                help="machines pre-training together, each running this command with its own "
                "--node-rank (default: 1)",
            ),
        ),
        (
            "--node-rank",
            dict(
                type=int,
                metavar="R",
                help="this machine's index, 0 to N-1; node 0 hosts the rendezvous and writes "
                "the checkpoint (default: 0)",
            ),
        ),
        (
            "--rdzv-endpoint",
            dict(
                metavar="HOST:PORT",
                help="node 0's address and a free port, the same on every machine; node 0 "
                "listens there, unauthenticated: a private network or a firewall",
            ),
        ),
    ],
    "tune": [
        (
            "--workers",
            dict(type=int, default=0, help="local worker processes (default: tune.workers)"),
        ),
        (
            "--worker",
            dict(
                type=int,
                default=0,
                help="this machine's index among machines running "
                "one study by hand (offsets the sampler seed)",
            ),
        ),
    ],
    "export": [("--arch", dict(help=_ARCH))],
    "embed": [
        ("--arch", dict(help=_ARCH)),
        ("--model", dict(type=Path, help="exported model directory (default: models/onnx/ARCH)")),
    ],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptum", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument(
            "--params", type=Path, default=None, help="params file (default: params.yaml)"
        )
        s.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a parameter (repeatable)",
        )
        s.add_argument("--input", type=Path, default=None, help="input directory override")
        s.add_argument("--out", type=Path, default=None, help="output directory override")
        for flag, kwargs in _OPTIONS.get(name, []):
            s.add_argument(flag, **kwargs)
    return parser


def outputs(p: Params, args: argparse.Namespace) -> list[Path]:
    """The outputs `ptum STAGE` writes, as its arguments choose them: each is locked for the
    run (a stage's other files are written by it alone under these, or atomically)."""
    arch = getattr(args, "arch", None) or p.pretrain.architectures[0]
    task = getattr(args, "task", None) or "demo"  # ptum.stages.finetune.run's default
    default = {
        "ingest": paths.RAW,
        "prepare": paths.PREPARED,
        "tokenize": paths.TOKENIZED,
        "pretrain": paths.pretrain_model(arch),  # its reports go with it
        "finetune": paths.finetune_result(task),
        "sensitivity": paths.SENSITIVITY_MODELS,
        "regime": paths.REGIME_MODELS,
        "tune": paths.TUNE_REPORTS,  # the study's storage takes several workers itself
        "export": paths.onnx_model(arch),
        "embed": paths.embeddings(arch),
        "report": paths.RESULTS_MD,
    }[args.stage]
    if args.stage == "pretrain" and (getattr(args, "node_rank", None) or 0) != 0:
        return []  # node 0 writes (its rank 0); it may share this machine's directory
    found = [args.out or default]
    if args.stage == "finetune":
        found.append(paths.finetune_cache(task))  # shared by every --out of the task
    return found


def main(argv: list[str] | None = None) -> int:
    """Run `ptum STAGE ...` (`argv`; None: this process's command line, and then this process
    stops when its parent dies: `locks.stop_with_parent`). Returns the exit code: 0 done,
    1 a bug, 2 an anticipated failure (one line on stderr), 130 interrupted."""
    if argv is None:
        locks.stop_with_parent(STARTED_BY)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    errors.track_json_reads()
    t0 = time.perf_counter()
    try:
        params = load_params(
            args.params or paths.PARAMS, args.overrides, required=args.params is not None
        )
        run, _ = STAGES[args.stage]
        # Ranks other than 0 of a group started by the user's own torchrun share rank 0's.
        rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
        with locks.holding(outputs(params, args) if rank == "0" else []):
            result = run(params, args)
    except KeyboardInterrupt:
        print(f"ptum {args.stage}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # also BaseExceptions of native code (pyo3's PanicException)
        return _failed(args.stage, exc)
    summary = json.dumps(result, indent=1, sort_keys=True, default=str)
    print(summary if len(summary) < 4000 else summary[:4000] + "\n...")
    print(f"ptum {args.stage}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _failed(stage: str, exc: BaseException) -> int:
    """Report a failed run: one line and exit code 2 when `errors.explain` knows the failure,
    else the traceback and exit code 1 (a bug); a run stopped by a signal after saving (pre-
    training's Interrupted carries the signal) exits 128 + the signal's number."""
    signum = getattr(exc, "signum", None)
    if isinstance(signum, int):
        print(f"ptum {stage}: {exc}", file=sys.stderr)
        return 128 + signum
    line = errors.explain(exc)
    if line is None:
        traceback.print_exception(exc)
        print(
            f"ptum {stage}: unexpected error ({type(exc).__name__}): {errors.REPORT_TO}",
            file=sys.stderr,
        )
        return 1
    if os.environ.get("PTUM_DEBUG"):
        raise exc
    print(f"ptum {stage}: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
