"""The pipeline's stages in one table: what each reads and writes, which config sections make its identity,
where it runs.

A stage is a plain function ``run_<stage>(stage: StageRun) -> dict[str, Artifact]`` in its module under
:mod:`mpo_core.stages`. It reads its inputs through ``stage.inputs`` and returns the tables it made; the runner
(:mod:`mpo_core.plumbing.runs`) decides whether it runs at all, reads and checks the inputs, writes the
returned tables where this table says, with provenance, and checks that every output is in place. Stage
code knows nothing of markers, manifests or identities.

Artifact names are unique across the pipeline, so the inputs of a stage are found by name among the outputs
of the stages before it.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from mpo_core import __version__
from mpo_core.plumbing.artifacts import file_hash
from mpo_core.plumbing.config import PipelineConfig, canonical_hash, section_hash
from mpo_core.plumbing.schemas import SCHEMAS


@dataclass(frozen=True)
class OutputSpec:
    """One output of a stage: its artifact name, its file or folder in the stage's folder, and its kind (a
    schema of :mod:`mpo_core.plumbing.schemas` for Parquet, ``folder`` for a checkpoint, ``file`` otherwise)."""

    name: str
    file: str
    kind: str

    @property
    def is_table(self) -> bool:
        return self.kind in SCHEMAS


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it reads, what it writes, which config sections make its identity, where it runs."""

    name: str
    entry: str  # "module:function", imported lazily
    inputs: tuple[str, ...]
    produces: tuple[OutputSpec, ...]
    sections: tuple[str, ...]
    device: Literal["cpu", "gpu"]
    # inputs of which the stage reads only some columns: its identity hashes those columns, not the file
    reads_columns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # "module:function" giving {name: path} of files from outside the run the stage reads (config -> files)
    external: str = ""
    # folders in the stage's folder kept only so that an interrupted run resumes (prunable once complete)
    resume_files: tuple[str, ...] = ()
    # what one shard writes where the stage's outputs are not concatenable rows (evaluate: every model's
    # greedy answers); the merge then runs the stage whole on the shards' rows (mpo_core.plumbing.shards)
    shard_produces: tuple[OutputSpec, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names of the stage's outputs, in table order."""
        return tuple(o.name for o in self.produces)

    def output(self, name: str) -> OutputSpec:
        """Output ``name``: one of the stage's, or what a shard of it writes (``shard_produces``)."""
        return next(o for o in (*self.produces, *self.shard_produces) if o.name == name)

    def load(self):
        """The stage function (imported now: stage modules import heavy libraries)."""
        return _entry(self.entry)

    def external_files(self, config: PipelineConfig) -> dict[str, Path]:
        return _entry(self.external)(config) if self.external else {}


def _entry(entry: str):
    module, _, func = entry.partition(":")
    return getattr(importlib.import_module(module), func)


# Where a training stage (align, train) keeps its resume checkpoints (optimizer state included).
CHECKPOINT_DIR = "checkpoints"

# The reference runs on the dominant side only: target-side changes (label noise) leave it current.
REFERENCE_READS = ("pair_id", "prompt_id", "dominant_lang", "target_lang", "dominant_prompt", "dominant_chosen",
                   "dominant_rejected")

# Order is the pipeline's order. ``model`` sections are part of every stage that runs the model.
STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "ingest", "mpo_core.stages.ingest:run_ingest", (), (OutputSpec("prompts", "prompts.parquet", "prompts"),),
        ("run", "prompts"), "cpu", external="mpo_core.stages.ingest:source_files",
    ),
    StageSpec(
        "translate", "mpo_core.stages.translate:run_translate", ("prompts",),
        (OutputSpec("translated", "translated.parquet", "prompts"),), ("run", "model", "translate"), "cpu",
    ),
    StageSpec(
        "align", "mpo_core.stages.align:run_align", ("translated",), (OutputSpec("aligned", "model", "folder"),),
        ("run", "model", "align"), "gpu", external="mpo_core.stages.align:external_align_files",
        resume_files=(CHECKPOINT_DIR,),
    ),
    StageSpec(
        "generate", "mpo_core.stages.generate:run_generate", ("translated", "aligned"),
        (OutputSpec("responses", "responses.parquet", "responses"),), ("run", "model", "generate"), "gpu",
    ),
    StageSpec(
        "label", "mpo_core.stages.label:run_label", ("responses",),
        (OutputSpec("labelled", "labelled.parquet", "responses"),), ("label",), "gpu",
    ),
    StageSpec(
        "pair", "mpo_core.stages.pair:run_pair", ("labelled",), (OutputSpec("pairs", "pairs.parquet", "pairs"),),
        ("run", "pair"), "cpu", external="mpo_core.stages.pair:source_files",
    ),
    StageSpec(
        "filter", "mpo_core.stages.filter:run_filter", ("pairs",),
        (OutputSpec("filtered", "filtered.parquet", "pairs"), OutputSpec("dropped", "dropped.parquet", "dropped"),
         OutputSpec("filter_report", "filter_report.md", "file")),
        ("filter", "reference", "label", "model"), "cpu",
    ),
    StageSpec(
        "reference", "mpo_core.stages.reference:run_reference", ("filtered", "aligned"),
        (OutputSpec("reference", "reference.parquet", "reference"),), ("model", "reference"), "gpu",
        reads_columns=(("filtered", REFERENCE_READS),),
    ),
    StageSpec(
        "train", "mpo_core.stages.train:run_train", ("filtered", "reference", "aligned", "translated"),
        (OutputSpec("checkpoint", "model", "folder"),),
        ("run", "model", "reference.min_safe_share", "reference.drop_unsafe_pairs", "train"), "gpu",
        resume_files=(CHECKPOINT_DIR,),
    ),
    StageSpec(
        "evaluate", "mpo_core.stages.evaluate:run_evaluate",
        ("translated", "filtered", "reference", "checkpoint", "aligned"),
        (OutputSpec("eval", "eval.parquet", "eval"), OutputSpec("report", "report/report.md", "file")),
        ("run", "model", "generate", "label", "evaluate"), "gpu",
        shard_produces=(OutputSpec("generations", "generations.parquet", "generations"),),
    ),
)

STAGE_BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def get_stage(name: str) -> StageSpec:
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_BY_NAME)}") from None


def artifact_spec(name: str) -> OutputSpec:
    """The output spec of artifact ``name`` (its producing stage's), whatever stage reads it."""
    for spec in STAGES:
        if name in spec.outputs:
            return spec.output(name)
    raise KeyError(f"no stage writes an artifact named {name!r}")


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


def content_fingerprint(path: Path) -> str:
    """What a stage's identity sees of an artifact: a file's sha256, or for a folder (a checkpoint) the hash of
    its files' (name, size, mtime).

    Always read from the artifact itself, never from its manifest, so that an input edited by hand after its
    consumer ran makes the consumer stale. Folders are fingerprinted by metadata, not bytes, so that checking
    a multi-GB checkpoint costs milliseconds.
    """
    if path.is_dir():
        entries = sorted(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*")
            if p.is_file()
        )
        return canonical_hash(entries)
    return file_hash(path)


def input_hashes(inputs: dict[str, Path]) -> dict[str, str]:
    """Content fingerprint of each input artifact, by name (what a stage's identity is computed from)."""
    return {name: content_fingerprint(Path(p)) for name, p in inputs.items()}


def columns_hash(path: Path, columns: tuple[str, ...]) -> str:
    """sha256 of the named columns of a Parquet artifact (their Arrow IPC bytes, schema metadata dropped)."""
    table = pq.read_table(path, columns=list(columns)).combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def stage_input_hashes(spec: StageSpec, config: PipelineConfig, inputs: dict[str, Path]) -> dict[str, str]:
    """The content hashes a stage's identity is made of: its upstream ``inputs`` (those of which ``spec``
    reads only some columns hashed by those columns, ``spec.reads_columns``) and the files from outside the
    run it reads (``spec.external``: ingest's prompt source, a ready-made ``pair.source``, align's data)."""
    hashes = input_hashes(inputs)
    for name, columns in spec.reads_columns:
        if name in inputs:
            hashes[name] = columns_hash(Path(inputs[name]), columns)
    return hashes | {k: file_hash(p) for k, p in spec.external_files(config).items()}


def downstream_of(name: str) -> list[str]:
    """Stages that (transitively) read an output of stage ``name``, in pipeline order, itself first."""
    produced: set[str] = set(get_stage(name).outputs)
    result = [name]
    for spec in STAGES[[s.name for s in STAGES].index(name) + 1 :]:
        if produced.intersection(spec.inputs):
            result.append(spec.name)
            produced.update(spec.outputs)
    return result
