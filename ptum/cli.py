"""The `ptum` command: one subcommand per pipeline stage (thin: parse config, call the library).

Every stage reads its own section of params.yaml and accepts overrides:
    ptum prepare --set prepare.max_behaviors=50 --set prepare.on_bad_rows=quarantine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ptum import paths
from ptum.config import ConfigError, Params, load_params, to_dict
from ptum.data.errors import DataError

RAW = paths.RAW
PREPARED = paths.PREPARED
TOKENIZED = paths.TOKENIZED


def _ingest(p: Params, args: argparse.Namespace) -> dict:
    from ptum.data.ingest import ingest

    d = p.data
    return ingest(
        source=d.source,
        path=d.path,
        out_dir=args.out or RAW,
        size=d.size,
        seed=d.seed,
        click_threshold=d.click_threshold,
        age_edges=d.age_edges,
        movielens_variant=d.movielens_variant,
    )


def _prepare(p: Params, args: argparse.Namespace) -> dict:
    from ptum.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        **to_dict(p.prepare)
        | {"demo_split": p.prepare.demo_split, "label_ratios": p.prepare.label_ratios}
    )
    return prepare(args.input or RAW, args.out or PREPARED, opts)


def _tokenize(p: Params, args: argparse.Namespace) -> dict:
    from ptum.tokenize import tokenize

    t = p.tokenize
    return tokenize(
        (args.input or PREPARED) / "items.parquet",
        args.out or TOKENIZED,
        vocab_size=t.vocab_size,
        model_type=t.model_type,
        byte_fallback=t.byte_fallback,
        max_tokens=t.max_tokens,
        character_coverage=t.character_coverage,
        seed=t.seed,
    )


def _pretrain(p: Params, args: argparse.Namespace) -> dict:
    arch = args.arch or p.pretrain.architectures[0]
    out = args.out or paths.pretrain_model(arch)
    # With --out (a side experiment), its history/metrics go beside it, not over the stage's.
    report = args.out / "reports" if args.out else paths.pretrain_report(arch)
    procs = args.nproc or p.pretrain.processes
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        # Re-launch this very command under torchrun: one process per data-parallel rank.
        # (--nproc is dropped: torchrun's parser would mistake it for its own option; inside
        # torchrun WORLD_SIZE is set, which stops the recursion.)
        argv = [
            a
            for i, a in enumerate(sys.argv[1:])
            if not a.startswith("--nproc") and not (i and sys.argv[i] == "--nproc")
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "ptum",
            *argv,
        ]
        subprocess.run(cmd, check=True)
        return json.loads((report / "metrics.json").read_text())
    from ptum.pretrain.stage import run_stage

    return run_stage(
        p.pretrain,
        arch,
        prepared=args.input or PREPARED,
        tokenized=TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        out_dir=out,
        report_dir=report,
        tuned_path=paths.BEST_PARAMS,
    )


def _split_spec(p: Params):
    """How each repeat of a fine-tuning grid re-draws its split: prepare's shares."""
    from ptum.finetune.grid import SplitSpec

    return SplitSpec(
        demo_fractions=tuple(p.prepare.demo_split), ctr_valid_frac=p.prepare.ctr_valid_frac
    )


def _finetune(p: Params, args: argparse.Namespace) -> dict:
    from ptum.finetune.stage import run_stage

    task = args.task or "demo"
    return run_stage(
        p.finetune,
        task,
        prepared=args.input or PREPARED,
        tokenized=TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        ckpt_root=paths.PRETRAIN_MODELS,
        split=_split_spec(p),
        cache_dir=paths.finetune_cache(task),
        out=args.out or paths.finetune_result(task),
    )


def _sensitivity(p: Params, args: argparse.Namespace) -> dict:
    from ptum.finetune import sensitivity as sens

    s = p.sensitivity
    opts = sens.SensitivityOptions(
        tasks=s.tasks,
        demo_model=s.demo_model,
        ctr_model=s.ctr_model,
        lams=s.lams,
        ks=s.ks,
        ratio=s.ratio,
        repeats=s.repeats,
    )
    reports = paths.REPORTS
    results = sens.run(
        p.pretrain,
        p.finetune,
        opts,
        prepared=PREPARED,
        tokenized=TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        models_root=paths.SENSITIVITY_MODELS,
        main_ckpts=paths.PRETRAIN_MODELS,
        cache_dir=paths.SENSITIVITY_CACHE,
        reports=reports,
        split=_split_spec(p),
    )
    sens.write_outputs(results, reports)
    return {
        t: {k: round(e["mean"], 4) for k, e in r["experiments"].items()} for t, r in results.items()
    }


def _report(p: Params, args: argparse.Namespace) -> dict:
    from ptum.report import build

    text = build(
        finetune={t: paths.finetune_result(t) for t in paths.TASKS},
        sensitivity=paths.SENSITIVITY_JSON,
        pretrain={a: paths.pretrain_metrics(a) for a in p.pretrain.architectures},
        data_report=paths.PREPARED_REPORT,
        raw_manifest=paths.RAW_MANIFEST,
        params=to_dict(p),
        out=args.out or paths.RESULTS_MD,
    )
    return {"lines": text.count("\n")}


def _tune(p: Params, args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from ptum.finetune.stage import cell_options
    from ptum.pretrain.stage import train_options
    from ptum.tune import SearchSpace, StudySpec, TrialSetup, default_study_name, tune

    t = p.tune
    setup = TrialSetup(
        prepared=args.input or PREPARED,
        tokenized=TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        arch=t.arch,
        behavior_encoder=p.pretrain.behavior_encoder,
        model_sizes=to_dict(p.pretrain.model),
        base=replace(train_options(p.pretrain), epochs=t.epochs, seed=t.seed),
        space=SearchSpace(k=t.k, lam=t.lam, p=t.p, lr=t.lr),
        finetune=replace(cell_options(p.finetune), max_epochs=t.finetune_epochs),
        demo_select=p.finetune.demo_select,
        multi_objective=t.multi_objective,
        device=p.pretrain.device,
        work_dir=paths.TUNE_TRIALS,
    )
    spec = StudySpec(
        storage=t.storage,
        study_name=t.study_name or default_study_name(setup, t.seed),
        n_trials=t.n_trials,
        seed=t.seed,
        pruner=t.pruner,
        prune_startup_trials=t.prune_startup_trials,
        heartbeat_interval=t.heartbeat_interval,
        grace_period=t.grace_period,
        retry_killed=t.retry_killed,
        worker=args.worker,
    )
    out = args.out or paths.TUNE_REPORTS
    summary = tune(
        setup=setup,
        spec=spec,
        best_params_path=out / "best_params.json",
        reports_dir=out / "figures",
        n_workers=args.workers or t.workers,
    )
    return {k: v for k, v in summary.items() if k != "pareto_front"}


def _export(p: Params, args: argparse.Namespace) -> dict:
    from ptum.checkpoint import read_meta
    from ptum.export import export

    e = p.export
    arch = args.arch or p.pretrain.architectures[0]
    ckpt = args.input or paths.pretrain_model(arch)
    meta = read_meta(ckpt)
    demo_heads, ctr_head = None, None
    if e.heads:
        from ptum.finetune.serving import train_serving_heads

        demo_heads, ctr_head = train_serving_heads(
            ckpt,
            prepared=PREPARED,
            tokenized=TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            cfg=p.finetune,
            seed=e.head_seed,
        )
    # The params the checkpoint was trained with (its meta), not today's params.yaml.
    params = {
        "pretrain": meta.get("pretrain_params"),
        "max_behaviors": meta.get("max_behaviors"),
        "export": to_dict(e),
    }
    return export(
        ckpt,
        args.out or paths.onnx_model(arch),
        opset=e.opset,
        spm_model=paths.SPM_MODEL,
        data_version=e.data_version or meta.get("data_sha256", "unknown"),
        params=params,
        example_batch=e.example_batch,
        example_behaviors=e.example_behaviors,
        example_tokens=e.example_tokens,
        demo_heads=demo_heads,
        ctr_head=ctr_head,
    )


def _embed(p: Params, args: argparse.Namespace) -> dict:
    from ptum.data.generic import find_table
    from ptum.embed import embed

    arch = args.arch or p.pretrain.architectures[0]
    src = args.input or RAW
    if src.is_dir():
        found = find_table(src, "behaviors")
        if found is None:
            raise FileNotFoundError(f"{src}: no behaviors.parquet / behaviors.tsv")
        src = found
    return embed(
        src,
        args.model or paths.onnx_model(arch),
        args.out or paths.embeddings(arch),
        batch_size=p.embed.batch_size,
        demo=p.embed.demo,
    )


STAGES = {
    "ingest": (_ingest, "bring a data source into the generic format (data/raw)"),
    "prepare": (_prepare, "validate, build items, user sequences and splits (data/prepared)"),
    "tokenize": (_tokenize, "train SentencePiece and encode each item once (data/tokenized)"),
    "pretrain": (_pretrain, "pre-train one user model with MBP + NBP (models/pretrain/ARCH)"),
    "finetune": (_finetune, "fine-tuning grid of one task: demo or ctr (reports/finetune)"),
    "sensitivity": (_sensitivity, "ablation and λ/K sweeps (reports/sensitivity.json, figures)"),
    "tune": (_tune, "Optuna search over K, λ, P and lr (data/tune/optuna.db, reports/tune)"),
    "export": (_export, "export a pre-trained model and serving heads to ONNX (models/onnx/ARCH)"),
    "embed": (
        _embed,
        "user vectors from a behavior log with onnxruntime, no torch "
        "(data/embeddings/ARCH.parquet)",
    ),
    "report": (_report, "write reports/results.md from the pipeline's outputs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptum", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument(
            "--params",
            type=Path,
            default=paths.PARAMS,
            help="params file (default: params.yaml)",
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
        if name == "finetune":
            s.add_argument(
                "--task",
                choices=paths.TASKS,
                default=None,
                help="downstream task (default: demo)",
            )
        if name in ("export", "embed"):
            s.add_argument(
                "--arch",
                default=None,
                help="architecture (default: the first of pretrain.architectures)",
            )
        if name == "embed":
            s.add_argument(
                "--model",
                type=Path,
                default=None,
                help="exported model directory (default: models/onnx/ARCH)",
            )
        if name == "tune":
            s.add_argument(
                "--workers",
                type=int,
                default=0,
                help="local worker processes (default: tune.workers)",
            )
            s.add_argument(
                "--worker",
                type=int,
                default=0,
                help="this machine's index among "
                "machines running one study by hand (offsets the sampler seed)",
            )
        if name == "pretrain":
            s.add_argument(
                "--arch",
                default=None,
                help="architecture (default: the first of pretrain.architectures)",
            )
            s.add_argument(
                "--nproc",
                type=int,
                default=0,
                help="data-parallel processes (default: pretrain.processes)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        run, _ = STAGES[args.stage]
        t0 = time.perf_counter()
        result = run(params, args)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        if os.environ.get("PTUM_DEBUG"):
            raise
        print(f"ptum {args.stage}: error: {e}", file=sys.stderr)
        return 2
    summary = json.dumps(result, indent=1, sort_keys=True, default=str)
    print(summary if len(summary) < 4000 else summary[:4000] + "\n...")
    print(f"ptum {args.stage}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
