"""Stage `tokenize`: train SentencePiece on the item texts and encode each item once."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.stages.errors import reading
from ptum.tokenize import tokenize


def run(p: Params, *, prepared: Path = paths.PREPARED, out: Path = paths.TOKENIZED) -> dict:
    """data/prepared/items.parquet -> data/tokenized; return the tokenizer report."""
    t = p.tokenize
    items = prepared / paths.prepared_table("items").name
    with reading(items):
        return tokenize(
            items,
            out,
            vocab_size=t.vocab_size,
            model_type=t.model_type,
            byte_fallback=t.byte_fallback,
            max_tokens=t.max_tokens,
            character_coverage=t.character_coverage,
            seed=t.seed,
        )
