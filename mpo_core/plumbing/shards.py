"""A stage's work split into shards: disjoint, deterministic slices of its rows, each run on its own and
merged into the stage's output.

Shard ``i`` of ``n`` takes the contiguous slice ``rows[len*i//n : len*(i+1)//n]`` of the rows the stage
processes, in their order. A stage that shards produces its rows in input order and each row from its own
input alone (per-request seeds, :func:`mpo_core.generation.backend.request_seed`), so the shards' outputs,
concatenated in shard order, are the unsharded output row for row.

Each shard writes into ``<run>/shards/<stage>/shard-<i>-of-<n>/`` with a marker (``shard.json``: the stage
identity, written last), so a finished shard is never redone and a rerun after a failure redoes only the
shards without a current marker. The stage itself then runs :func:`merged` as its launcher, through the
runner's usual bookkeeping (:func:`mpo_core.plumbing.runs.execute_stage`): its output names every shard.

``evaluate`` shards only its generation: a shard writes every model's greedy answers to its slice of the
prompts (``StageSpec.shard_produces``); the merge writes them, concatenated, into the stage's folder and runs
the stage whole on them (judging, reward gaps, report), as an unsharded run does on its own answers.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.plumbing.artifacts import (
    artifact_is_complete,
    read_artifact,
    read_manifest,
    write_artifact,
    write_text_atomically,
)
from mpo_core.plumbing.config import SHARDABLE, PipelineConfig
from mpo_core.plumbing.errors import ArtifactError
from mpo_core.plumbing.progress import round_seconds
from mpo_core.plumbing.runs import Launcher, RunFolder, check_stage
from mpo_core.plumbing.stage_run import Shard, StageInputs, StageRun, call_stage
from mpo_core.plumbing.stage_table import OutputSpec, StageSpec

SHARDS_DIR = "shards"
MARKER = "shard.json"


def shard_count(spec: StageSpec, config: PipelineConfig) -> int:
    """How many shards ``spec`` runs in under ``config``: its section's ``shards``, 1 for other stages."""
    return getattr(getattr(config, spec.name), "shards", 1) if spec.name in SHARDABLE else 1


def shard_outputs(spec: StageSpec) -> tuple[OutputSpec, ...]:
    """What each shard of ``spec`` writes into its folder: ``spec.shard_produces``, else the stage's outputs."""
    return spec.shard_produces or spec.produces


def shard_dir(run: RunFolder, spec: StageSpec, shard: Shard) -> Path:
    return run.path / SHARDS_DIR / spec.name / shard.name


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_is_current(spec: StageSpec, run: RunFolder, shard: Shard, identity: str) -> bool:
    """Whether ``shard`` finished for this identity of the stage, its outputs whole."""
    folder = shard_dir(run, spec, shard)
    marker = _marker(folder)
    if marker is None or marker.get("identity") != identity:
        return False
    return all(artifact_is_complete(folder / output.file) for output in shard_outputs(spec))


def pending_shards(spec: StageSpec, config: PipelineConfig, run: RunFolder, inputs: dict[str, Path]) -> list[Shard]:
    """The shards of the stage that are not done for its current identity (all of them, the first time)."""
    identity = check_stage(spec, config, run, inputs).identity
    count = shard_count(spec, config)
    return [s for s in (Shard(i, count) for i in range(count)) if not shard_is_current(spec, run, s, identity)]


@dataclass(frozen=True)
class ShardOutcome:
    shard: Shard
    ran: bool
    seconds: float


def execute_shard(
    spec: StageSpec, config: PipelineConfig, run: RunFolder, inputs: dict[str, Path], shard: Shard,
    flow_run_id: str | None = None, *, force: bool = False,
) -> ShardOutcome:
    """Run ``shard`` of the stage into its folder unless it is current (or ``force``); its marker is written
    last."""
    check = check_stage(spec, config, run, inputs)
    folder = shard_dir(run, spec, shard)
    if not force and shard_is_current(spec, run, shard, check.identity):
        return ShardOutcome(shard, False, 0.0)
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stage = StageRun(spec, config, StageInputs(inputs), folder, False, check.identity, check.input_hashes, shard)
    call_stage(stage)
    seconds = time.perf_counter() - started
    write_text_atomically(folder / MARKER, json.dumps({
        "identity": check.identity, "index": shard.index, "count": shard.count, "seconds": round_seconds(seconds),
        "host": socket.gethostname(), "flow_run_id": flow_run_id,
    }, indent=2))
    return ShardOutcome(shard, True, seconds)


def merged(run: RunFolder, count: int) -> Launcher:
    """A launcher that writes the shards' outputs from its ``count`` finished shards, concatenated in shard
    order, each output's manifest listing the shards (rows, seconds, host, flow run): the stage's outputs, or
    (``shard_produces``) what the stage then runs whole on."""

    def merge(stage: StageRun) -> None:
        shards = [Shard(i, count) for i in range(count)]
        missing = [s.index for s in shards if not shard_is_current(stage.spec, run, s, stage.identity)]
        if missing:
            raise ArtifactError(
                f"stage {stage.spec.name}: shard(s) {missing} of {count} have not finished for this identity; "
                "run them first (the pipeline does)"
            )
        for output in shard_outputs(stage.spec):
            parts, listed = [], []
            for shard in shards:
                folder = shard_dir(run, stage.spec, shard)
                path = folder / output.file
                parts.append(read_artifact(path, output.kind))
                marker = _marker(folder) or {}
                listed.append({"index": shard.index, "rows": read_manifest(path).rows, "seconds": marker.get("seconds"),
                               "host": marker.get("host"), "flow_run_id": marker.get("flow_run_id")})
            table = pa.concat_tables(parts)
            write_artifact(table, stage.path(output.name), output.kind, **stage.provenance, extra={"shards": listed})
        if stage.spec.shard_produces:
            call_stage(stage)

    return merge
