"""The fine-tuning grid's cache of cell results: one JSON file per cell under the cache
directory, named by a key of everything the result depends on (cell, options, split,
checkpoint, data, code), verified by the hash written with it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ptum.finetune.baselines import FACTOR_BASELINES
from ptum.io import atomic_write_text

if TYPE_CHECKING:
    from ptum.finetune.cells import Cell, SplitSpec
    from ptum.finetune.options import CellOptions


class CacheEntryCorrupt(ValueError):
    """A cached cell whose content does not match the hash written with it."""


def read_entry(path: Path, key: str) -> dict:
    """A cached cell result, verified: line 1 holds its key and the SHA-256 of line 2."""
    try:
        head, _, body = path.read_bytes().decode("utf-8").partition("\n")
        entry = json.loads(head)
        ok = entry["key"] == key and entry["sha256"] == hashlib.sha256(body.encode()).hexdigest()
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CacheEntryCorrupt(
            f"{path}: cached cell does not match the hash recorded with it (edited, truncated or "
            "from an older ptum); delete the file (or the whole cache directory) and rerun: "
            "the cell is recomputed"
        )
    return json.loads(body)


def write_entry(path: Path, key: str, res: dict) -> None:
    """Cache a cell result as `read_entry` reads it: its key and hash, then the result."""
    body = json.dumps(res, sort_keys=True)
    entry = {"key": key, "sha256": hashlib.sha256(body.encode()).hexdigest()}
    atomic_write_text(path, json.dumps(entry) + "\n" + body)


@dataclass(frozen=True)
class CellKeys:
    """Everything a cell's result depends on besides the cell itself: its cache key's inputs."""

    opts: CellOptions
    demo_select: str
    class_weights: tuple[str, ...]
    split: SplitSpec
    model_hashes: dict[str, str]  # architecture -> checkpoint weights hash
    data_hash: str
    code_hash: str
    pool: str | None = None  # users_digest of GridOptions.pool (None: every training user)
    labeled: str | None = None  # users_digest of GridOptions.labeled (None: every labeled user)

    def key(self, c: Cell) -> str:
        """The cell's cache key (24 hex digits)."""
        # Baselines depend on the selection metric (Demo) but not on the neural options; those
        # that factorize the unlabeled users on the pre-training pool too.
        if c.mode == "baseline":
            setup: list = [self.demo_select]
            if c.model in FACTOR_BASELINES and self.pool is not None:
                setup.append({"pool": self.pool})
        else:
            setup = [asdict(self.opts), self.demo_select, list(self.class_weights)]
        if self.labeled is not None:  # the tasks keep only these users
            setup.append({"labeled": self.labeled})
        blob = json.dumps(
            [
                asdict(c),
                setup,
                asdict(self.split),
                self.model_hashes.get(c.model, ""),
                self.data_hash,
                self.code_hash,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def from_cache(
    cells: list[Cell], cache_dir: Path, keys: CellKeys
) -> tuple[dict[str, dict], list[Cell]]:
    """(results of the cached cells by name, the cells still to run); creates cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for c in cells:
        f = cache_dir / f"{keys.key(c)}.json"
        if f.exists():
            results[c.name] = read_entry(f, keys.key(c))
        else:
            todo.append(c)
    return results, todo
