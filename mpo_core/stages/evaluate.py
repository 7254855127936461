"""Stage ``evaluate``: the starting model, the trained model and (after align) the raw model side by side
(:mod:`mpo_core.evaluation`) -> the ``eval`` artifact and the report, headed by the sentences of
:mod:`mpo_core.results.sentences`."""

from __future__ import annotations

from mpo_core.evaluation.compare import evaluate_models, evaluation_requests, models_answers, write_evaluation
from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.plumbing.artifacts import artifact_is_complete, read_artifact, read_manifest
from mpo_core.plumbing.config import ModelConfig
from mpo_core.plumbing.errors import ConfigError
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.results.sentences import pipeline_meta, target_means_line, transfer_summary


def selected_roles(models: dict[str, ModelConfig], roles: list[str] | None) -> dict[str, ModelConfig]:
    """The models of ``roles`` (``evaluate.roles``; None: all); an error names a role the run lacks."""
    if roles is None:
        return models
    unknown = [r for r in roles if r not in models]
    if unknown:
        raise ConfigError(f"evaluate.roles names {unknown}; this run has the models {list(models)}")
    return {role: models[role] for role in roles}


def merged_answers(stage: StageRun) -> tuple[dict[str, list[dict]] | None, list[dict] | None]:
    """The models' answers a sharded evaluate's merge wrote into the stage's folder for this identity
    (role -> RESPONSES rows, and the shards that generated them), or (None, None): generate them here."""
    path = stage.path("generations")
    if not artifact_is_complete(path) or (manifest := read_manifest(path)).config_hash != stage.identity:
        return None, None
    answers: dict[str, list[dict]] = {}
    for row in read_artifact(path, "generations").to_pylist():
        answers.setdefault(row.pop("role"), []).append(row)
    return answers, manifest.extra.get("shards")


def run_evaluate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``evaluate``: the starting model (``base``: the aligned checkpoint when align ran, else
    ``config.model``), the trained model (``checkpoint``) and, when align ran, the un-aligned ``raw`` model
    side by side -> ``eval`` artifact and ``report`` (Markdown, with ``report.html`` and the plots beside it).
    A shard (``evaluate.shards``) writes only every model's greedy answers to its slice of the prompts
    (``generations``); the stage then runs whole on their merge (:mod:`mpo_core.plumbing.shards`)."""
    config, inputs = stage.config, stage.inputs
    models = {"raw": config.model} if "aligned" in inputs else {}
    models["base"] = stage.model
    if "checkpoint" in inputs:
        models["trained"] = config.model.model_copy(update={"name_or_path": str(inputs.path("checkpoint"))})
    models = selected_roles(models, config.evaluate.roles)
    translated = inputs.table_or_none("translated")
    if stage.shard is not None:
        requests = stage.own_rows(evaluation_requests(config, translated))
        with vllm_engine_scope():
            return {"generations": Artifact(models_answers(config, models, requests))}
    answers, shards = merged_answers(stage)
    with vllm_engine_scope():
        result = evaluate_models(config, models, translated=translated, filtered=inputs.table_or_none("filtered"),
                                 reference=inputs.table_or_none("reference"), answers=answers)
    meta = pipeline_meta(inputs.paths)
    if (summary := transfer_summary(result.rows, config)) is not None:
        meta["transfer"] = summary
    if (means := target_means_line(result.rows, config)) is not None:
        meta["target languages, mean"] = means
    write_evaluation(result, config, models, stage.out_dir, **stage.provenance, extra_meta=meta, shards=shards)
    return {}
