"""Stage ``evaluate``: the starting model, the trained model and (after align) the raw model side by side
(:mod:`mpo_core.evaluation`) -> the ``eval`` artifact and the report, headed by the sentences of
:mod:`mpo_core.results.sentences`."""

from __future__ import annotations

from mpo_core.evaluation.compare import evaluate_models, write_evaluation
from mpo_core.generation.vllm_backend import vllm_engine_scope
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


def run_evaluate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``evaluate``: the starting model (``base``: the aligned checkpoint when align ran, else
    ``config.model``), the trained model (``checkpoint``) and, when align ran, the un-aligned ``raw`` model
    side by side -> ``eval`` artifact and ``report`` (Markdown, with ``report.html`` and the plots beside it)."""
    config, inputs = stage.config, stage.inputs
    models = {"raw": config.model} if "aligned" in inputs else {}
    models["base"] = stage.model
    if "checkpoint" in inputs:
        models["trained"] = config.model.model_copy(update={"name_or_path": str(inputs.path("checkpoint"))})
    models = selected_roles(models, config.evaluate.roles)
    with vllm_engine_scope():
        result = evaluate_models(config, models, translated=inputs.table_or_none("translated"),
                                 filtered=inputs.table_or_none("filtered"),
                                 reference=inputs.table_or_none("reference"))
    meta = pipeline_meta(inputs.paths)
    if (summary := transfer_summary(result.rows, config)) is not None:
        meta["transfer"] = summary
    if (means := target_means_line(result.rows, config)) is not None:
        meta["target languages, mean"] = means
    write_evaluation(result, config, models, stage.out_dir, **stage.provenance, extra_meta=meta)
    return {}
