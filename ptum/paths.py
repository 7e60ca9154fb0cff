"""Every input and output path of the pipeline, in one place.

Paths are relative to the project root: `ptum STAGE` and `dvc repro` run there. The stage entry
points (`ptum.stages`), the CLI and the Prefect flow take their paths from here; `dvc.yaml` is
the one other copy (DVC needs them literally), and tests/test_paths.py fails when the two
disagree. Library functions never use this module: they take the paths they read and write as
arguments.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")  # every parameter, one section per stage

# --- stage ingest -----------------------------------------------------------------------------
RAW = Path("data/raw")  # the generic format: behaviors, impressions, users (+ manifest)
RAW_MANIFEST = RAW / "manifest.json"

# --- stage prepare ----------------------------------------------------------------------------
PREPARED = Path("data/prepared")
PREPARED_TABLES = ("items", "sequences", "users", "labels", "impressions")
PREPARED_REPORT = PREPARED / "report.json"
PREPARED_METRICS = PREPARED / "metrics.json"  # its dozen headline numbers (a DVC metric)
PREPARED_MANIFEST = PREPARED / "manifest.json"  # SHA-256 of each file above (ptum.data.verified)


def prepared_table(name: str) -> Path:
    """data/prepared/NAME.parquet, NAME one of PREPARED_TABLES."""
    if name not in PREPARED_TABLES:
        raise ValueError(f"unknown prepared table {name!r}; one of {PREPARED_TABLES}")
    return PREPARED / f"{name}.parquet"


# --- stage tokenize ---------------------------------------------------------------------------
TOKENIZED = Path("data/tokenized")
SPM_MODEL = TOKENIZED / "spm.model"
SPM_VOCAB = TOKENIZED / "spm.vocab"
TOKENS = TOKENIZED / "tokens.npy"
LENGTHS = TOKENIZED / "lengths.npy"
TOKENIZE_REPORT = TOKENIZED / "report.json"
TOKENIZED_MANIFEST = TOKENIZED / "manifest.json"  # SHA-256 of each file above (ptum.data.verified)

# --- stage pretrain@ARCH ----------------------------------------------------------------------
PRETRAIN_MODELS = Path("models/pretrain")
PRETRAIN_REPORTS = Path("reports/pretrain")


def pretrain_model(arch: str) -> Path:
    """models/pretrain/ARCH: the checkpoint of one architecture."""
    return PRETRAIN_MODELS / arch


def pretrain_report(arch: str) -> Path:
    """reports/pretrain/ARCH: metrics.json and history.json of one pre-training."""
    return PRETRAIN_REPORTS / arch


def pretrain_metrics(arch: str) -> Path:
    """reports/pretrain/ARCH/metrics.json: the stage's headline numbers (a DVC metric)."""
    return pretrain_report(arch) / "metrics.json"


def pretrain_history(arch: str) -> Path:
    """reports/pretrain/ARCH/history.json: one row per epoch (a DVC plot)."""
    return pretrain_report(arch) / "history.json"


# --- stage finetune@TASK ----------------------------------------------------------------------
FINETUNE_REPORTS = Path("reports/finetune")
FINETUNE_CACHE = Path("models/finetune_cache")
TASKS = ("demo", "ctr")


def finetune_result(task: str) -> Path:
    """reports/finetune/TASK.json; the stage writes TASK_predictions.parquet and
    TASK_metrics.json beside it."""
    return FINETUNE_REPORTS / f"{task}.json"


def finetune_predictions(task: str) -> Path:
    return FINETUNE_REPORTS / f"{task}_predictions.parquet"


def finetune_metrics(task: str) -> Path:
    return FINETUNE_REPORTS / f"{task}_metrics.json"


def finetune_cache(task: str) -> Path:
    """models/finetune_cache/TASK: one hash-keyed entry per finished grid cell."""
    return FINETUNE_CACHE / task


# --- stage sensitivity ------------------------------------------------------------------------
REPORTS = Path("reports")
SENSITIVITY_MODELS = Path("models/sensitivity")
SENSITIVITY_CACHE = FINETUNE_CACHE / "sensitivity"
# What the stage writes under REPORTS:
SENSITIVITY_JSON = REPORTS / "sensitivity.json"
SENSITIVITY_METRICS = REPORTS / "sensitivity" / "metrics.json"  # the DVC metrics (headline)
SENSITIVITY_PRETRAIN_REPORTS = REPORTS / "sensitivity" / "pretrain"
FIGURES = REPORTS / "figures"
PLOTS = REPORTS / "plots"
SENSITIVITY_GROUPS = ("ablation", "lambda", "k")


def sensitivity_plot(task: str, group: str) -> Path:
    """reports/plots/TASK_GROUP.json: one DVC plot table per task and sweep."""
    if group not in SENSITIVITY_GROUPS:
        raise ValueError(f"unknown sensitivity group {group!r}; one of {SENSITIVITY_GROUPS}")
    return PLOTS / f"{task}_{group}.json"


# --- stage regime -----------------------------------------------------------------------------
REGIME_MODELS = Path("models/regime")  # models/regime/poolM/ARCH
REGIME_CACHE = FINETUNE_CACHE / "regime"
# What the stage writes under REPORTS (reports/figures and reports/plots are sensitivity's):
REGIME_JSON = REPORTS / "regime.json"
REGIME_MD = REPORTS / "regime.md"
REGIME_REPORTS = REPORTS / "regime"
REGIME_PRETRAIN_REPORTS = REGIME_REPORTS / "pretrain"  # poolM/ARCH: each pre-training's
REGIME_FIGURES = REGIME_REPORTS / "figures"  # TASK.png
REGIME_PLOT = REGIME_REPORTS / "plot.json"  # the DVC plot


# --- stage tune -------------------------------------------------------------------------------
TUNE_DATA = Path("data/tune")  # the default tune.storage (optuna.db) lives here too
TUNE_TRIALS = TUNE_DATA / "trials"
TUNE_REPORTS = Path("reports/tune")
BEST_PARAMS = TUNE_REPORTS / "best_params.json"
TUNE_FIGURES = TUNE_REPORTS / "figures"

# --- stage export@ARCH and command embed ------------------------------------------------------
ONNX = Path("models/onnx")
EMBEDDINGS = Path("data/embeddings")  # command embed (not a DVC stage)


def onnx_model(arch: str) -> Path:
    """models/onnx/ARCH: the exported ONNX files and export.json."""
    return ONNX / arch


def embeddings(arch: str) -> Path:
    """data/embeddings/ARCH.parquet: `ptum embed`'s default output."""
    return EMBEDDINGS / f"{arch}.parquet"


# --- stage report and the Prefect flow --------------------------------------------------------
RESULTS_MD = REPORTS / "results.md"
FLOW_LOGS = Path("logs/flows")  # one log file per flow run (not a DVC output)


# --- which stage writes a path ----------------------------------------------------------------
_PRODUCERS: tuple[tuple[Path, str], ...] = (
    (RAW, "ingest"),
    (PREPARED, "prepare"),
    (TOKENIZED, "tokenize"),
    (PRETRAIN_MODELS, "pretrain"),
    (PRETRAIN_REPORTS, "pretrain"),
    (FINETUNE_CACHE / "sensitivity", "sensitivity"),
    (REGIME_CACHE, "regime"),
    (FINETUNE_CACHE, "finetune"),
    (FINETUNE_REPORTS, "finetune"),
    (SENSITIVITY_MODELS, "sensitivity"),
    (REGIME_MODELS, "regime"),
    (REGIME_JSON, "regime"),
    (REGIME_MD, "regime"),
    (REGIME_REPORTS, "regime"),
    (SENSITIVITY_JSON, "sensitivity"),
    (REPORTS / "sensitivity", "sensitivity"),
    (FIGURES, "sensitivity"),
    (PLOTS, "sensitivity"),
    (TUNE_DATA, "tune"),
    (TUNE_REPORTS, "tune"),
    (ONNX, "export"),
    (RESULTS_MD, "report"),
)


def producer(path: Path | str) -> str | None:
    """The stage that writes `path` (a pipeline path, relative or under the cwd), or None."""
    path = Path(path)
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            return None
    for root, stage in _PRODUCERS:
        if path == root or root in path.parents:
            return stage
    return None
