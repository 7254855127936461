"""Building MPO quadruples from judged samples, as the paper does, or ingesting ready-made ones.

For every prompt with samples in the dominant language d and every target language t, one row of PAIRS:

- ``dominant_chosen``: the dominant sample with the highest judge score among the safe ones
  (:func:`mpo_core.verdicts.is_safe`); ``dominant_rejected``: the lowest-scored unsafe one.
- ``target_chosen`` / ``target_rejected``: the same ranking among the model's own samples in t.
- No safe sample (in d or in t): the language's configured refusal (``pair.fallback_texts`` or the
  ``fallback_refusal`` of ``refusal_patterns.json``) becomes the chosen response, with its score null and
  its ``*_chosen_fallback`` flag set; with ``pair.fallback_refusal: false`` the pair is skipped instead.
- No unsafe sample (in d or in t): there is nothing to reject, so the pair is skipped. In t this means the
  model is already safe there for this prompt, which is what MPO aims at.

Ties are broken by the lower ``sample_idx``. Every skip is counted by reason in the manifest (``skipped``).
Every candidate and its score stays in the ``labelled`` artifact; each pair's chosen and rejected scores
are in its provenance columns. With ``pair.source`` set, the stage instead ingests ready-made quadruples
with :func:`mpo_core.ingest.load_pairs` and has no ``labelled`` input. Either way the stage then applies
the configured target-side label noise (:mod:`mpo_core.label_noise`) and marks every pair's
``target_flipped``; the manifest's ``label_noise`` counts the flips per language.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from mpo_core.artifacts import read_artifact, to_table, write_artifact
from mpo_core.config import PairConfig, PipelineConfig
from mpo_core.errors import ArtifactError
from mpo_core.judges import fallback_refusal
from mpo_core.label_noise import flip_target_labels
from mpo_core.stages import stage_call
from mpo_core.verdicts import is_safe


@dataclass(frozen=True)
class Candidate:
    """One judged sample."""

    sample_idx: int
    text: str
    verdict: str
    score: float


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

    Returns the skip reason (``no_unsafe_sample`` or ``no_safe_sample``) when no pair can be made.
    """
    safe = [c for c in candidates if is_safe(c.verdict)]
    unsafe = [c for c in candidates if not is_safe(c.verdict)]
    if not unsafe:
        return "no_unsafe_sample"
    rejected = min(unsafe, key=lambda c: (c.score, c.sample_idx))
    if safe:
        best = max(safe, key=lambda c: (c.score, -c.sample_idx))
        return Choice(best.text, best.score, False, rejected.text, rejected.score)
    if refusal is None:
        return "no_safe_sample"
    return Choice(refusal, None, True, rejected.text, rejected.score)


def build_pairs(
    rows: list[dict], dominant_lang: str, target_langs: list[str], cfg: PairConfig
) -> tuple[list[dict], Counter]:
    """PAIRS rows from labelled RESPONSES rows, and the count of skipped pairs by reason."""
    samples: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    prompts: dict[tuple[str, str], str] = {}
    judges: dict[tuple[str, str], str] = {}
    models: dict[str, str] = {}
    for row in rows:
        key = (row["prompt_id"], row["lang"])
        samples[key].append(Candidate(row["sample_idx"], row["text"], row["verdict"], float(row["score"])))
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
        dominant = choose(samples[(prompt_id, dominant_lang)], refusal(dominant_lang))
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
                "source": f"generated:{models[prompt_id]}",
                "judge": judges[(prompt_id, target_lang)],
                "dominant_chosen_score": dominant.chosen_score,
                "dominant_rejected_score": dominant.rejected_score,
                "target_chosen_score": target.chosen_score,
                "target_rejected_score": target.rejected_score,
                "dominant_chosen_fallback": dominant.chosen_fallback,
                "target_chosen_fallback": target.chosen_fallback,
            })
    return pairs, skipped


def run_pair(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Stage ``pair``: ``labelled`` -> ``pairs``; under ``pair.source`` the ready-made file -> ``pairs``."""
    call = stage_call("pair", config, inputs)
    path = Path(out_dir) / "pairs.parquet"
    if config.pair.source:
        from mpo_core.ingest import load_pairs, resolve_source

        table = load_pairs(resolve_source(config.pair.source), format=config.pair.source_format)
        table, noise = flip_target_labels(table, config.pair.target_noise, config.pair.noise_seed)
        write_artifact(
            table, path, "pairs",
            **call.provenance,
            extra={"source": str(config.pair.source), "pairs": table.num_rows,
                   "per_target_lang": dict(sorted(Counter(table.column("target_lang").to_pylist()).items())),
                   "label_noise": noise.as_dict()},
        )
        return {"pairs": path}
    rows = read_artifact(inputs["labelled"], "responses").to_pylist()
    unlabelled = next((i for i, r in enumerate(rows) if r["verdict"] is None or r["score"] is None), None)
    if unlabelled is not None:
        raise ArtifactError(f"{inputs['labelled']}: row {unlabelled} has no verdict/score (run the label stage)")
    pairs, skipped = build_pairs(rows, config.run.dominant_lang, config.run.target_langs, config.pair)
    table, noise = flip_target_labels(to_table(pairs, "pairs"), config.pair.target_noise, config.pair.noise_seed)
    write_artifact(
        table, path, "pairs",
        **call.provenance,
        extra={
            "pairs": len(pairs),
            "skipped": dict(sorted(skipped.items())),
            "per_target_lang": dict(sorted(Counter(p["target_lang"] for p in pairs).items())),
            "fallback_dominant_chosen": sum(p["dominant_chosen_fallback"] for p in pairs),
            "fallback_target_chosen": sum(p["target_chosen_fallback"] for p in pairs),
            "label_noise": noise.as_dict(),
        },
    )
    return {"pairs": path}
