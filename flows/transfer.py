"""The transfer sweep: pipeline runs over training loss x target label noise x seed, sharing common stages.

Reads like the plan of :mod:`mpo_core.plumbing.sweep`: the shared run's stages before ``train`` once; once, the
starting models (``base``, and ``raw`` where align ran) on the evaluation sets; one pairs run per noise level
and seed (pair and filter rerun, the rest hard-linked and skipped); then every cell as a pipeline subflow on
hard-linked copies of its pairs run, evaluating its trained model. Cells run in ``workers`` lanes side by
side (:func:`mpo_core.plumbing.sweep.split_lanes`); with more than one lane every stage of a cell runs in a
child process with its share of the CPU threads, so the lanes share no torch state.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.pipeline import mpo_pipeline
from flows.stage_flows import STAGE_FLOWS
from mpo_core.plumbing.config import CONFIGS_DIR
from mpo_core.plumbing.runs import RunFolder, open_run
from mpo_core.plumbing.sweep import (
    DEFAULT_METHODS,
    DEFAULT_NOISE,
    DEFAULT_SEEDS,
    SHARED_RUN,
    Cell,
    link_stages,
    noise_free_stages,
    prune_resume_checkpoints,
    run_overrides,
    shared_stages,
    split_lanes,
    sweep_cells,
)
from mpo_core.results.transfer import evaluate_starting_models as evaluate
from tasks.launch import in_child_process, stages_launched_by

CELL_EVAL_ROLES = "evaluate.roles=[trained]"  # the starting models are evaluated once, not per cell


def run_shared_stages(folder: RunFolder, stages: list[str]) -> None:
    """Each stage flow in turn on the run's own outputs; current stages are skipped."""
    for stage in stages:
        STAGE_FLOWS[stage](run=str(folder.path))


@task(name="link-shared-stages", cache_policy=NO_CACHE, persist_result=False)
def link_shared(source: str, target: str, stages: list[str]) -> list[str]:
    return link_stages(RunFolder(source), RunFolder(target), stages)


@task(name="evaluate-starting-models", cache_policy=NO_CACHE, persist_result=False)
def evaluate_starting_models(shared_run: str, out_dir: str) -> str:
    return str(evaluate(RunFolder(shared_run), Path(out_dir)))


class CellProgress:
    """A Prefect progress artifact (cells finished of all cells) that lanes in several threads update."""

    def __init__(self, sweep_name: str, total: int) -> None:
        self.total, self.done, self._lock = total, 0, threading.Lock()
        self._id = create_progress_artifact(0.0, description=f"transfer sweep {sweep_name}: cells finished")

    def cell_done(self, name: str) -> None:
        with self._lock:
            self.done += 1
            update_progress_artifact(self._id, 100.0 * self.done / self.total)
            get_run_logger().info("cell %s done (%d of %d)", name, self.done, self.total)


def run_cell(cell: Cell, sweep_dir: str, config: str, overrides: list[str], pairs_run: str,
             method_overrides: dict[str, list[str]] | None = None) -> str:
    """One cell: a pipeline run on hard-linked copies of its pairs run; returns its eval artifact's path."""
    logger = get_run_logger()
    cell_overrides = (overrides + cell.overrides(method_overrides) + [CELL_EVAL_ROLES]
                      + run_overrides(sweep_dir, cell.name))
    folder, _ = open_run(config=config, overrides=cell_overrides)
    linked = link_shared(pairs_run, str(folder.path), shared_stages(folder.load_config()))
    logger.info("cell %s: shared stages %s hard-linked from %s", cell.name, linked, Path(pairs_run).name)
    outputs = mpo_pipeline(run=str(folder.path))
    freed = prune_resume_checkpoints(folder)
    logger.info("cell %s: resume checkpoints removed (%.1f GB)", cell.name, freed / 1e9)
    return outputs["eval"]


@task(name="cell-lane", task_run_name="lane-{lane}", cache_policy=NO_CACHE, persist_result=False)
def run_lane(lane: int, cells: list[Cell], sweep_dir: str, config: str, overrides: list[str],
             pairs_runs: dict[str, str], child_threads: int | None, progress: CellProgress,
             method_overrides: dict[str, list[str]] | None = None) -> dict[str, str]:
    """The lane's cells one after another; with ``child_threads``, every stage in a child process with that
    many torch threads. Returns ``{cell name: eval path}``."""
    launch = stages_launched_by(in_child_process(child_threads)) if child_threads else contextlib.nullcontext()
    results = {}
    with launch:
        for cell in cells:
            results[cell.name] = run_cell(cell, sweep_dir, config, overrides, pairs_runs[cell.pairs_run],
                                          method_overrides)
            progress.cell_done(cell.name)
    return results


@flow(name="mpo-transfer-sweep", persist_result=False)
def transfer_sweep(
    sweep_dir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    noise_levels: list[float] | None = None,
    seeds: list[int] | None = None,
    workers: int = 1,
    method_overrides: dict[str, list[str]] | None = None,
) -> dict[str, str]:
    """Run the sweep into ``sweep_dir`` and return ``{cell name: eval path, "starting": eval path}``.

    ``method_overrides``: ``key=value`` overrides per training loss, applied after ``overrides`` (default
    :data:`~mpo_core.plumbing.sweep.METHOD_OVERRIDES`: each baseline at its own beta).

    ``workers``: lanes of cells run side by side (each stage of a cell then in its own process with
    ``cpu_count // workers`` torch threads); 1 runs the cells one after another in this process."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    logger = get_run_logger()
    config = config or str(CONFIGS_DIR / "default.yaml")
    overrides = list(overrides or [])
    cells = sweep_cells(methods or DEFAULT_METHODS, noise_levels or DEFAULT_NOISE, seeds or DEFAULT_SEEDS)

    shared, shared_cfg = open_run(config=config, overrides=overrides + run_overrides(sweep_dir, SHARED_RUN))
    stages = shared_stages(shared_cfg)
    run_shared_stages(shared, stages)
    starting = evaluate_starting_models(str(shared.path), str(Path(sweep_dir) / "transfer" / "starting"))

    pairs_runs = {SHARED_RUN: str(shared.path)}
    for cell in cells:
        if cell.pairs_run in pairs_runs:
            continue
        folder, _ = open_run(
            config=config, overrides=overrides + cell.pair_overrides() + run_overrides(sweep_dir, cell.pairs_run)
        )
        link_shared(str(shared.path), str(folder.path), noise_free_stages(stages))
        run_shared_stages(folder, stages)
        pairs_runs[cell.pairs_run] = str(folder.path)

    lanes = split_lanes(cells, workers)
    child_threads = max(1, (os.cpu_count() or 1) // len(lanes)) if len(lanes) > 1 else None
    logger.info("%d cells in %d lane(s)%s", len(cells), len(lanes),
                f", every stage in a child process with {child_threads} thread(s)" if child_threads else "")
    progress = CellProgress(Path(sweep_dir).name, len(cells))
    arguments = {"sweep_dir": sweep_dir, "config": config, "overrides": overrides, "pairs_runs": pairs_runs,
                 "child_threads": child_threads, "progress": progress, "method_overrides": method_overrides}
    if len(lanes) == 1:
        lane_results = [run_lane(0, lanes[0], **arguments)]
    else:
        futures = [run_lane.submit(i, lane, **arguments) for i, lane in enumerate(lanes)]
        wait(futures)
        lane_results = [future.result() for future in futures]
    results = {"starting": starting}
    for lane in lane_results:
        results.update(lane)
    return results
