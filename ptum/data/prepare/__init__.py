"""Prepare: validate the generic tables, build the item table, user sequences and splits.

Outputs (in `out_dir`):
    items.parquet        item_id i32 (1..N; 0 is the padding item), text, n_behaviors
    sequences.parquet    user_id, view, item_ids list[i32], timestamps list[i64], gaps list[i64],
                         n_total (behaviors in the view before truncation to max_behaviors)
    users.parquet        user_id, n_behaviors, pretrain_split ("train" | "valid" | null)
    labels.parquet       user_id, <label columns>, split ("train"|"valid"|"test"), train_<r>...
    impressions.parquet  user_id, timestamp, item_id, clicked, window ("train"|"valid"|"test"),
                         train_<r>... (nested training subsets of the train window)
    report.json          the data report (rows read = kept + dropped per reason, always) and
                         `tasks`: the downstream tasks the data allows (see tasks.py)
    metrics.json         the report's dozen headline numbers (the stage's DVC metric)
    manifest.json        the SHA-256 of each file above, written last; every reader checks
                         the file it reads against it (`ptum.data.verified`)
    quarantine/<table>.parquet   bad rows with their line and reason (quarantine mode only)

Sequence views (each time-ordered, the last `max_behaviors` kept, gaps = seconds since the
previous behavior, computed before truncation so the first kept gap is true):
    full          every behavior of a labeled user: the input of the demographic tasks
    before_test   behaviors strictly before the user's CTR-test window: the pre-training corpus
                  of every user, and the history of CTR-test impressions
    before_train  behaviors strictly before the CTR-train window: history of CTR-train/valid

So the pre-training corpus never contains a test impression (nor, for MovieLens, where ratings are
both behaviors and impressions, the test ratings themselves) and never any label.

`prepare` takes `PrepareOptions` (one field per `prepare.*` key it uses), which the stage
`ptum.stages.prepare` builds from params.yaml.

Modules, one job each:
    sources      the tables of the raw directory, checked against the ingest manifest
    validate     row checks, duplicates, unknown users; error or quarantine; the row counts
    items        the item table (items keyed by text) and impressions as item ids
    views        the sequence views, cut from per-user timelines
    splits       CTR windows (global cut-offs), label and impression splits, nested subsets
    options      `PrepareOptions`, the explicit arguments of `prepare`
    in_memory    the outputs from a log that fits in memory
    chunked      the same outputs, streaming a big log in chunks of whole users
    report       the data report
    tasks        which downstream tasks the prepared data allows (`available_tasks`)
    build        `prepare`: picks the runner, writes the splits and the report atomically
"""

from ptum.data.prepare.build import prepare
from ptum.data.prepare.items import build_items, item_table
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.splits import (
    WINDOW_ORDER,
    ctr_cutoffs,
    global_cutoffs,
    global_windows,
    ratio_column,
    split_impressions,
    split_labels,
)
from ptum.data.prepare.tasks import available_tasks
from ptum.data.prepare.views import SEQUENCE_ROW_GROUP, SEQUENCE_SCHEMA, VIEWS, sequences

__all__ = [
    "PrepareOptions",
    "SEQUENCE_ROW_GROUP",
    "SEQUENCE_SCHEMA",
    "VIEWS",
    "WINDOW_ORDER",
    "available_tasks",
    "build_items",
    "ctr_cutoffs",
    "global_cutoffs",
    "global_windows",
    "item_table",
    "prepare",
    "ratio_column",
    "sequences",
    "split_impressions",
    "split_labels",
]
