"""The evaluation data: safety prompt sets (the seed hold-out, MultiJail, any prompt file), the pairs reward
gaps are measured on (with the reference's RG^d), and utility sets (MGSM, multiple choice), in the
evaluated languages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from mpo_core.method.premise import held_out_prompt_ids
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.readers.pairs import load_pairs
from mpo_core.readers.prompts import ingest_prompt_set
from mpo_core.readers.utility import load_mgsm, load_multiple_choice

SEED_SET = "seed"


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one safety set: dicts with ``prompt_id, lang, text, harmful``."""

    name: str
    prompts: list[dict]


@dataclass(frozen=True)
class PairSet:
    """Preference pairs for reward gaps (PAIRS columns) and, where known, the reference's RG^d by pair."""

    name: str
    pairs: list[dict]
    reference_gaps: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UtilitySet:
    """MGSM items (``prompt_id, lang, text, gold``) or multiple-choice items
    (``lang, question, options, answer``)."""

    name: str
    kind: str  # "mgsm" | "mc"
    items: list[dict]


def eval_langs(config: PipelineConfig) -> list[str]:
    """The languages evaluated: ``evaluate.langs`` or the run's dominant and target languages."""
    if config.evaluate.langs is not None:
        return list(config.evaluate.langs)
    return [config.run.dominant_lang, *config.run.target_langs]


def take_per_lang(rows: Sequence[dict], langs: Sequence[str], limit: int | None) -> list[dict]:
    """Rows in ``langs`` (in the rows' order), at most ``limit`` per language."""
    counts: dict[str, int] = {}
    kept = []
    for row in rows:
        lang = row["lang"]
        if lang in langs and (limit is None or counts.get(lang, 0) < limit):
            counts[lang] = counts.get(lang, 0) + 1
            kept.append(row)
    return kept


def _prompt_dicts(rows: Sequence[dict], set_name: str) -> list[dict]:
    """Prompt dicts with ids prefixed by the set's name (ids stay unique across sets)."""
    return [
        {"prompt_id": f"{set_name}:{r['prompt_id']}", "lang": r["lang"], "text": r["text"],
         "harmful": bool(r["harmful"])}
        for r in rows
    ]


def seed_holdout(translated: pa.Table | None) -> list[dict]:
    """The seed hold-out (``split == "eval"``): from the ``translated`` artifact, else the packaged seed set."""
    if translated is None:

        rows = load_seed_prompts()
    else:
        rows = translated.to_pylist()
    return [r for r in rows if r["split"] == "eval"]


def dataset_name(source: str) -> str:
    """A short name for a data source: ``seed``, ``multijail`` for the MultiJail file or hub id, else the
    file stem or hub id."""
    if source == SEED_SET:
        return SEED_SET
    if "multijail" in source.lower():
        return "multijail"
    path = Path(source)
    return path.stem if path.suffix else source


def load_safety_sets(config: PipelineConfig, translated: pa.Table | None) -> list[PromptSet]:
    """Every ``evaluate.safety_sets`` entry as a :class:`PromptSet` in the evaluated languages, at most
    ``evaluate.max_prompts_per_lang`` prompts per language (the same first prompts in every language)."""
    langs, limit = eval_langs(config), config.evaluate.max_prompts_per_lang
    sets = []
    for source in config.evaluate.safety_sets:
        name = dataset_name(source)
        if source == SEED_SET:
            rows = seed_holdout(translated)
        else:
            rows = ingest_prompt_set(config, source)
        harmful = take_per_lang([r for r in rows if r["harmful"]], langs, limit)
        benign = take_per_lang([r for r in rows if not r["harmful"]], langs, limit)
        sets.append(PromptSet(name, _prompt_dicts(harmful + benign, name)))
    return sets


def load_pair_set(
    config: PipelineConfig,
    filtered: pa.Table | None,
    reference: pa.Table | None,
    translated: pa.Table | None = None,
) -> PairSet | None:
    """Pairs for reward gaps: ``evaluate.pairs`` (held-out, via ``ingest.load_pairs``) when set, else the
    ``filtered`` pairs, those of held-out prompts when there are any (named ``pairs:held-out``), otherwise
    all of them (``pairs:train``: the gap the training itself targets). At most ``max_pairs_per_lang`` per
    target language. RG^d of the reference is attached by ``pair_id`` from the ``reference`` artifact."""
    if config.evaluate.pairs is not None:

        table = load_pairs(config.evaluate.pairs, dominant_lang=config.run.dominant_lang)
        name = f"pairs:{dataset_name(config.evaluate.pairs)}"
    elif filtered is not None:
        table = filtered
        held_out = held_out_prompt_ids(translated) if translated is not None else set()
        ids = set(table.column("prompt_id").to_pylist())
        if held_out & ids:
            mask = pa.array([pid in held_out for pid in table.column("prompt_id").to_pylist()])
            table, name = table.filter(mask), "pairs:held-out"
        else:
            name = "pairs:train"
    else:
        return None
    rows = [dict(true_labels(r), lang=r["target_lang"]) for r in table.to_pylist()]
    rows = take_per_lang(rows, eval_langs(config), config.evaluate.max_pairs_per_lang)
    gaps = {}
    if reference is not None and config.evaluate.pairs is None:
        gaps = dict(zip(reference.column("pair_id").to_pylist(), reference.column("reward_gap").to_pylist()))
    return PairSet(name, rows, gaps)


def load_utility_sets(config: PipelineConfig) -> list[UtilitySet]:
    """MGSM and multiple-choice sets named in the config (none by default)."""
    ev, langs = config.evaluate, eval_langs(config)
    sets = [UtilitySet("mgsm", "mgsm", [i for s in ev.mgsm for i in load_mgsm(s, langs, ev.mgsm_max_per_lang)])]
    sets += [UtilitySet(dataset_name(s), "mc", take_per_lang(load_multiple_choice(s), langs, ev.mc_max_per_lang))
             for s in ev.multiple_choice]
    return [s for s in sets if s.items]


def true_labels(pair: dict) -> dict:
    """A pair as judged before label noise: chosen and rejected swapped back where ``target_flipped``
    (reward gaps are measured against the true preference, whatever the model was trained on)."""
    if not pair.get("target_flipped"):
        return pair
    return dict(pair, target_chosen=pair["target_rejected"], target_rejected=pair["target_chosen"],
                target_flipped=False)


def group_by_lang(items: Sequence[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item["lang"], []).append(i)
    return groups
