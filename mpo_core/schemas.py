"""The Arrow schema of every artifact, in one place.

Bump :data:`SCHEMA_VERSION` whenever a column is added, removed, renamed or retyped; readers refuse an
artifact whose manifest carries another version. Columns marked ``nullable=False`` must have no nulls.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


PROMPTS = pa.schema(
    [
        _f("prompt_id", pa.string()),
        _f("lang", pa.string()),
        _f("text", pa.string()),
        _f("category", pa.string(), True),
        _f("split", pa.string()),  # "train" | "eval"
        _f("source", pa.string()),
        _f("translated_by", pa.string()),  # "original" | "provided" | "llm:<model>" | "seq2seq:<model>"
        _f("harmful", pa.bool_()),
    ]
)

RESPONSES = pa.schema(
    [
        _f("prompt_id", pa.string()),
        _f("lang", pa.string()),
        _f("sample_idx", pa.int32()),
        _f("prompt", pa.string()),
        _f("text", pa.string()),
        _f("finish_reason", pa.string()),  # "stop" | "length"
        _f("model", pa.string()),
        _f("backend", pa.string()),
        _f("seed", pa.int64()),
        # filled by the label stage; null before it
        _f("judge", pa.string(), True),
        _f("verdict", pa.string(), True),  # "safe" | "unsafe" | "refusal" | "compliance"
        _f("score", pa.float32(), True),  # probability-like safety score in [0, 1], 1 = safe
    ]
)

PAIRS = pa.schema(
    [
        _f("pair_id", pa.string()),
        _f("prompt_id", pa.string()),
        _f("dominant_lang", pa.string()),
        _f("target_lang", pa.string()),
        _f("dominant_prompt", pa.string()),
        _f("dominant_chosen", pa.string()),
        _f("dominant_rejected", pa.string()),
        _f("target_prompt", pa.string()),
        _f("target_chosen", pa.string()),
        _f("target_rejected", pa.string()),
        _f("source", pa.string()),
        _f("judge", pa.string(), True),
        _f("dominant_chosen_score", pa.float32(), True),
        _f("dominant_rejected_score", pa.float32(), True),
        _f("target_chosen_score", pa.float32(), True),
        _f("target_rejected_score", pa.float32(), True),
        _f("dominant_chosen_fallback", pa.bool_()),
        _f("target_chosen_fallback", pa.bool_()),
    ]
)

DROPPED = pa.schema(list(PAIRS) + [_f("reason", pa.string()), _f("detail", pa.string(), True)])

REFERENCE = pa.schema(
    [
        _f("pair_id", pa.string()),
        _f("dominant_chosen_avg_logp", pa.float32()),
        _f("dominant_rejected_avg_logp", pa.float32()),
        _f("reward_gap", pa.float32()),
        # float32, not float16: L2 is the MSE against these, and at step 0 (policy == reference) a rounded
        # copy would turn into a spurious gradient; the cost is 8 bytes x hidden size per pair.
        _f("chosen_pooled", pa.list_(pa.float32())),
        _f("rejected_pooled", pa.list_(pa.float32())),
        _f("model_fingerprint", pa.string()),
    ]
)

EVAL = pa.schema(
    [
        _f("model", pa.string()),
        _f("lang", pa.string()),
        _f("metric", pa.string()),
        _f("value", pa.float64()),
        _f("ci_low", pa.float64(), True),
        _f("ci_high", pa.float64(), True),
        _f("n", pa.int64()),
        _f("judge", pa.string(), True),
        _f("dataset", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "responses": RESPONSES,
    "pairs": PAIRS,
    "dropped": DROPPED,
    "reference": REFERENCE,
    "eval": EVAL,
}


def schema_for(kind: str) -> pa.Schema:
    """The schema of artifact ``kind``; a clear error for an unknown kind."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise KeyError(f"unknown artifact kind {kind!r}; known: {', '.join(sorted(SCHEMAS))}") from None
