"""Stage ``ingest``: the prompt source of ``config.prompts`` read into the ``prompts`` artifact (formats:
:mod:`mpo_core.readers`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.seed import seed_path
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.readers.files import resolve_source
from mpo_core.readers.prompts import load_prompts


def source_files(config: PipelineConfig) -> dict[str, Path]:
    """The prompt source the stage reads (its content joins the stage's identity, so editing it reruns ingest)."""
    source = config.prompts.source
    return {"source": seed_path() if source == "seed" else resolve_source(source)}


def run_ingest(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``ingest``: the ``prompts`` artifact from ``config.prompts``."""
    cfg = stage.config.prompts
    table = load_prompts(cfg, seed=stage.config.run.seed)
    langs = Counter(table.column("lang").to_pylist())
    extra = {"source": str(cfg.source), "prompts": len(set(table.column("prompt_id").to_pylist())),
             "rows_per_lang": dict(sorted(langs.items()))}
    return {"prompts": Artifact(table, extra)}
