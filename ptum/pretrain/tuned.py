"""The tuned pre-training values: what `pretrain.use_tuned: true` takes from the tune stage's
best_params.json, read with a clear refusal when the file is missing, damaged or empty."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# dvc.yaml's pretrain stage declares exactly these keys of best_params.json
# (tests/tune/test_use_tuned.py).
TUNED_KEYS = ("k", "lam", "p", "lr")


def read_tuned(path: Path | None) -> dict[str, Any]:
    """k, lam, p, lr from the tune stage's best_params.json; a clear error when it is missing or
    lacks one of them."""
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
    return {key: data[key] for key in TUNED_KEYS}
