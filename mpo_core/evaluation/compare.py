"""Several models evaluated side by side on the same data (:func:`evaluate_models`), and the ``eval``
artifact, the judged responses and the report written from the result (:func:`write_evaluation`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.common.label_noise import describe_noise
from mpo_core.evaluation.measure import (
    REFUSAL_JUDGE,
    AnswerRequest,
    Observations,
    answer_requests,
    evaluate_model,
    generate_answers,
    get_judges,
)
from mpo_core.evaluation.sets import load_pair_set, load_safety_sets, load_utility_sets
from mpo_core.evaluation.summaries import paired_delta_rows, reference_rows, summary_rows
from mpo_core.generation.responses import get_backend
from mpo_core.generation.vllm_backend import ENGINES
from mpo_core.plumbing.artifacts import write_artifact
from mpo_core.plumbing.config import ModelConfig, PipelineConfig
from mpo_core.plumbing.progress import phase, round_seconds
from mpo_core.results.report import write_report


@dataclass
class EvaluationResult:
    """EVAL rows of every model and the per-model observations they came from."""

    rows: list[dict[str, Any]]
    observations: dict[str, Observations]
    datasets: dict[str, str]
    seconds: float


def evaluate_models(
    config: PipelineConfig,
    models: dict[str, ModelConfig],
    *,
    translated: pa.Table | None = None,
    filtered: pa.Table | None = None,
    reference: pa.Table | None = None,
    answers: dict[str, list[dict]] | None = None,
) -> EvaluationResult:
    """Evaluate ``models`` (role -> model config, e.g. ``{"base": ..., "trained": ...}``) on the same data:
    summaries per model, paired deltas when both ``base`` and ``trained`` are present, and the reference's
    RG^d. ``answers`` (role -> RESPONSES rows, :func:`models_answers`): greedy answers generated elsewhere,
    instead of generating them here."""
    started = time.perf_counter()
    safety_sets = load_safety_sets(config, translated)
    pair_set = load_pair_set(config, filtered, reference, translated)
    utility_sets = load_utility_sets(config)
    judge, refusal_judge = get_judges(config) if safety_sets else (None, None)
    observations = {}
    for role, cfg in models.items():
        with phase(f"{role} model"):
            observations[role] = evaluate_model(cfg, config, role=role, safety_sets=safety_sets,
                                                pair_set=pair_set, utility_sets=utility_sets, judge=judge,
                                                refusal_judge=refusal_judge,
                                                answers=None if answers is None else answers.get(role, []))
    rows = [row for obs in observations.values() for row in summary_rows(obs, config)]
    if "base" in observations and "trained" in observations:
        rows += paired_delta_rows(observations["base"], observations["trained"], config)
    rows += reference_rows(pair_set, config)
    datasets = {s.name: f"{len(s.prompts)} prompts" for s in safety_sets}
    if pair_set is not None:
        datasets[pair_set.name] = f"{len(pair_set.pairs)} pairs"
    datasets.update({u.name: f"{len(u.items)} items" for u in utility_sets})
    return EvaluationResult(rows, observations, datasets, time.perf_counter() - started)


def evaluation_requests(config: PipelineConfig, translated: pa.Table | None) -> list[AnswerRequest]:
    """The greedy answers evaluating a model asks for (:func:`mpo_core.evaluation.measure.answer_requests`)."""
    return answer_requests(load_safety_sets(config, translated), load_utility_sets(config))


def models_answers(config: PipelineConfig, models: dict[str, ModelConfig],
                   requests: list[AnswerRequest]) -> list[dict]:
    """Every model's greedy answers to ``requests``, model after model (GENERATIONS rows: ``role`` and the
    RESPONSES columns), each model's backend freed before the next loads."""
    rows: list[dict] = []
    for role, cfg in models.items():
        with phase(f"{role} model answers"):
            rows += [{"role": role, **row} for row in generate_answers(cfg, config, requests,
                                                                        get_backend(cfg, config.generate))]
        ENGINES.shutdown()
    return rows


def report_meta(config: PipelineConfig, models: dict[str, ModelConfig], result: EvaluationResult,
                config_hash: str) -> dict[str, Any]:
    """The facts that head the report: models, judge, data, decoding, config hash, time taken."""
    meta: dict[str, Any] = {f"model ({role})": cfg.name_or_path for role, cfg in models.items()}
    judges = {key[1]: name for obs in result.observations.values() for key, name in obs.judges.items() if name}
    meta["judge (ASR)"] = judges.get("asr", config.label.judge)
    meta["judge (over-refusal)"] = judges.get("over_refusal", REFUSAL_JUDGE)
    meta["data"] = "; ".join(f"{name}: {what}" for name, what in result.datasets.items())
    meta["decoding"] = (f"greedy, max_new_tokens={config.evaluate.max_new_tokens}, "
                        f"backend={config.generate.backend}")
    meta["label noise (target side)"] = describe_noise(config.pair.target_noise, config.pair.noise_seed)
    meta["config hash"] = config_hash
    meta["evaluation time"] = f"{round_seconds(result.seconds)} s"
    return meta


def write_evaluation(
    result: EvaluationResult,
    config: PipelineConfig,
    models: dict[str, ModelConfig],
    out_dir: str | Path,
    *,
    config_hash: str,
    inputs: dict[str, str] | None = None,
    extra_meta: dict[str, Any] | None = None,
    shards: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the ``eval`` artifact, the judged responses of each model (``responses_<role>.parquet``) and
    the report folder into ``out_dir`` (``extra_meta`` joins the report's head; ``shards``, the shards that
    generated the answers, joins the ``eval`` manifest); return ``{"eval", "report", "report_html"}`` paths."""

    out_dir = Path(out_dir)
    for role, obs in result.observations.items():
        if obs.responses:
            write_artifact(obs.responses, out_dir / f"responses_{role}.parquet", "responses",
                           config_hash=config_hash, inputs=inputs)
    eval_path = out_dir / "eval.parquet"
    write_artifact(result.rows, eval_path, "eval", config_hash=config_hash, inputs=inputs,
                   extra={"models": {r: m.name_or_path for r, m in models.items()}, "datasets": result.datasets,
                          "seconds": round_seconds(result.seconds)} | ({"shards": shards} if shards else {}))
    meta = report_meta(config, models, result, config_hash) | (extra_meta or {})
    report = write_report(result.rows, out_dir / "report", meta=meta)
    return {"eval": eval_path, "report": report["markdown"], "report_html": report["html"]}
