"""One generic Prefect task that runs any stage of the table, plus the reporting Prefect shows for it.

The task reads the run's config, calls :func:`mpo_core.plumbing.runs.execute_stage` (which skips a current stage,
runs the ``mpo_core`` stage function otherwise and records the outcome) and publishes:

- a progress artifact fed by every :func:`mpo_core.plumbing.progress.track` loop of the stage,
- a markdown summary (status, identity, time, outputs as paths relative to the run folder, row counts) and a
  table of rows per language: never the data itself;
- the stage's results and its outputs as assets (:mod:`tasks.monitoring`).

Prefect's own result caching is off (``NO_CACHE``, no persisted results): reuse has one mechanism, our
manifests and stage markers. Transient failures (I/O, network, out of memory) are retried with
exponential backoff; anything else, bad input or config above all, is not. GPU stages hold a slot of the
``gpu`` global concurrency limit while they run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.settings import get_current_settings
from prefect.tasks import exponential_backoff

from mpo_core.plumbing.artifacts import read_manifest
from mpo_core.plumbing.errors import ConfigError, is_transient_error
from mpo_core.plumbing.progress import progress_listener, round_seconds
from mpo_core.plumbing.runs import RAN, RunFolder, StageOutcome, execute_stage
from mpo_core.plumbing.shards import execute_shard, merged, shard_count, shard_dir, shard_outputs
from mpo_core.plumbing.stage_run import Shard
from mpo_core.plumbing.stage_table import StageSpec, get_stage
from tasks.launch import launcher_for
from tasks.monitoring import (
    artifact_key,
    current_flow_run_id,
    declare_assets,
    library_logs_forwarded,
    publish_stage_results,
)
from tasks.secrets import install_redaction, load_hub_token, redact
from tasks.server import owned_api_url

logger = logging.getLogger(__name__)

GPU_LIMIT = "gpu"
RETRIES = 2
RETRY_BACKOFF_S = 10.0
# Wall-clock limits per stage on the embedded default's scale are far below these; they catch hangs.
TIMEOUT_S = {"cpu": 2 * 3600.0, "gpu": 48 * 3600.0}
PROGRESS_MIN_INTERVAL_S = 2.0


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a fault that can pass (:func:`mpo_core.plumbing.errors.is_transient_error`): never bad input."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classified by class below
        return is_transient_error(err)
    return False


class ProgressReporter:
    """A :mod:`mpo_core.plumbing.progress` listener that keeps one Prefect progress artifact up to date."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._artifact_id = None
        self._last_update = 0.0
        self._last_pct = -1.0
        self._last_desc = ""
        self._failed = False

    def __call__(self, desc: str, done: int, total: int) -> None:
        """``(desc, 0, 0)`` announces a phase (shown at once, at 0 %); otherwise ``done`` of ``total``. A new
        phase or loop shows at once; within a loop, updates come at most every few seconds."""
        starting_phase = total == 0
        pct = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        shown_now = starting_phase or done >= total or desc != self._last_desc
        if self._artifact_id is not None and not shown_now and now - self._last_update < PROGRESS_MIN_INTERVAL_S:
            return
        if self._artifact_id is not None and pct == self._last_pct and desc == self._last_desc:
            return
        description = f"{desc} ..." if starting_phase else f"{desc}: {done}/{total}"
        self._last_update, self._last_pct, self._last_desc = now, pct, desc
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(pct, key=self.key, description=description)
            else:
                update_progress_artifact(self._artifact_id, pct, description=description)
        except Exception as err:  # noqa: BLE001 - a display: an unreachable API must not fail (and retry) the stage
            if not self._failed:
                logger.warning("progress not shown in Prefect: %s: %s", type(err).__name__, err)
            self._failed = True


def _rows_per_language(path: Path) -> dict[str, int]:
    """Rows per language of a Parquet artifact (reads only its language column), {} if it has none."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    column = next((c for c in ("target_lang", "lang") if c in names), None)
    if column is None:
        return {}
    return dict(sorted(Counter(pq.read_table(path, columns=[column]).column(0).to_pylist()).items()))


def output_summary(
    outputs: dict[str, Path], run_dir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per output: name, kind, rows, path relative to the run folder ``run_dir``) and (one row per
    output and language: rows). Relative paths mean the same on every machine that holds the run."""
    listing, per_lang = [], []
    for name, path in outputs.items():
        row: dict[str, Any] = {"output": name, "kind": "folder" if path.is_dir() else path.suffix.lstrip(".")}
        if path.suffix == ".parquet":
            manifest = read_manifest(path)
            row.update(kind=manifest.kind, rows=manifest.rows)
            per_lang += [{"output": name, "lang": k, "rows": v} for k, v in _rows_per_language(path).items()]
        row["path"] = str(path.resolve().relative_to(Path(run_dir).resolve()))
        listing.append(row)
    return listing, per_lang


def _shard_lines(outputs: dict[str, Path]) -> list[str]:
    """Where and how long each shard of a merged output ran (none for an unsharded stage)."""
    first = next((p for p in outputs.values() if p.suffix == ".parquet"), None)
    shards = read_manifest(first).extra.get("shards") if first is not None else None
    if not shards:
        return []
    lines = ["", f"{len(shards)} shards:", "", "| shard | rows | seconds | host | flow run |", "|---|---|---|---|---|"]
    return lines + [f"| {s['index']} | {s['rows']} | {s['seconds']} | {s['host']} | {s['flow_run_id'] or ''} |"
                    for s in shards]


def publish_stage_summary(run: RunFolder, outcome: StageOutcome) -> None:
    """Markdown + table artifacts for one stage outcome (links and counts only)."""
    listing, per_lang = output_summary(outcome.outputs, run.path)
    lines = [
        f"### {outcome.stage} — {outcome.status}",
        "",
        f"- run: `{run.name}` (paths below are relative to its run folder)",
        f"- identity: `{outcome.identity[:16]}`",
        f"- reason: {outcome.reason}",
        f"- seconds: {round_seconds(outcome.seconds)}",
        "",
        "| output | kind | rows | path |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['output']} | {r['kind']} | {r.get('rows', '')} | `{r['path']}` |" for r in listing]
    lines += _shard_lines(outcome.outputs)
    key = artifact_key(run.name, outcome.stage)
    create_markdown_artifact(
        redact("\n".join(lines)), key=f"{key}-summary", description=f"{outcome.stage} outputs"
    )
    if per_lang:
        create_table_artifact(
            per_lang, key=f"{key}-languages", description=f"{outcome.stage}: rows per language"
        )


def _gpu_slot(spec: StageSpec):
    """Hold one slot of the ``gpu`` global concurrency limit for GPU stages.

    Only against a configured server (``PREFECT_API_URL``; ``scripts/deploy.sh`` creates the limit): the
    temporary server of an ``mpo`` command (:func:`tasks.server.owned_server`) has no limits, the pipeline
    runs its stages one at a time anyway, and asking it for a missing limit took 1-2 s per stage.
    """
    if spec.device != "gpu" or not get_current_settings().api.url or owned_api_url():
        return contextlib.nullcontext()
    return concurrency(GPU_LIMIT, occupy=1, strict=False)


@task(
    name="run-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(RETRY_BACKOFF_S),
    retry_jitter_factor=0.2,
    retry_condition_fn=is_transient,
)
def run_stage_task(
    stage: str, run_dir: str, inputs: dict[str, str], force: bool = False, shard: list[int] | None = None
) -> dict[str, str]:
    """Run (or skip, when current) stage ``stage`` of the run in ``run_dir``; return its output paths.

    ``shard=[i, n]`` runs only shard ``i`` of ``n`` (into its shard folder); a stage of several shards
    without ``shard`` merges its finished shards (:mod:`mpo_core.plumbing.shards`)."""
    install_redaction()
    spec = get_stage(stage)
    run = RunFolder(run_dir)
    config = run.load_config()
    if spec.device == "gpu" or spec.name == "translate":
        load_hub_token()
    logger = get_run_logger()
    paths = {k: Path(v) for k, v in inputs.items()}
    if shard is not None:
        return _run_shard(spec, run, config, paths, Shard(*shard), force)
    count = shard_count(spec, config)
    launcher = merged(run, count) if count > 1 else launcher_for(spec)
    reporter = ProgressReporter(artifact_key(run.name, stage, "progress"))
    with library_logs_forwarded(), _gpu_slot(spec), progress_listener(reporter):
        outcome = execute_stage(spec, config, run, paths, force=force, launcher=launcher)
    run.record(stage, flow_run_id=current_flow_run_id())
    logger.info("stage %s %s in %s s (%s)", stage, outcome.status, round_seconds(outcome.seconds), outcome.reason)
    publish_stage_summary(run, outcome)
    try:
        publish_stage_results(run, stage, outcome.outputs, paths, config)
        if outcome.status == RAN:
            declare_assets(run, stage, outcome.outputs, paths)
    except Exception as err:  # noqa: BLE001 - the stage's outputs are whole; a display failure must not undo it
        logger.warning("stage %s: results not published: %s: %s", stage, type(err).__name__, err)
    return {k: str(v) for k, v in outcome.outputs.items()}


def _run_shard(spec: StageSpec, run: RunFolder, config, inputs: dict[str, Path], shard: Shard,
               force: bool) -> dict[str, str]:
    """One shard of a stage, with the stage's progress reporting; its outputs in the shard's folder."""
    if shard.count != shard_count(spec, config):
        raise ConfigError(f"{spec.name}: shard {shard.index} of {shard.count} asked for, the run's config says "
                          f"{shard_count(spec, config)} shards")
    reporter = ProgressReporter(artifact_key(run.name, spec.name, shard.name, "progress"))
    with library_logs_forwarded(), _gpu_slot(spec), progress_listener(reporter):
        outcome = execute_shard(spec, config, run, inputs, shard, current_flow_run_id(), force=force)
    get_run_logger().info("stage %s %s %s in %s s", spec.name, shard.name, "ran" if outcome.ran else "was done",
                          round_seconds(outcome.seconds))
    folder = shard_dir(run, spec, shard)
    return {output.name: str(folder / output.file) for output in shard_outputs(spec)}


def stage_task_for(spec: StageSpec):
    """``run_stage_task`` with the stage's timeout and tags: ``mpo`` and its device (``gpu``/``cpu``, for
    tag-based limits). Prefect asks the server for the limits of each new set of task tags (about a second
    each); the stage is in the task run's name and its flow run's ``stage:`` tag, not in a tag of its own."""
    return run_stage_task.with_options(timeout_seconds=TIMEOUT_S[spec.device], tags=["mpo", spec.device])
