"""The pipeline's stages, their artifacts and their identities, in one table.

Every stage is a plain function ``run(config, inputs, out_dir) -> outputs`` living in its own module of
``mpo_core``: ``inputs`` maps upstream artifact names to paths, ``out_dir`` is the stage's own folder in the
run, and ``outputs`` maps the artifact names it wrote to paths. The function writes with
:func:`mpo_core.plumbing.artifacts.write_artifact`, passing :func:`stage_identity` as ``config_hash`` and the
content hashes of its inputs, so that a stage whose identity is unchanged can be skipped.

Artifact names are unique across the pipeline, so ``inputs`` of a stage are found by name among the
outputs of the stages before it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mpo_core import __version__
from mpo_core.plumbing.artifacts import file_hash, manifest_path, read_manifest
from mpo_core.plumbing.config import ModelConfig, PipelineConfig, canonical_hash, section_hash

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
    # inputs of which the stage reads only some columns: its identity hashes those columns, not the file
    reads_columns: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def load(self) -> StageFn:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


# The reference runs on the dominant side only: target-side changes (label noise) leave it current.
REFERENCE_READS = ("pair_id", "prompt_id", "dominant_lang", "target_lang", "dominant_prompt", "dominant_chosen",
                   "dominant_rejected")

# Order is the pipeline's order. ``model`` sections are part of every stage that runs the model.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "mpo_core.stages.ingest:run_ingest", (), ("prompts",), ("run", "prompts"), "cpu"),
    StageSpec(
        "translate", "mpo_core.stages.translate:run_translate", ("prompts",), ("translated",),
        ("run", "model", "translate"), "cpu",
    ),
    StageSpec(
        "align", "mpo_core.stages.align:run_align", ("translated",), ("aligned",), ("run", "model", "align"), "gpu",
    ),
    StageSpec(
        "generate", "mpo_core.stages.generate:run_generate", ("translated", "aligned"), ("responses",),
        ("run", "model", "generate"), "gpu",
    ),
    StageSpec(
        "label", "mpo_core.stages.label:run_label", ("responses",), ("labelled",), ("label",), "gpu",
    ),
    StageSpec("pair", "mpo_core.stages.pair:run_pair", ("labelled",), ("pairs",), ("run", "pair"), "cpu"),
    StageSpec(
        "filter", "mpo_core.stages.filter:run_filter", ("pairs",), ("filtered", "dropped", "filter_report"),
        ("filter", "reference", "label", "model"), "cpu",
    ),
    StageSpec(
        "reference", "mpo_core.stages.reference:run_reference", ("filtered", "aligned"), ("reference",),
        ("model", "reference"), "gpu",
        reads_columns=(("filtered", REFERENCE_READS),),
    ),
    StageSpec(
        "train", "mpo_core.stages.train:run_train", ("filtered", "reference", "aligned", "translated"),
        ("checkpoint",),
        ("run", "model", "reference.min_safe_share", "reference.drop_unsafe_pairs", "train"), "gpu",
    ),
    StageSpec(
        "evaluate", "mpo_core.stages.evaluate:run_evaluate",
        ("translated", "filtered", "reference", "checkpoint", "aligned"), ("eval", "report"), ("run", "model", "generate", "label", "evaluate"), "gpu",
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


def pair_source(config: PipelineConfig) -> str | None:
    """The ready-made pairs file of ``config`` (``pair.source``), or None when pairs are built from samples."""
    return getattr(config.pair, "source", None) or None


def align_enabled(config: PipelineConfig) -> bool:
    """Whether the ``align`` stage runs: its checkpoint (``aligned``) is then the model every later stage
    starts from; otherwise the stage is bypassed and ``aligned`` is read by no one."""
    return config.align.enabled


def starting_model(config: PipelineConfig, inputs: dict[str, Path]) -> ModelConfig:
    """The model a stage runs: the ``aligned`` checkpoint among ``inputs`` when align ran, else ``config.model``."""
    if "aligned" in inputs:
        return config.model.model_copy(update={"name_or_path": str(inputs["aligned"])})
    return config.model


def content_fingerprint(path: Path) -> str:
    """A file's sha256, or for a folder (a checkpoint) the hash of its files' (name, size, mtime).

    Folders are fingerprinted by metadata, not bytes, so that checking a multi-GB checkpoint for reuse
    costs milliseconds.
    """
    if path.is_dir():
        entries = sorted(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*")
            if p.is_file()
        )
        return canonical_hash(entries)
    return file_hash(path)


def output_fingerprint(path: Path) -> str:
    """The content hash downstream stages see: the manifest's where there is one, else :func:`content_fingerprint`."""
    if manifest_path(path).exists():
        return read_manifest(path).content_hash
    return content_fingerprint(path)


def input_hashes(inputs: dict[str, Path]) -> dict[str, str]:
    """Content hash of each input artifact, by name (what a stage's identity is computed from)."""
    return {name: output_fingerprint(Path(p)) for name, p in inputs.items()}


def columns_hash(path: Path, columns: tuple[str, ...]) -> str:
    """sha256 of the named columns of a Parquet artifact (their Arrow IPC bytes, schema metadata dropped)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(columns)).combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def stage_input_hashes(spec: StageSpec, inputs: dict[str, Path]) -> dict[str, str]:
    """:func:`input_hashes`, except that an input of which ``spec`` reads only some columns is hashed by
    those columns (``spec.reads_columns``)."""
    hashes = input_hashes(inputs)
    for name, columns in spec.reads_columns:
        if name in inputs:
            hashes[name] = columns_hash(Path(inputs[name]), columns)
    return hashes


def external_inputs(spec: StageSpec, config: PipelineConfig) -> dict[str, Path]:
    """Files from outside the run that a stage reads: ingest its prompt source, pair a ready-made
    ``pair.source``. Their content hashes (as ``source``) join the stage's identity."""
    if spec.name == "ingest":
        from mpo_core.stages.ingest import resolve_source
        from mpo_core.plumbing.seed import seed_path

        source = config.prompts.source
        return {"source": seed_path() if source == "seed" else resolve_source(source)}
    if spec.name == "pair" and pair_source(config):
        from mpo_core.stages.ingest import resolve_source

        return {"source": resolve_source(pair_source(config))}
    if spec.name == "align":
        from mpo_core.stages.align import external_align_files

        return external_align_files(config)
    return {}


@dataclass(frozen=True)
class StageCall:
    """One call of a stage: the content hashes of what it reads and the identity they make with its config
    sections, as its artifacts record them."""

    inputs: dict[str, str]
    identity: str

    @property
    def provenance(self) -> dict[str, Any]:
        """The ``config_hash`` and ``inputs`` keywords of :func:`mpo_core.plumbing.artifacts.write_artifact`."""
        return {"config_hash": self.identity, "inputs": self.inputs}


def stage_call(name: str, config: PipelineConfig, inputs: dict[str, Path]) -> StageCall:
    """The :class:`StageCall` of stage ``name`` on ``inputs`` (upstream artifacts) and its external files."""
    spec = get_stage(name)
    hashes = stage_input_hashes(spec, inputs) | {k: file_hash(p) for k, p in external_inputs(spec, config).items()}
    return StageCall(hashes, stage_identity(spec, config, hashes))


def downstream_of(name: str) -> list[str]:
    """Stages that (transitively) read an output of stage ``name``, in pipeline order, itself first."""
    produced: set[str] = set(get_stage(name).outputs)
    result = [name]
    for spec in STAGES[[s.name for s in STAGES].index(name) + 1 :]:
        if produced.intersection(spec.inputs):
            result.append(spec.name)
            produced.update(spec.outputs)
    return result
