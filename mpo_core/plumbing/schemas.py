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

# Evaluation's greedy answers of one model role, written by a shard of a sharded evaluate and merged.
GENERATIONS = pa.schema([_f("role", pa.string(), nonempty=True), *RESPONSES])

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
    "generations": GENERATIONS,
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


# What every column means, one line each, beside the schemas above (``docs/artifacts.md`` is generated from
# these by ``python -m mpo_core.plumbing.artifact_docs``).
_PAIR_DOCS = {
    "pair_id": "Stable id of the quadruple: a hash of its two languages and six texts.",
    "prompt_id": "The prompt the quadruple answers; shared by the target languages of one prompt.",
    "dominant_lang": "Code of the dominant language d (usually `en`).",
    "target_lang": "Code of the target language t.",
    "dominant_prompt": "The prompt x in the dominant language.",
    "dominant_chosen": "The safe response y_w in the dominant language.",
    "dominant_rejected": "The unsafe response y_l in the dominant language.",
    "target_prompt": "The prompt in the target language (may be empty: translation noise the filter drops).",
    "target_chosen": "The safe response in the target language (trained on as chosen).",
    "target_rejected": "The unsafe response in the target language (trained on as rejected).",
    "source": "Where the quadruple came from: `mpo_json:<file>`, `hh_rlhf:<file>` or the run's own samples.",
    "judge": "The judge whose scores fill the four `*_score` columns; null for ready-made pairs.",
    "dominant_chosen_score": "The judge's safety score of `dominant_chosen` (1 = safe); null for a fallback.",
    "dominant_rejected_score": "The judge's safety score of `dominant_rejected` (1 = safe).",
    "target_chosen_score": "The judge's safety score of `target_chosen` (1 = safe); null for a fallback.",
    "target_rejected_score": "The judge's safety score of `target_rejected` (1 = safe).",
    "dominant_chosen_fallback": "True where no dominant sample was safe and the configured refusal is chosen.",
    "target_chosen_fallback": "True where no target sample was safe and the configured refusal is chosen.",
    "target_flipped": "True where label noise swapped the target chosen and rejected; null for pairs from a file.",
}

COLUMN_DOCS: dict[str, dict[str, str]] = {
    "prompts": {
        "prompt_id": "Stable id of the prompt, the same in every language it is translated into.",
        "lang": "Code of the language of `text` (canonical: `en`, `zh`, `sw`, ...).",
        "text": "The prompt.",
        "category": "Harm category given by the source (e.g. MultiJail tags); null where it gives none.",
        "split": "`train` (pairs built from it may be trained on) or `eval` (held out for evaluation).",
        "source": "Where the prompt came from: format and file (`multijail:MultiJail.csv`, `seed`, ...).",
        "translated_by": "`original`, `provided` (by the source file), `llm:<model>` or `seq2seq:<model>`.",
        "harmful": "True for a harmful request (attack success), False for a benign one (over-refusal).",
    },
    "responses": {
        "prompt_id": "The prompt answered.",
        "lang": "Code of the prompt's language.",
        "sample_idx": "Index of this sample among the samples of one (prompt, language), from 0.",
        "prompt": "The prompt text the model was given.",
        "text": "The model's response.",
        "finish_reason": "`stop` (the model ended its turn) or `length` (cut at the token limit).",
        "model": "Name or path of the model that answered.",
        "backend": "The generation backend (`transformers` or `vllm`).",
        "seed": "The seed of this response's request: generate.seed and the prompt's identity (prompt_id, lang).",
        "judge": "The judge that labelled the response; null before the label stage.",
        "verdict": "The judge's verdict: `safe`, `unsafe`, `refusal` or `compliance`; null before labelling.",
        "score": "Probability-like safety score in [0, 1], 1 = safe; null before labelling.",
    },
    "pairs": _PAIR_DOCS,
    "dropped": {
        **_PAIR_DOCS,
        "reason": "Why the pair was dropped (a filter reason, or `reference_gap_not_positive` in train).",
        "detail": "What was found, in words (languages and confidences, scores, the RG^d); null if nothing.",
    },
    "reference": {
        "pair_id": "The pair (joins the `filtered` pairs).",
        "dominant_chosen_avg_logp": "s(y_w|x): the frozen reference's mean log-likelihood of the dominant "
                                    "chosen response's tokens.",
        "dominant_rejected_avg_logp": "s(y_l|x): the same for the dominant rejected response.",
        "reward_gap": "RG^d = s(y_w|x) - s(y_l|x), the target L1 pulls beta * RG^t towards.",
        "chosen_pooled": "The reference's final-layer hidden states of the dominant chosen sequence, mean over "
                         "real tokens (one float per hidden unit): L2's target.",
        "rejected_pooled": "The same for the dominant rejected sequence.",
        "model_fingerprint": "Id of the reference model: a hash of its name, revision, weight file names and sizes.",
    },
    "eval": {
        "model": "The model measured: `raw`, `base`, `trained`, `reference` (RG^d), or `delta` (trained - base).",
        "lang": "Code of the language measured.",
        "metric": "`asr`, `over_refusal`, `harmful_refusal`, `selectivity`, `response_lang_share`, "
                  "`reward_gap`, `mgsm_accuracy`, `mc_accuracy`, ...",
        "value": "The rate or mean (for `delta` rows, the trained-minus-base difference).",
        "ci_low": "Lower end of the 95 % bootstrap interval; null where there is none.",
        "ci_high": "Upper end of the 95 % bootstrap interval; null where there is none.",
        "n": "Number of prompts, pairs or items the value is over.",
        "judge": "The judge(s) whose verdicts the value counts; null where none is needed.",
        "dataset": "The data measured: a prompt set's name, `pairs:train`, `pairs:held-out`, `mgsm`, ...",
    },
    "generations": {
        "role": "The evaluated model: `raw`, `base` or `trained`.",
        "prompt_id": "The safety prompt or MGSM question answered.",
        "lang": "Code of the prompt's language.",
        "sample_idx": "Always 0: evaluation decodes greedily, one answer per prompt.",
        "prompt": "The prompt text the model was given.",
        "text": "The model's greedy answer.",
        "finish_reason": "`stop` (the model ended its turn) or `length` (cut at the token limit).",
        "model": "Name or path of the model that answered.",
        "backend": "The generation backend (`transformers` or `vllm`).",
        "seed": "The seed of this response's request (greedy decoding does not use it).",
        "judge": "Null: the evaluate stage judges the merged answers.",
        "verdict": "Null: the evaluate stage judges the merged answers.",
        "score": "Null: the evaluate stage judges the merged answers.",
    },
    "filter_report": {
        "lang": "Code of the target language.",
        "outcome": "`input`, `judged`, `kept`, `dropped` or `repaired`.",
        "reason": "The filter reason counted (for `dropped` and `repaired`); null for `input` and `kept`.",
        "pairs": "Number of pairs.",
    },
}

# The Parquet files of each kind in a run folder (``runs/<name>/<stage>/<file>``).
# Tables a stage writes beside its outputs (the outputs themselves are in the stage table,
# :mod:`mpo_core.plumbing.stage_table`), by kind.
SIDE_ARTIFACT_FILES: dict[str, tuple[str, ...]] = {
    "responses": ("evaluate/responses_<role>.parquet",),
    "generations": ("shards/evaluate/shard-<i>-of-<n>/generations.parquet", "evaluate/generations.parquet"),
    "dropped": ("train/dropped_reference.parquet",),
    "filter_report": ("filter/filter_report.parquet",),
}
