"""Shared fixtures: tiny data sets built inside the test session (nothing is downloaded)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from ptum.config import PrepareConfig
from ptum.data.ingest import ingest
from ptum.data.prepare import prepare
from ptum.stages.prepare import prepare_options
from ptum.tokenize import tokenize

MOVIELENS_100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"

# Under pytest-xdist (`make test`: one process per core) each test process and everything it
# starts (stage subprocesses, grid workers) uses one torch/OpenMP thread: two processes with
# a thread per core each wait on each other's threads, several times slower in all.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


# The longest modules (`make test --durations`), longest first.
LONGEST = (
    "tests.flows.test_pipeline",
    "tests.faults.test_corrupt",
    "tests.faults.test_faults",
    "tests.faults.test_concurrency",
    "tests.test_ptum_format",
    "tests.finetune.test_controls",
    "tests.stages.test_multinode",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first, then the other modules with slow (end-to-end) tests, then
    the rest, each module's tests in their own order: with `make test`'s two processes (xdist
    --dist loadscope --no-loadscope-reorder) the long modules start at once instead of leaving
    one process alone at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        name = item.module.__name__
        if name in LONGEST:
            return LONGEST.index(name)
        return len(LONGEST) + (name not in slow)

    items.sort(key=rank)


def write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


PTUM_SEP = "#|NTABN|#"  # the PTUM behavior.tsv layout's separator of one user's behaviors


def write_ptum_tsv(path: Path, *, users: int, seed: int) -> Path:
    """A behavior.tsv in the original PTUM layout (behaviors only, no labels or impressions):
    user id, an unused column, the user's texts and their timestamps, each joined by PTUM_SEP."""
    rng = random.Random(seed)
    lines = []
    for u in range(users):
        n = rng.randint(4, 12)
        texts = PTUM_SEP.join(f"title {rng.randrange(40)} word{rng.randrange(9)}" for _ in range(n))
        stamps = PTUM_SEP.join(str(1000 * u + 10 * k) for k in range(n))
        lines.append(f"u{u}\tx\t{texts}\t{stamps}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """ingest -> prepare -> tokenize on the tiny synthetic preset; returns the data root."""
    root = tmp_path_factory.mktemp("tiny")
    ingest(source="synthetic", path="", out_dir=root / "raw", size="tiny", seed=7)
    prepare(
        root / "raw",
        root / "prepared",
        prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2)),
    )
    tokenize(
        root / "prepared" / "items.parquet",
        root / "tokenized",
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        max_tokens=16,
        character_coverage=1.0,
        seed=1,
    )
    return root


@pytest.fixture(scope="session")
def behaviors_only(tmp_path_factory):
    """data/prepared of a PTUM behavior.tsv: behaviors only, no labels and no impressions."""
    root = tmp_path_factory.mktemp("ptum_tsv")
    write_ptum_tsv(root / "behavior.tsv", users=8, seed=0)
    ingest(source="ptum_tsv", path=str(root / "behavior.tsv"), out_dir=root / "raw")
    prepare(root / "raw", root / "prepared", prepare_options(PrepareConfig(max_behaviors=4)))
    return root
