"""EVAL rows from observations: every rate and mean with a percentile-bootstrap interval; the
trained-minus-base differences with a paired bootstrap interval over the same prompts/pairs (rows with
``model == "delta"``); the frozen reference's RG^d.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpo_core.evaluation.measure import Key, Observations
from mpo_core.evaluation.sets import PairSet, group_by_lang
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.results.metrics import (
    Estimate,
    bootstrap_difference_ci,
    bootstrap_mean_ci,
    summarize_reward_gaps,
)


def _row(model: str, key: Key, est: Estimate, judge: str | None, metric: str | None = None) -> dict[str, Any]:
    lang, base_metric, dataset = key
    return {
        "model": model, "lang": lang, "metric": metric or base_metric, "value": est.value,
        "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n, "judge": judge, "dataset": dataset,
    }


def _selectivity_keys(values: dict[Key, np.ndarray]) -> list[tuple[Key, Key, Key]]:
    """(selectivity key, harmful-refusal key, over-refusal key) for every (lang, dataset) having both."""
    return [
        ((lang, "selectivity", dataset), (lang, "harmful_refusal", dataset), (lang, "over_refusal", dataset))
        for lang, metric, dataset in sorted(values)
        if metric == "harmful_refusal" and (lang, "over_refusal", dataset) in values
    ]


def summary_rows(obs: Observations, config: PipelineConfig) -> list[dict[str, Any]]:
    """EVAL rows of one model: mean with bootstrap CI per (lang, metric, dataset); for reward gaps also
    std, 10/50/90 % quantiles and the share of positive gaps (no interval); ``selectivity`` = refusal rate
    on harmful minus refusal rate on benign prompts, with an interval resampling each side on its own."""
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    rows = []
    for key, values in sorted(obs.values.items()):
        rows.append(_row(obs.role, key, bootstrap_mean_ci(values, **kwargs), obs.judges[key]))
        if key[1] == "reward_gap":
            summary = summarize_reward_gaps(values, **kwargs)
            for name in ("std", "p10", "p50", "p90", "positive_share"):
                point = Estimate(getattr(summary, name), None, None, len(values))
                rows.append(_row(obs.role, key, point, None, metric=f"reward_gap_{name}"))
    for key, harmful, benign in _selectivity_keys(obs.values):
        estimate = bootstrap_difference_ci(obs.values[harmful], obs.values[benign], **kwargs)
        rows.append(_row(obs.role, key, estimate, obs.judges[benign]))
    return rows


def paired_delta_rows(base: Observations, trained: Observations, config: PipelineConfig) -> list[dict]:
    """``model == "delta"`` rows: mean of (trained - base) per item with a paired bootstrap interval (for
    selectivity, the harmful and benign differences resampled each on its own)."""
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    rows = []
    diffs = {}
    for key in sorted(base.values.keys() & trained.values.keys()):
        if len(base.values[key]) == len(trained.values[key]):
            diffs[key] = trained.values[key] - base.values[key]
            rows.append(_row("delta", key, bootstrap_mean_ci(diffs[key], **kwargs), trained.judges[key]))
    for key, harmful, benign in _selectivity_keys(diffs):
        estimate = bootstrap_difference_ci(diffs[harmful], diffs[benign], **kwargs)
        rows.append(_row("delta", key, estimate, trained.judges[benign]))
    return rows


def reference_rows(pair_set: PairSet | None, config: PipelineConfig) -> list[dict]:
    """RG^d of the frozen reference (from the ``reference`` artifact) per target language of the pairs it
    was computed on, and over the distinct dominant-language triples for the dominant language."""
    if pair_set is None or not pair_set.reference_gaps:
        return []
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    known = [p for p in pair_set.pairs if p["pair_id"] in pair_set.reference_gaps]
    rows = []
    for lang, idx in group_by_lang(known).items():
        gaps = [pair_set.reference_gaps[known[i]["pair_id"]] for i in idx]
        rows.append(_row("reference", (lang, "reward_gap", pair_set.name), bootstrap_mean_ci(gaps, **kwargs), None))
    by_triple: dict[tuple[str, str, str], float] = {}
    for p in known:  # one dominant triple serves every target language: count it once
        triple = (p["dominant_prompt"], p["dominant_chosen"], p["dominant_rejected"])
        by_triple.setdefault(triple, pair_set.reference_gaps[p["pair_id"]])
    if by_triple:
        key = (config.run.dominant_lang, "reward_gap", pair_set.name)
        rows.append(_row("reference", key, bootstrap_mean_ci(list(by_triple.values()), **kwargs), None))
    return rows
