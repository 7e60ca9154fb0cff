"""The tuned pre-training values: what `pretrain.use_tuned: true` takes from the tune stage's
best_params.json, read with a clear refusal when the file is missing, damaged or empty."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# dvc.yaml's pretrain stage declares exactly these keys of best_params.json
# (tests/tune/test_use_tuned.py).
TUNED_KEYS = ("k", "lam", "p", "lr")


def read_tuned(path: Path | None, max_behaviors: int | None = None) -> dict[str, Any]:
    """k, lam, p, lr from the tune stage's best_params.json; a clear error when it is missing,
    lacks one of them or holds a value pre-training cannot use (k must also stay below
    `max_behaviors`, as pretrain.k must)."""
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"pretrain.use_tuned is true but {path} does not exist; run the tune stage first "
            "(`dvc repro tune` or `ptum tune`), or set pretrain.use_tuned: false"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e}); rerun the tune stage") from e
    if isinstance(data, dict) and data.get("available") is False:
        raise ValueError(
            f"pretrain.use_tuned is true but {path} holds no tuned values: the tune stage had "
            f"no task to score trials on ({data.get('why_not')}); set pretrain.use_tuned: false"
        )
    for key in TUNED_KEYS:
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"{path}: key {key!r} is {value!r}, expected a number; rerun the tune stage"
            )
        wrong = _out_of_range(key, value, max_behaviors)
        if wrong:
            raise ValueError(
                f"{path}: {key} = {value!r}, expected {wrong}; rerun the tune stage or set "
                "pretrain.use_tuned: false"
            )
    return {key: data[key] for key in TUNED_KEYS}


def _out_of_range(key: str, value: float, max_behaviors: int | None) -> str | None:
    """What `value` of `key` should be, or None when it is usable."""
    if key in ("k", "p"):
        top = max_behaviors if key == "k" and max_behaviors is not None else None
        if not isinstance(value, int) or value < 1 or (top is not None and value >= top):
            return "an integer >= 1" + (f" and < prepare.max_behaviors ({top})" if top else "")
    elif not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
        return "a finite number > 0" if key == "lr" else "a finite number >= 0"
    return None
