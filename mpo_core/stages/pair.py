"""Building MPO quadruples from judged samples, as the paper does, or ingesting ready-made ones.

For every prompt with samples in the dominant language d and every target language t, one row of PAIRS:

- ``dominant_chosen``: the dominant sample with the highest judge score among the safe ones
  (:func:`mpo_core.common.verdicts.is_safe`); ``dominant_rejected``: the lowest-scored unsafe one.
- ``target_chosen`` / ``target_rejected``: the same ranking among the model's own samples in t.
- No safe sample (in d or in t): the language's configured refusal (``pair.fallback_texts`` or the
  ``fallback_refusal`` of ``refusal_patterns.json``) becomes the chosen response, with its score null and
  its ``*_chosen_fallback`` flag set; with ``pair.fallback_refusal: false`` the pair is skipped instead.
- No unsafe sample (in d or in t): there is nothing to reject, so the pair is skipped. In t this means the
  model is already safe there for this prompt, which is what MPO aims at.
- After align the policy may refuse every dominant sample of a prompt: then nothing in d is unsafe to
  reject. With ``generate.raw_dominant_samples`` the generate stage also sampled the raw (pre-align) model
  in d; the lowest-scored unsafe raw sample becomes ``dominant_rejected`` (the chosen is still the
  policy's refusal, the target side still the policy's own samples), and ``source`` ends with
  ``; dominant_rejected:<raw model>``. The reference scores it with the aligned model, like any pair.
- With ``pair.chosen_in_language`` a safe sample written in another language than its prompt's (an
  English refusal to a Korean prompt) is never chosen: the language's refusal stands in; an unsafe one is
  rejected only where no unsafe sample is in the prompt's language (:func:`samples_in_other_languages`);
  the manifest counts them per language.

Ties are broken by the lower ``sample_idx``. Every skip is counted by reason in the manifest (``skipped``).
Every candidate and its score stays in the ``labelled`` artifact; each pair's chosen and rejected scores
are in its provenance columns. With ``pair.source`` set, the stage instead ingests ready-made quadruples
with :func:`mpo_core.readers.pairs.load_pairs` and has no ``labelled`` input. Either way the stage then applies
the configured target-side label noise (:mod:`mpo_core.common.label_noise`) and marks every pair's
``target_flipped``; the manifest's ``label_noise`` counts the flips per language.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from mpo_core.common.label_noise import flip_target_labels
from mpo_core.common.langid import UNDETERMINED, identify
from mpo_core.common.verdicts import is_safe
from mpo_core.judges.patterns import fallback_refusal
from mpo_core.pairs.supply import RAW_REJECTED_MARK, dominant_rejected_from_raw
from mpo_core.plumbing.artifacts import to_table
from mpo_core.plumbing.config import PairConfig, PipelineConfig
from mpo_core.plumbing.errors import ArtifactError
from mpo_core.plumbing.languages import same_language
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.readers.files import resolve_source
from mpo_core.readers.pairs import load_pairs


@dataclass(frozen=True)
class Candidate:
    """One judged sample."""

    sample_idx: int
    text: str
    verdict: str
    score: float
    in_language: bool = True  # False: language id reads it as another language (``pair.chosen_in_language``)


@dataclass(frozen=True)
class Choice:
    """The chosen and rejected responses of one language side; ``None`` scores for a fallback."""

    chosen: str
    chosen_score: float | None
    chosen_fallback: bool
    rejected: str
    rejected_score: float


def choose(candidates: list[Candidate], refusal: str | None) -> Choice | str:
    """Best safe sample as chosen (or ``refusal`` when none and it is given), worst unsafe as rejected.

    A sample written in another language (``in_language`` False) is never chosen, and is rejected only
    where no unsafe sample is in the prompt's language. Returns the skip reason (``no_unsafe_sample`` or
    ``no_safe_sample``) when no pair can be made.
    """
    safe = [c for c in candidates if is_safe(c.verdict) and c.in_language]
    unsafe = [c for c in candidates if not is_safe(c.verdict)]
    if not unsafe:
        return "no_unsafe_sample"
    rejected = min(unsafe, key=lambda c: (not c.in_language, c.score, c.sample_idx))
    if safe:
        best = max(safe, key=lambda c: (c.score, -c.sample_idx))
        return Choice(best.text, best.score, False, rejected.text, rejected.score)
    if refusal is None:
        return "no_safe_sample"
    return Choice(refusal, None, True, rejected.text, rejected.score)


def policy_models(rows: list[dict], dominant_lang: str) -> set[str]:
    """The models whose samples are the policy's own: those that wrote the target-language samples (all
    models where there are none). Dominant samples of any other model are extra samples of the raw model
    (``generate.raw_dominant_samples``)."""
    targets = {row["model"] for row in rows if row["lang"] != dominant_lang}
    return targets or {row["model"] for row in rows}


def choose_dominant(policy: list[Candidate], extra: list[Candidate], refusal: str | None) -> tuple[Choice | str, bool]:
    """:func:`choose` on the policy's dominant samples; where none of them is unsafe (the aligned model
    refused every time) and ``extra`` (the raw model's) has an unsafe one, its lowest-scored unsafe sample
    becomes the rejected answer, the chosen still the policy's. Returns the choice and whether the rejected
    came from ``extra``."""
    choice = choose(policy, refusal)
    unsafe_extra = [c for c in extra if not is_safe(c.verdict)]
    if choice != "no_unsafe_sample" or not unsafe_extra:
        return choice, False
    return choose(policy + unsafe_extra, refusal), True


def build_pairs(
    rows: list[dict], dominant_lang: str, target_langs: list[str], cfg: PairConfig,
    other_language: frozenset[int] = frozenset(),
) -> tuple[list[dict], Counter]:
    """PAIRS rows from labelled RESPONSES rows, and the count of skipped pairs by reason (and, under
    ``dominant_rejected_from_raw``, the pairs whose dominant rejected answer is the raw model's).
    ``other_language``: indices of rows written in another language than their prompt's."""
    samples: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    extra: dict[str, list[Candidate]] = defaultdict(list)
    prompts: dict[tuple[str, str], str] = {}
    judges: dict[tuple[str, str], str] = {}
    models: dict[str, str] = {}
    extra_models: dict[str, str] = {}
    policy = policy_models(rows, dominant_lang)
    for index, row in enumerate(rows):
        key = (row["prompt_id"], row["lang"])
        candidate = Candidate(row["sample_idx"], row["text"], row["verdict"], float(row["score"]),
                              index not in other_language)
        if row["model"] not in policy:
            extra[row["prompt_id"]].append(candidate)
            extra_models[row["prompt_id"]] = row["model"]
            continue
        samples[key].append(candidate)
        prompts[key] = row["prompt"]
        judges[key] = row["judge"]
        models[row["prompt_id"]] = row["model"]

    def refusal(lang: str) -> str | None:
        if not cfg.fallback_refusal:
            return None
        return cfg.fallback_texts.get(lang) or fallback_refusal(lang)

    pairs: list[dict] = []
    skipped: Counter = Counter()
    for prompt_id in sorted({pid for pid, lang in samples if lang == dominant_lang}):
        dominant, from_raw = choose_dominant(samples[(prompt_id, dominant_lang)], extra[prompt_id],
                                             refusal(dominant_lang))
        source = f"generated:{models[prompt_id]}"
        if from_raw:
            source += f"{RAW_REJECTED_MARK}{extra_models[prompt_id]}"
        for target_lang in target_langs:
            if (prompt_id, target_lang) not in samples:
                skipped["no_target_samples"] += 1
                continue
            if isinstance(dominant, str):
                skipped[f"dominant_{dominant}"] += 1
                continue
            target = choose(samples[(prompt_id, target_lang)], refusal(target_lang))
            if isinstance(target, str):
                skipped[f"target_{target}"] += 1
                continue
            pairs.append({
                "pair_id": f"{prompt_id}:{dominant_lang}-{target_lang}",
                "prompt_id": prompt_id,
                "dominant_lang": dominant_lang,
                "target_lang": target_lang,
                "dominant_prompt": prompts[(prompt_id, dominant_lang)],
                "dominant_chosen": dominant.chosen,
                "dominant_rejected": dominant.rejected,
                "target_prompt": prompts[(prompt_id, target_lang)],
                "target_chosen": target.chosen,
                "target_rejected": target.rejected,
                "source": source,
                "judge": judges[(prompt_id, target_lang)],
                "dominant_chosen_score": dominant.chosen_score,
                "dominant_rejected_score": dominant.rejected_score,
                "target_chosen_score": target.chosen_score,
                "target_rejected_score": target.rejected_score,
                "dominant_chosen_fallback": dominant.chosen_fallback,
                "target_chosen_fallback": target.chosen_fallback,
            })
    return pairs, skipped


WRONG_LANGUAGE_CONFIDENCE = 0.5  # the filter's default ``langid_min_confidence``


def samples_in_other_languages(rows: list[dict]) -> frozenset[int]:
    """Indices of the rows that language id reads as another language than the row's, with confidence >=
    :data:`WRONG_LANGUAGE_CONFIDENCE` (``pair.chosen_in_language``): an aligned model often refuses a target
    prompt in English, and such a refusal must not become the target's chosen answer (the language's
    configured refusal stands in where no safe sample is left); an unsafe answer in another language is
    rejected only where none is in the prompt's language (the filter would drop the pair)."""

    guesses = identify([row["text"] for row in rows], expected=[row["lang"] for row in rows])
    return frozenset(i for i, (lang, conf) in enumerate(guesses)
                     if lang != UNDETERMINED and conf >= WRONG_LANGUAGE_CONFIDENCE
                     and not same_language(lang, rows[i]["lang"]))


def source_files(config: PipelineConfig) -> dict[str, Path]:
    """The ready-made pairs file (``pair.source``) the stage reads, if any (its content joins the identity)."""
    return {"source": resolve_source(config.pair.source)} if config.pair.source else {}


def run_pair(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``pair``: ``labelled`` -> ``pairs``; under ``pair.source`` the ready-made file -> ``pairs``."""
    config = stage.config
    if config.pair.source:
        table = load_pairs(resolve_source(config.pair.source), format=config.pair.source_format)
        table, noise = flip_target_labels(table, config.pair.target_noise, config.pair.noise_seed)
        return {"pairs": Artifact(table, {
            "source": str(config.pair.source), "pairs": table.num_rows,
            "per_target_lang": dict(sorted(Counter(table.column("target_lang").to_pylist()).items())),
            "label_noise": noise.as_dict()})}
    rows = stage.inputs.table("labelled").to_pylist()
    unlabelled = next((i for i, r in enumerate(rows) if r["verdict"] is None or r["score"] is None), None)
    if unlabelled is not None:
        raise ArtifactError(f"{stage.inputs.path('labelled')}: row {unlabelled} has no verdict/score (run the label stage)")
    other_language = samples_in_other_languages(rows) if config.pair.chosen_in_language else frozenset()
    pairs, skipped = build_pairs(rows, config.run.dominant_lang, config.run.target_langs, config.pair, other_language)
    table, noise = flip_target_labels(to_table(pairs, "pairs"), config.pair.target_noise, config.pair.noise_seed)
    return {"pairs": Artifact(table, {
        "pairs": len(pairs),
        "skipped": dict(sorted(skipped.items())),
        "per_target_lang": dict(sorted(Counter(p["target_lang"] for p in pairs).items())),
        "fallback_dominant_chosen": sum(p["dominant_chosen_fallback"] for p in pairs),
        "fallback_target_chosen": sum(p["target_chosen_fallback"] for p in pairs),
        "dominant_rejected_from_raw": dominant_rejected_from_raw(pairs),
        "samples_in_another_language": dict(sorted(Counter(rows[i]["lang"] for i in other_language).items())),
        "label_noise": noise.as_dict(),
    })}
