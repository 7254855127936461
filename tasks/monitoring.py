"""What the Prefect UI shows of a run: names and tags, results per stage, the run's front page, lineage.

- Flow runs are named ``<run>/<stage>`` (``default/evaluate``, ``default/pipeline``) and tagged ``mpo``,
  ``run:<run>`` and ``stage:<stage>`` (:func:`flow_run_namer`, :func:`tag_flow_run`), so a run's flow runs
  are found by name or tag.
- Each stage publishes its results as table and markdown artifacts (:func:`publish_stage_results`), keyed
  ``<run>-<stage>-<what>``: evaluate ``-metrics`` (per language: base, trained, delta with intervals) and
  ``-report`` (the report with its plots embedded as data URIs), train ``-curve`` and ``-training``
  (final loss, L1, L2 and gaps, with the curve plotted), filter ``-reasons`` (reason x language),
  reference ``-rg-d`` (RG^d per language and the share of safe dominant pairs).
- The pipeline's ``<run>-run`` artifact is the run's front page (:func:`publish_run_page`): a three-line
  headline, each stage linked to its flow run, the report and the run folder (paths relative to it).
- ``mpo_core`` logs through :mod:`logging`; :func:`library_logs_forwarded` sends those records to the run's
  logs while a stage runs, whatever ``PREFECT_LOGGING_EXTRA_LOGGERS`` says.
- Each stage's outputs are declared as Prefect assets (``mpo://<run>/<stage>/<file>``) materialized from
  its inputs' assets, with row count and content hash (:func:`declare_assets`): the materialization events
  trace the path from prompts to the trained model (Prefect's asset graph where the server draws one).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE

from mpo_core.pairs.filter_report import reason_rows
from mpo_core.plumbing.artifacts import manifest_path, read_artifact, read_manifest
from mpo_core.plumbing.config import PipelineConfig, load_config
from mpo_core.plumbing.errors import MPOError
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.stage_table import STAGES
from mpo_core.results.report import markdown_with_inline_plots, png_data_uri
from mpo_core.results.stage_results import (
    headline,
    metrics_table,
    plot_training_curve,
    read_log_history,
    reference_gaps,
    training_curve,
    training_summary,
)
from tasks.secrets import redact

LIBRARY_LOGGER = "mpo_core"
ASSET_SCHEME = "mpo"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made of ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


# --- logs, names, links -------------------------------------------------------------------------------

@contextlib.contextmanager
def library_logs_forwarded() -> Iterator[None]:
    """Within the block, ``mpo_core`` records at INFO and above reach the current run's Prefect logs."""
    from prefect.logging.handlers import APILogHandler

    library = logging.getLogger(LIBRARY_LOGGER)
    handler = None
    if not any(isinstance(h, APILogHandler) for h in library.handlers):
        handler = APILogHandler()
        library.addHandler(handler)
    level = library.level
    if level == logging.NOTSET or level > logging.INFO:
        library.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.setLevel(level)
        if handler is not None:
            library.removeHandler(handler)


def run_tags(run_name: str, stage: str) -> list[str]:
    return ["mpo", f"run:{run_name}", f"stage:{stage}"]


def flow_run_namer(stage: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable for a flow taking ``run``/``config``/``overrides``: ``<run>/<stage>``,
    the run's name read from its folder or its recipe (``<stage>`` alone if neither can be read);
    ``<run>/<stage>/shard-<i>-of-<n>`` for a flow run of one shard (``shard=[i, n]``)."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        shard = parameters.get("shard")
        suffix = f"/shard-{shard[0]}-of-{shard[1]}" if shard else ""
        try:
            if parameters.get("run"):
                return f"{Path(parameters['run']).name}/{stage}{suffix}"
            if parameters.get("config"):
                return f"{load_config(parameters['config'], parameters.get('overrides')).run.name}/{stage}{suffix}"
        except MPOError:
            pass  # the flow itself reports a bad recipe, with the file and key
        return stage + suffix

    return name


def tag_flow_run(run_name: str, stage: str) -> None:
    """Add the tags of :func:`run_tags` to the current flow run (they depend on the run, known only now)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if flow_run_id is None:
        return
    tags = sorted(set(flow_run.get_tags()) | set(run_tags(run_name, stage)))
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, tags=tags)


def ui_base_url() -> str | None:
    """The Prefect UI's address when a server is configured (``PREFECT_UI_URL``, else the API's), or None."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.ui_url:
        return str(settings.ui_url).rstrip("/")
    if settings.api.url:
        return str(settings.api.url).removesuffix("/").removesuffix("/api")
    return None


def flow_run_url(flow_run_id: Any) -> str | None:
    """The flow run's page in the UI, or None when no server is configured (never ``None/...``)."""
    base = ui_base_url()
    return f"{base}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


def _ui_link(path: str) -> str:
    """A link to a page of the UI: absolute when the UI's address is known, else relative to the UI."""
    return f"{ui_base_url() or ''}{path}"


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


# --- results per stage --------------------------------------------------------------------------------

def _publish_evaluate(key: str, run: RunFolder, outputs: dict[str, Path], inputs: dict[str, Path],
                      config: PipelineConfig) -> None:

    rows = read_artifact(outputs["eval"], "eval")
    create_table_artifact(metrics_table(rows), key=f"{key}-metrics",
                          description="Per language: base and trained with 95 % intervals, paired delta, RG^d")
    lines = [f"- {line}" for line in headline(rows, config.run.dominant_lang)]
    report = markdown_with_inline_plots(outputs["report"])
    create_markdown_artifact("\n".join(["## Headline", "", *lines, "", report]), key=f"{key}-report",
                             description="Evaluation report (plots embedded)")


def _publish_train(key: str, run: RunFolder, outputs: dict[str, Path], inputs: dict[str, Path],
                   config: PipelineConfig) -> None:
    from mpo_core.training.checkpoints import LOG_HISTORY

    curve = training_curve(read_log_history(Path(outputs["checkpoint"]) / LOG_HISTORY))
    if not curve:
        return
    create_table_artifact(curve, key=f"{key}-curve", description="Training curve: one row per logged step")
    summary = training_summary(curve)
    lines = [f"## Training ({config.train.loss}, {summary.get('step')} steps)", "",
             "| final | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary.items() if name != "step"]
    plot = plot_training_curve(curve)
    if plot is not None:
        lines += ["", f"![training curve]({png_data_uri(plot)})"]
    create_markdown_artifact("\n".join(lines), key=f"{key}-training", description="Final L1, L2, gaps; curve")


def _publish_filter(key: str, run: RunFolder, outputs: dict[str, Path], inputs: dict[str, Path],
                    config: PipelineConfig) -> None:

    report = read_artifact(Path(outputs["filter_report"]).with_suffix(".parquet"), "filter_report")
    create_table_artifact(reason_rows(report), key=f"{key}-reasons",
                          description="Pairs per target language: kept, dropped, each drop reason and repair")


def _publish_reference(key: str, run: RunFolder, outputs: dict[str, Path], inputs: dict[str, Path],
                       config: PipelineConfig) -> None:

    rows = reference_gaps(read_manifest(outputs["reference"]).extra.get("premise", {}))
    share = rows[-1]["safe_share"] if rows else None
    create_table_artifact(rows, key=f"{key}-rg-d",
                          description=f"RG^d of the frozen reference per target language; safe dominant "
                                      f"pairs (RG^d > 0): {share}")


RESULT_PUBLISHERS: dict[str, Callable[..., None]] = {
    "evaluate": _publish_evaluate,
    "train": _publish_train,
    "filter": _publish_filter,
    "reference": _publish_reference,
}


def publish_stage_results(run: RunFolder, stage: str, outputs: dict[str, Path], inputs: dict[str, Path],
                          config: PipelineConfig) -> None:
    """The stage's results as artifacts (stages without a publisher have their summary only)."""
    publisher = RESULT_PUBLISHERS.get(stage)
    if publisher is not None and outputs:
        publisher(artifact_key(run.name, stage), run, outputs, inputs, config)


# --- the run's front page -----------------------------------------------------------------------------

def _relative(run: RunFolder, path: str | Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(run.path.resolve()))
    except ValueError:
        return str(path)


def publish_run_page(run: RunFolder, config: PipelineConfig) -> list[str]:
    """The ``<run>-run`` markdown artifact: headline, stages with links to their flow runs, the report.
    Returns the headline's lines."""

    state = run.read_state()
    stages = state["stages"]
    evaluate = stages.get("evaluate", {})
    eval_path = evaluate.get("outputs", {}).get("eval")
    lines = [f"# mpo run `{run.name}`", ""]
    summary = ["no evaluation in this run yet"]
    if eval_path and Path(eval_path).exists():
        summary = headline(read_artifact(eval_path, "eval"), config.run.dominant_lang)
    lines += [f"- {line}" for line in summary]
    report_key = artifact_key(run.name, "evaluate", "report")
    report_md = evaluate.get("outputs", {}).get("report")
    report_file = _relative(run, Path(report_md).with_suffix(".html")) if report_md else "(not written yet)"
    report_line = (f"**Report**: [evaluation report with plots]({_ui_link(f'/artifacts/key/{report_key}')}); "
                   f"in the run folder `{report_file}` (`mpo serve --run {run.path}` serves the folder)")
    facts = (f"Run folder `{run.path}` on `{socket.gethostname()}` · model `{config.model.name_or_path}` · "
             f"loss `{config.train.loss}` · {config.run.dominant_lang} -> {', '.join(config.run.target_langs)}")
    lines += [
        "",
        report_line,
        "",
        facts,
        "",
        "| stage | status | seconds | reason | flow run |",
        "|---|---|---|---|---|",
    ]
    for spec in STAGES:
        entry = stages.get(spec.name, {})
        flow_run_id = entry.get("flow_run_id")
        link = f"[{run.name}/{spec.name}]({_ui_link(f'/runs/flow-run/{flow_run_id}')})" if flow_run_id else "–"
        seconds = entry.get("seconds")
        lines.append(f"| {spec.name} | {entry.get('status', '–')} | {'' if seconds is None else seconds} | "
                     f"{entry.get('reason', '')} | {link} |")
    create_markdown_artifact(redact("\n".join(lines)), key=artifact_key(run.name, "run"),
                             description=f"mpo run {run.name}: headline, stages, report")
    return summary


# --- lineage ------------------------------------------------------------------------------------------

def asset_key(run: RunFolder, path: str | Path) -> str:
    """``mpo://<run>/<path relative to the run folder>``: the same on every machine that runs the stage."""
    return f"{ASSET_SCHEME}://{run.name}/{_relative(run, path)}"


def _asset_metadata(path: Path) -> dict[str, Any]:
    if not manifest_path(path).exists():
        return {}
    manifest = read_manifest(path)
    return {"kind": manifest.kind, "rows": manifest.rows, "content_hash": manifest.content_hash,
            "identity": manifest.config_hash}


def _add_metadata(metadata: dict[str, dict[str, Any]]) -> None:
    for key, values in metadata.items():
        add_asset_metadata(key, values)


def declare_assets(run: RunFolder, stage: str, outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Materialize the stage's outputs as assets, upstream of them its inputs' assets (lineage)."""
    if not outputs:
        return
    assets = [
        Asset(key=asset_key(run, path),
              properties=AssetProperties(name=f"{run.name} {stage}: {name}", description=_describe(path)))
        for name, path in outputs.items()
    ]
    upstream = [Asset(key=asset_key(run, path)) for path in inputs.values()
                if Path(path).resolve().is_relative_to(run.path.resolve())]
    materializing = materialize(*assets, by="mpo", name=f"{stage}-assets", cache_policy=NO_CACHE,
                                persist_result=False)(_add_metadata)
    materializing.with_options(asset_deps=upstream)(
        {asset_key(run, path): _asset_metadata(path) for path in outputs.values()}
    )


def _describe(path: Path) -> str:
    meta = _asset_metadata(path)
    if not meta:
        return Path(path).name
    return f"{meta['kind']}, {meta['rows']} rows, sha256 {meta['content_hash'][:16]}"


# --- flow runs an earlier, killed process left behind -------------------------------------------------

def crash_orphaned_flow_runs(run_name: str) -> list[str]:
    """Mark Crashed the flow runs of run ``run_name`` (tag ``run:<name>``) that an earlier process left
    RUNNING or PENDING when it was killed; returns their names. Safe only while this process holds the run's
    lock (:func:`mpo_core.plumbing.runs.run_lock`): no other live process is writing the run then. The
    current flow run and its ancestors are left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    ours = {flow_run.get_id(), flow_run.get_parent_flow_run_id(), flow_run.get_root_flow_run_id()} - {None}
    crashed = []
    with get_client(sync_client=True) as client:
        left = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"run:{run_name}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
        ))
        for orphan in left:
            if str(orphan.id) in ours:
                continue
            client.set_flow_run_state(orphan.id, Crashed(
                message=f"left {orphan.state_name} by an mpo process that was killed; found by a later run of {run_name}"
            ), force=True)
            crashed.append(orphan.name)
    return crashed
