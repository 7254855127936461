"""Stage ``label``: every response judged by the configured judge (:mod:`mpo_core.judges`)."""

from __future__ import annotations

from collections import Counter

from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.judges.base import label_rows
from mpo_core.judges.select import get_judge
from mpo_core.plumbing.stage_run import Artifact, StageRun


def run_label(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``label``: ``responses`` -> ``labelled`` (RESPONSES with judge, verdict, score)."""
    rows = stage.own_rows(stage.inputs.table("responses").to_pylist())
    with vllm_engine_scope():
        judge = get_judge(stage.config.label, stage.config.model, stage.config.generate.vllm)
        labelled = label_rows(judge, rows)
    counts = Counter(row["verdict"] for row in labelled)
    return {"labelled": Artifact(labelled, {"judge": judge.name, "verdicts": dict(counts)})}
