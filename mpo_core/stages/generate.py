"""Stage ``generate``: k samples per prompt and language from the starting model (:mod:`mpo_core.generation`)."""

from __future__ import annotations

import time
from collections.abc import Container

from mpo_core.generation.responses import generate_responses
from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.progress import round_seconds
from mpo_core.plumbing.stage_run import Artifact, StageRun


def generation_prompts(config: PipelineConfig, translated: list[dict]) -> list[dict]:
    """The prompts the generate stage samples: ``train`` split, dominant + target languages.

    With ``generate.harmful_only`` (default) only harmful prompts: MPO pairs are built from them alone.
    With ``generate.held_out_pairs`` the ``eval`` split too: pairs of those prompts measure reward gaps on
    held-out data and are never trained on (the train stage leaves them out).
    """
    langs = {config.run.dominant_lang, *config.run.target_langs}
    splits = {"train", "eval"} if config.generate.held_out_pairs else {"train"}
    return [
        row for row in translated
        if row["split"] in splits and row["lang"] in langs
        and (row["harmful"] or not config.generate.harmful_only)
    ]


def raw_dominant_responses(config: PipelineConfig, inputs: Container[str], prompts: list[dict]) -> list[dict]:
    """After align (``aligned`` among ``inputs``), ``generate.raw_dominant_samples`` samples per
    dominant-language prompt from the raw model (``config.model``), their ``model`` column the raw model's
    name and their ``sample_idx`` after the policy's own (``generate.num_samples`` on), so that
    (prompt, language, sample) stays a key. The pair stage reads them only for a dominant rejected answer
    where the aligned model never complied (:func:`mpo_core.stages.pair.build_pairs`); [] without align."""
    k = config.generate.raw_dominant_samples
    if k == 0 or "aligned" not in inputs:
        return []
    dominant = [p for p in prompts if p["lang"] == config.run.dominant_lang]
    rows = generate_responses(config.model, config.generate, dominant, num_samples=k)
    for row in rows:
        row["sample_idx"] += config.generate.num_samples
    return rows


def run_generate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``generate``: ``translated`` PROMPTS -> ``responses`` (k samples per prompt and language).

    Rows come in prompt order, each prompt's samples by ``sample_idx`` (the raw model's after the policy's),
    so that a shard's rows are a contiguous part of the unsharded output (:mod:`mpo_core.plumbing.shards`).
    """
    config = stage.config
    prompts = stage.own_rows(generation_prompts(config, stage.inputs.table("translated").to_pylist()))
    started = time.perf_counter()
    with vllm_engine_scope():
        rows = generate_responses(stage.model, config.generate, prompts)
        raw_rows = raw_dominant_responses(config, stage.inputs, prompts)
    position = {(p["prompt_id"], p["lang"]): i for i, p in enumerate(prompts)}
    rows = sorted(rows + raw_rows, key=lambda row: (position[row["prompt_id"], row["lang"]], row["sample_idx"]))
    seconds = time.perf_counter() - started
    extra = {
        "prompts": len(prompts),
        "samples": len(rows),
        "seconds": round_seconds(seconds),
        "samples_per_second": round(len(rows) / seconds, 3) if seconds > 0 else None,
        "raw_dominant_samples": len(raw_rows),
    }
    return {"responses": Artifact(rows, extra)}
