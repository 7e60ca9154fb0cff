"""What an exported graph takes and says about itself: input names, static dims, metadata.

Every ONNX file of an export carries in its metadata_props what a consumer needs to build inputs
(`metadata`): tokenizer hash, max_behaviors / max_tokens, the time-gap bucketing rule, pad id,
output dim, which of L / T are static, architecture, params and data version.

Batch is always dynamic. L and T are dynamic too, except over the sequence an LSTM/GRU runs on
(`static_lengths`): torch.export specializes recurrent sequence lengths to the example's, so
those dims are exported at their maximum and serving pads to it (padding never changes a user's
vector).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ptum import __version__
from ptum.models.behavior import PAD_ROW, UNKNOWN_ROW
from ptum.models.layers import NUM_GAP_BUCKETS
from ptum.models.user_model import ModelConfig
from ptum.tokenize import PAD_ID

USER_INPUTS = ("tokens", "token_mask", "mask", "positions", "gap_buckets")
ID_RULE = (
    f"item_ids: i + 2 for the text texts[i] of id_vocab.json, {UNKNOWN_ROW} for any other text "
    f"(unknown), {PAD_ROW} for padded behaviors"
)
GAP_BUCKET_RULE = (
    "floor(log2(gap_seconds+1)) clamped to [0,31]; gap_seconds = seconds since the user's "
    "previous behavior (0 for the first), computed before keeping the last max_behaviors"
)


def user_inputs(config: ModelConfig) -> tuple[str, ...]:
    """Input names of user_model.onnx: USER_INPUTS, plus item_ids for the hybrid encoder."""
    return USER_INPUTS + (("item_ids",) if config.behavior_encoder == "hybrid" else ())


def static_lengths(config: ModelConfig) -> tuple[bool, bool]:
    """(L static, T static): which sequence dims must be exported (and served) at their maximum.

    T: an LSTM runs over tokens ("lstm" behavior encoder, or a hybrid wrapping it); the "id"
    encoder's T is its single item-id column. L: an LSTM (HAN) or GRU (GRU4Rec) runs over
    behaviors. Measured on torch 2.13: the LSTM graphs export with symbolic dims but fail in
    onnxruntime at any other length (an Expand keeps the example length); the GRU graph runs but
    its value_info records the example length, so it is kept static as well rather than trusted.
    """
    text = config.hybrid_text if config.behavior_encoder == "hybrid" else config.behavior_encoder
    return config.user_encoder in ("han", "gru4rec"), text in ("lstm", "id")


def metadata(
    config: ModelConfig,
    *,
    architecture: str,
    spm_sha256: str,
    data_version: str,
    params: Mapping[str, Any],
    opset: int,
    id_vocab_sha256: str = "",
) -> dict[str, str]:
    """The metadata_props stored in every exported ONNX model (all values are strings).

    id_vocab_sha256: the hybrid encoder's exported id_vocab.json (adds it and `item_id_rule`).
    """
    static_l, static_t = static_lengths(config)
    hybrid = (
        {"id_vocab_sha256": id_vocab_sha256, "item_id_rule": ID_RULE} if id_vocab_sha256 else {}
    )
    return hybrid | {
        "ptum_version": __version__,
        "architecture": architecture,
        "behavior_encoder": config.behavior_encoder,
        "user_encoder": config.user_encoder,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "spm_sha256": spm_sha256,
        "max_behaviors": str(config.max_behaviors),
        "max_tokens": str(1 if config.behavior_encoder == "id" else config.max_tokens),
        "behaviors_dim": "static" if static_l else "dynamic",
        "tokens_dim": "static" if static_t else "dynamic",
        "pad_id": str(PAD_ID),
        "output_dim": str(config.dim),
        "gap_buckets": str(NUM_GAP_BUCKETS),
        "gap_bucket_rule": GAP_BUCKET_RULE,
        "positions_rule": "recency rank: len - 1 - i for real behavior i (0 = most recent), "
        "0 for pads; behaviors right-padded, oldest first",
        "token_rule": "SentencePiece ids of the stripped text, first max_tokens kept, "
        "right-padded with pad_id; token_mask = tokens != pad_id",
        "params": json.dumps(params, sort_keys=True, default=str),
        "data_version": data_version,
        "opset": str(opset),
    }
