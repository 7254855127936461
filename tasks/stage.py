"""One generic Prefect task that runs any stage of the table, plus the reporting Prefect shows for it.

The task reads the run's config, calls :func:`mpo_core.runs.execute_stage` (which skips a current stage,
runs the ``mpo_core`` stage function otherwise and records the outcome) and publishes:

- a progress artifact fed by every :func:`mpo_core.progress.track` loop of the stage,
- a markdown summary (status, identity, time, outputs as ``file://`` links, row counts) and a table of rows
  per language: never the data itself.

Prefect's own result caching is off (``NO_CACHE``, no persisted results): reuse has one mechanism, our
manifests and stage markers. Transient failures are retried with exponential backoff; errors in the input
or config are not. GPU stages hold a slot of the ``gpu`` global concurrency limit while they run.
"""

from __future__ import annotations

import contextlib
import re
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

from mpo_core.artifacts import read_manifest
from mpo_core.errors import MPOError
from mpo_core.progress import progress_listener
from mpo_core.runs import RunFolder, StageOutcome, execute_stage
from mpo_core.stages import StageSpec, get_stage
from tasks.launch import launcher_for
from tasks.secrets import install_redaction, load_hub_token, redact

GPU_LIMIT = "gpu"
RETRIES = 2
RETRY_BACKOFF_S = 10.0
# Wall-clock limits per stage on the embedded default's scale are far below these; they catch hangs.
TIMEOUT_S = {"cpu": 2 * 3600.0, "gpu": 48 * 3600.0}
PROGRESS_MIN_INTERVAL_S = 2.0


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made of ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is one of ours (bad config, input or artifact: retrying cannot help)."""
    try:
        state.result()
    except MPOError:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, OOM, hub hiccup) may pass on retry
        return True
    return True


class ProgressReporter:
    """A :mod:`mpo_core.progress` listener that keeps one Prefect progress artifact up to date."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._artifact_id = None
        self._last_update = 0.0
        self._last_pct = -1.0

    def __call__(self, desc: str, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        final = done >= total
        if self._artifact_id is not None and not final and now - self._last_update < PROGRESS_MIN_INTERVAL_S:
            return
        if pct == self._last_pct and self._artifact_id is not None:
            return
        description = f"{desc}: {done}/{total}"
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(pct, key=self.key, description=description)
        else:
            update_progress_artifact(self._artifact_id, pct, description=description)
        self._last_update, self._last_pct = now, pct


def _rows_per_language(path: Path) -> dict[str, int]:
    """Rows per language of a Parquet artifact (reads only its language column), {} if it has none."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    column = next((c for c in ("target_lang", "lang") if c in names), None)
    if column is None:
        return {}
    return dict(sorted(Counter(pq.read_table(path, columns=[column]).column(0).to_pylist()).items()))


def output_summary(outputs: dict[str, Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per output: name, kind, rows, link) and (one row per output and language: rows)."""
    listing, per_lang = [], []
    for name, path in outputs.items():
        row: dict[str, Any] = {"output": name, "kind": "folder" if path.is_dir() else path.suffix.lstrip(".")}
        if path.suffix == ".parquet":
            manifest = read_manifest(path)
            row.update(kind=manifest.kind, rows=manifest.rows)
            per_lang += [{"output": name, "lang": k, "rows": v} for k, v in _rows_per_language(path).items()]
        row["link"] = path.resolve().as_uri()
        listing.append(row)
    return listing, per_lang


def premise_lines(outputs: dict[str, Path]) -> list[str]:
    """Markdown lines of MPO's premise (mean RG^d, share RG^d > 0 per target language) where an output's
    manifest records it (the reference stage), else none."""
    for path in outputs.values():
        premise = read_manifest(path).extra.get("premise") if path.suffix == ".parquet" else None
        if premise:
            lines = ["", "MPO premise (reference RG^d on the dominant side):", "",
                     "| target lang | pairs | mean RG^d | share RG^d > 0 |", "|---|---|---|---|"]
            return lines + [f"| {lang} | {s['n']} | {s['mean_reward_gap']:+.3f} | {s['safe_share']:.2f} |"
                            for lang, s in premise.items()]
    return []


def publish_stage_summary(run: RunFolder, outcome: StageOutcome) -> None:
    """Markdown + table artifacts for one stage outcome (links and counts only)."""
    listing, per_lang = output_summary(outcome.outputs)
    lines = [
        f"### {outcome.stage} — {outcome.status}",
        "",
        f"- run: `{run.name}` (`{run.path.resolve()}`)",
        f"- identity: `{outcome.identity[:16]}`",
        f"- reason: {outcome.reason}",
        f"- seconds: {outcome.seconds:.1f}",
        "",
        "| output | kind | rows | file |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['output']} | {r['kind']} | {r.get('rows', '')} | [{r['link']}]({r['link']}) |" for r in listing
    ]
    lines += premise_lines(outcome.outputs)
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

    Only against a configured server (``PREFECT_API_URL``; ``scripts/deploy.sh`` creates the limit): a
    temporary local server has no limits, and the pipeline runs its stages one at a time anyway.
    """
    if spec.device != "gpu" or not get_current_settings().api.url:
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
def run_stage_task(stage: str, run_dir: str, inputs: dict[str, str], force: bool = False) -> dict[str, str]:
    """Run (or skip, when current) stage ``stage`` of the run in ``run_dir``; return its output paths."""
    install_redaction()
    spec = get_stage(stage)
    run = RunFolder(run_dir)
    config = run.load_config()
    if spec.device == "gpu" or spec.name == "translate":
        load_hub_token()
    logger = get_run_logger()
    with _gpu_slot(spec), progress_listener(ProgressReporter(artifact_key(run.name, stage, "progress"))):
        outcome = execute_stage(
            spec, config, run, {k: Path(v) for k, v in inputs.items()}, force=force, runner=launcher_for(spec)
        )
    logger.info("stage %s %s in %.1f s (%s)", stage, outcome.status, outcome.seconds, outcome.reason)
    publish_stage_summary(run, outcome)
    return {k: str(v) for k, v in outcome.outputs.items()}


def stage_task_for(spec: StageSpec):
    """``run_stage_task`` with the stage's timeout and tags (``gpu`` for GPU stages, for tag-based limits)."""
    return run_stage_task.with_options(
        timeout_seconds=TIMEOUT_S[spec.device], tags=["mpo", f"mpo-{spec.name}", spec.device]
    )
