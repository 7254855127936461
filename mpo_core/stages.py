"""The pipeline's stages, their artifacts and their identities, in one table.

Every stage is a plain function ``run(config, inputs, out_dir) -> outputs`` living in its own module of
``mpo_core``: ``inputs`` maps upstream artifact names to paths, ``out_dir`` is the stage's own folder in the
run, and ``outputs`` maps the artifact names it wrote to paths. The function writes with
:func:`mpo_core.artifacts.write_artifact`, passing :func:`stage_identity` as ``config_hash`` and the
content hashes of its inputs, so that a stage whose identity is unchanged can be skipped.

Artifact names are unique across the pipeline, so ``inputs`` of a stage are found by name among the
outputs of the stages before it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mpo_core import __version__
from mpo_core.config import PipelineConfig, canonical_hash, section_hash

StageFn = Callable[[PipelineConfig, dict[str, Path], Path], dict[str, Path]]


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it reads, what it writes, which config sections make its identity, where it runs."""

    name: str
    entry: str  # "module:function", imported lazily
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sections: tuple[str, ...]
    device: Literal["cpu", "gpu"]

    def load(self) -> StageFn:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


# Order is the pipeline's order. ``model`` sections are part of every stage that runs the model.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "mpo_core.ingest:run_ingest", (), ("prompts",), ("run", "prompts"), "cpu"),
    StageSpec(
        "translate", "mpo_core.translate:run_translate", ("prompts",), ("translated",),
        ("run", "model", "translate"), "cpu",
    ),
    StageSpec(
        "generate", "mpo_core.generation:run_generate", ("translated",), ("responses",),
        ("run", "model", "generate"), "gpu",
    ),
    StageSpec(
        "label", "mpo_core.judges:run_label", ("responses",), ("labelled",), ("label",), "gpu",
    ),
    StageSpec("pair", "mpo_core.pairing:run_pair", ("labelled",), ("pairs",), ("run", "pair"), "cpu"),
    StageSpec(
        "filter", "mpo_core.filtering:run_filter", ("pairs",), ("filtered", "dropped", "filter_report"),
        ("filter", "reference"), "cpu",
    ),
    StageSpec(
        "reference", "mpo_core.reference:run_reference", ("filtered",), ("reference",),
        ("model", "reference"), "gpu",
    ),
    StageSpec(
        "train", "mpo_core.trainer:run_train", ("filtered", "reference"), ("checkpoint",),
        ("run", "model", "train"), "gpu",
    ),
    StageSpec(
        "evaluate", "mpo_core.evaluation:run_evaluate", ("translated", "filtered", "reference", "checkpoint"),
        ("eval", "report"), ("run", "model", "generate", "label", "evaluate"), "gpu",
    ),
)

STAGE_BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def get_stage(name: str) -> StageSpec:
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_BY_NAME)}") from None


def stage_identity(spec: StageSpec, config: PipelineConfig, input_hashes: dict[str, str]) -> str:
    """sha256 of (stage name, its config sections, its inputs' content hashes, code version)."""
    return canonical_hash(
        {
            "stage": spec.name,
            "config": section_hash(config, *spec.sections),
            "inputs": dict(sorted(input_hashes.items())),
            "code": __version__,
        }
    )


def downstream_of(name: str) -> list[str]:
    """Stages that (transitively) read an output of stage ``name``, in pipeline order, itself first."""
    produced: set[str] = set(get_stage(name).outputs)
    result = [name]
    for spec in STAGES[[s.name for s in STAGES].index(name) + 1 :]:
        if produced.intersection(spec.inputs):
            result.append(spec.name)
            produced.update(spec.outputs)
    return result
