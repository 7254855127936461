"""The Arrow schema of every artifact, in one place.

Bump :data:`SCHEMA_VERSION` whenever a column is added, removed, renamed or retyped; readers refuse an
artifact whose manifest carries another version. Columns marked ``nullable=False`` must have no nulls;
columns marked ``nonempty`` must have no empty or whitespace-only strings; columns marked ``lang`` must hold
canonical language codes (:func:`mpo_core.plumbing.languages.normalize_lang` maps them to themselves). The checks are
made on every write and read by :mod:`mpo_core.plumbing.artifacts`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2


NONEMPTY = b"mpo.nonempty"
LANG = b"mpo.lang"


def _f(name: str, type_: pa.DataType, nullable: bool = False, *, nonempty: bool = False,
       lang: bool = False) -> pa.Field:
    metadata = {key: b"1" for key, on in ((NONEMPTY, nonempty or lang), (LANG, lang)) if on}
    return pa.field(name, type_, nullable=nullable, metadata=metadata or None)


def is_nonempty(field: pa.Field) -> bool:
    """True if ``field`` must hold no empty or whitespace-only strings."""
    return bool(field.metadata and NONEMPTY in field.metadata)


def is_lang(field: pa.Field) -> bool:
    """True if ``field`` holds language codes."""
    return bool(field.metadata and LANG in field.metadata)


PROMPTS = pa.schema(
    [
        _f("prompt_id", pa.string(), nonempty=True),
        _f("lang", pa.string(), lang=True),
        _f("text", pa.string(), nonempty=True),
        _f("category", pa.string(), True),
        _f("split", pa.string(), nonempty=True),  # "train" | "eval"
        _f("source", pa.string()),
        _f("translated_by", pa.string()),  # "original" | "provided" | "llm:<model>" | "seq2seq:<model>"
        _f("harmful", pa.bool_()),
    ]
)

RESPONSES = pa.schema(
    [
        _f("prompt_id", pa.string(), nonempty=True),
        _f("lang", pa.string(), lang=True),
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
        _f("pair_id", pa.string(), nonempty=True),
        _f("prompt_id", pa.string(), nonempty=True),
        _f("dominant_lang", pa.string(), lang=True),
        _f("target_lang", pa.string(), lang=True),
        _f("dominant_prompt", pa.string(), nonempty=True),
        _f("dominant_chosen", pa.string()),
        _f("dominant_rejected", pa.string()),
        _f("target_prompt", pa.string()),  # may be empty: MT noise, dropped by the filter stage
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
        # label noise (mpo_core.common.label_noise): True where the pair stage swapped the target chosen and
        # rejected on purpose; null where no pair stage set it (pairs read straight from a file)
        _f("target_flipped", pa.bool_(), True),
    ]
)

DROPPED = pa.schema(list(PAIRS) + [_f("reason", pa.string(), nonempty=True), _f("detail", pa.string(), True)])

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

# The filter stage's count table: one row per (target language, outcome, reason).
FILTER_REPORT = pa.schema(
    [
        _f("lang", pa.string(), lang=True),
        _f("outcome", pa.string(), nonempty=True),  # "input" | "judged" | "kept" | "dropped" | "repaired"
        _f("reason", pa.string(), True),  # null for "input" and "kept"
        _f("pairs", pa.int64()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "responses": RESPONSES,
    "pairs": PAIRS,
    "dropped": DROPPED,
    "reference": REFERENCE,
    "eval": EVAL,
    "filter_report": FILTER_REPORT,
}


def schema_for(kind: str) -> pa.Schema:
    """The schema of artifact ``kind``; a clear error for an unknown kind."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise KeyError(f"unknown artifact kind {kind!r}; known: {', '.join(sorted(SCHEMAS))}") from None
