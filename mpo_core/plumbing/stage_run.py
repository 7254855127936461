"""What a stage function gets and gives back: :class:`StageRun` in, ``{output name: Artifact}`` out.

The runner (:mod:`mpo_core.plumbing.runs`) builds the :class:`StageRun`, calls the stage through
:func:`call_stage`, which writes what the stage returned where the stage table says, with the stage's
provenance, and checks that every output of the table is in place. Inputs are read on the stage's request,
validated against the schema of the stage that wrote them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from mpo_core.plumbing import profile
from mpo_core.plumbing.artifacts import (
    ArtifactWriter,
    artifact_is_complete,
    iter_batches,
    read_artifact,
    read_manifest,
    write_artifact,
)
from mpo_core.plumbing.config import ModelConfig, PipelineConfig
from mpo_core.plumbing.errors import ArtifactError
from mpo_core.plumbing.stage_table import (
    OutputSpec,
    StageSpec,
    artifact_spec,
    get_stage,
    stage_identity,
    stage_input_hashes,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (from 0) of ``count`` of a stage's rows (:mod:`mpo_core.plumbing.shards`)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in 0..{self.count - 1}")

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def slice(self, rows: list[T]) -> list[T]:
        """This shard's contiguous part of ``rows``: ``rows[len*i//n : len*(i+1)//n]``."""
        return rows[len(rows) * self.index // self.count: len(rows) * (self.index + 1) // self.count]


@dataclass(frozen=True)
class Artifact:
    """A table a stage returns for one of its outputs; ``extra`` joins its manifest."""

    data: pa.Table | list[dict[str, Any]] | dict[str, list]
    extra: dict[str, Any] = field(default_factory=dict)


class StageInputs:
    """A stage's upstream artifacts, by name: paths, and tables read and validated on request."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = {name: Path(p) for name, p in paths.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def path(self, name: str) -> Path:
        try:
            return self.paths[name]
        except KeyError:
            raise ArtifactError(f"this stage was given no {name!r} artifact (inputs: {sorted(self.paths)})") from None

    def table(self, name: str) -> pa.Table:
        """Input ``name``, read and checked against the schema of the stage that wrote it."""
        return read_artifact(self.path(name), artifact_spec(name).kind)

    def table_or_none(self, name: str) -> pa.Table | None:
        return self.table(name) if name in self else None

    def batches(self, name: str, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Input ``name`` streamed in checked record batches (bounded memory)."""
        return iter_batches(self.path(name), artifact_spec(name).kind, batch_size=batch_size)

    def rows(self, name: str) -> int:
        return read_manifest(self.path(name)).rows


def starting_model(config: PipelineConfig, inputs: dict[str, Path] | StageInputs) -> ModelConfig:
    """The model a stage runs: the ``aligned`` checkpoint among ``inputs`` when align ran, else ``config.model``."""
    paths = inputs.paths if isinstance(inputs, StageInputs) else inputs
    if "aligned" in paths:
        return config.model.model_copy(update={"name_or_path": str(paths["aligned"])})
    return config.model


@dataclass(frozen=True)
class StageRun:
    """One run of one stage: the recipe, the inputs, the stage's own folder, and whether an interrupted run
    of the same identity left files there to resume from (``resume``; a forced or changed stage starts from an
    empty folder). Artifacts written through :meth:`writer` or :meth:`write` carry the stage's provenance. A
    sharded run (``shard``) processes only its slice of the stage's rows (:meth:`own_rows`)."""

    spec: StageSpec
    config: PipelineConfig
    inputs: StageInputs
    out_dir: Path
    resume: bool
    identity: str = field(repr=False)
    input_hashes: dict[str, str] = field(repr=False, default_factory=dict)
    shard: Shard | None = None

    @property
    def produces(self) -> tuple[OutputSpec, ...]:
        """What this run writes: the stage's outputs, or for a shard of a stage whose shards write something
        else (``StageSpec.shard_produces``), that."""
        if self.shard is not None and self.spec.shard_produces:
            return self.spec.shard_produces
        return self.spec.produces

    def own_rows(self, rows: list[T]) -> list[T]:
        """The part of ``rows`` this run processes: its shard's slice, or all of them."""
        return rows if self.shard is None else self.shard.slice(rows)

    @property
    def model(self) -> ModelConfig:
        """The model this stage starts from (:func:`starting_model`)."""
        return starting_model(self.config, self.inputs)

    @property
    def provenance(self) -> dict[str, Any]:
        """``config_hash`` and ``inputs`` as :func:`mpo_core.plumbing.artifacts.write_artifact` records them;
        also recorded inside checkpoints."""
        return {"config_hash": self.identity, "inputs": self.input_hashes}

    def path(self, name: str) -> Path:
        """Where output ``name`` goes (a folder output is filled there by the stage)."""
        return self.out_dir / self.spec.output(name).file

    def writer(self, name: str, extra: dict[str, Any] | None = None) -> ArtifactWriter:
        """A streaming writer for table output ``name`` (``with stage.writer("filtered") as out: ...``)."""
        output = self.spec.output(name)
        return ArtifactWriter(self.out_dir / output.file, output.kind, **self.provenance, extra=extra)

    def write(self, file: str, data: Any, kind: str, extra: dict[str, Any] | None = None) -> Path:
        """Write a side artifact (not an output of the table, e.g. per-model responses) into the stage's folder."""
        path = self.out_dir / file
        write_artifact(data, path, kind, **self.provenance, extra=extra)
        return path


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch and MKL size their pools from at start-up
THREADS_OVERRIDE_ENV = "MPO_THREADS"  # set by a launcher that sizes its processes' threads (the sweep's lanes)


def apply_threads(threads: int) -> None:
    """``runtime.threads`` (or ``$MPO_THREADS`` where a launcher set it) for this process: the thread
    environment (for torch not yet imported and the libraries it starts) and torch's intra-op threads where
    torch is already imported; 0 leaves both."""
    threads = int(os.environ.get(THREADS_OVERRIDE_ENV) or threads)
    if threads < 1:
        return
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def call_stage(stage: StageRun, write_outputs: bool = True) -> dict[str, Path]:
    """Call the stage function, write the tables it returns (``write_outputs``: only one process of a
    multi-process launch writes) and return the path of every output of the table, checked."""
    apply_threads(stage.config.runtime.threads)
    with profile.profiled(stage.spec.name) as stage_profile:
        returned = stage.spec.load()(stage) or {}
    expected = [output.name for output in stage.produces]
    unknown = sorted(set(returned) - set(expected))
    if unknown:
        raise ArtifactError(f"stage {stage.spec.name} returned {unknown}, the stage table says {expected}")
    if write_outputs:
        for name, artifact in returned.items():
            output = stage.spec.output(name)
            if not isinstance(artifact, Artifact) or not output.is_table:
                raise ArtifactError(f"stage {stage.spec.name}: output {name} ({output.kind}) must be returned as an Artifact table")
            write_artifact(artifact.data, stage.path(name), output.kind, **stage.provenance, extra=artifact.extra)
        profile.write_profile(stage_profile, stage.out_dir)  # last: a stage that failed leaves none
    return {name: stage.path(name) for name in expected}


def check_outputs(stage: StageRun) -> dict[str, Path]:
    """Every output of the table in place: tables whole and written with this identity, folders and files
    present. An :class:`ArtifactError` names the first that is not."""
    outputs = {}
    for output in stage.spec.produces:
        path = stage.path(output.name)
        if not path.exists():
            raise ArtifactError(f"stage {stage.spec.name} finished without writing {output.name} ({path})")
        if output.is_table and not (artifact_is_complete(path) and read_manifest(path).config_hash == stage.identity):
            raise ArtifactError(f"stage {stage.spec.name}: {path} is not a whole artifact of this run of the stage")
        outputs[output.name] = path
    return outputs


def run_stage_function(
    name: str, config: PipelineConfig, inputs: dict[str, Path], out_dir: Path,
    launcher: Callable[[StageRun], None] | None = None,
) -> dict[str, Path]:
    """Run stage ``name`` on ``inputs`` into ``out_dir`` without reuse check or marker, the folder's present
    content kept (a stage resumes from what it finds there), in this process or through ``launcher`` (a
    multi-process launch, :func:`tasks.launch.launcher_for`). For notebooks, scripts and tests; pipelines go
    through :func:`mpo_core.plumbing.runs.execute_stage`."""
    spec = get_stage(name)
    inputs = {k: Path(v) for k, v in inputs.items()}
    hashes = stage_input_hashes(spec, config, inputs)
    out_dir = Path(out_dir)
    resume = out_dir.is_dir() and any(out_dir.iterdir())
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = StageRun(spec, config, StageInputs(inputs), out_dir, resume, stage_identity(spec, config, hashes), hashes)
    if launcher is None:
        call_stage(stage)
    else:
        launcher(stage)
    return check_outputs(stage)
