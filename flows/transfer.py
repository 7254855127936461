"""The transfer sweep: pipeline runs over training loss x target label noise x seed, sharing common stages.

Reads like the plan of :mod:`mpo_core.plumbing.sweep`: the shared run's stages before ``train`` once; one pairs run
per noise level and seed (pair and filter rerun, the rest hard-linked and skipped); then every cell as a
pipeline subflow on hard-linked copies of its pairs run, evaluating its trained model; and once, the
starting models (``base``, and ``raw`` where align ran) on the same evaluation sets.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import mpo_pipeline
from flows.stage_flows import STAGE_FLOWS
from mpo_core.plumbing.config import CONFIGS_DIR
from mpo_core.plumbing.runs import RunFolder, open_run
from mpo_core.plumbing.sweep import (
    DEFAULT_METHODS,
    DEFAULT_NOISE,
    DEFAULT_SEEDS,
    SHARED_RUN,
    link_stages,
    noise_free_stages,
    prune_resume_checkpoints,
    run_overrides,
    shared_stages,
    sweep_cells,
)

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
    from mpo_core.results.transfer import evaluate_starting_models as evaluate

    return str(evaluate(RunFolder(shared_run), Path(out_dir)))


@flow(name="mpo-transfer-sweep", persist_result=False)
def transfer_sweep(
    sweep_dir: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    noise_levels: list[float] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, str]:
    """Run the sweep into ``sweep_dir`` and return ``{cell name: eval path, "starting": eval path}``."""
    logger = get_run_logger()
    config = config or str(CONFIGS_DIR / "default.yaml")
    overrides = list(overrides or [])
    cells = sweep_cells(methods or DEFAULT_METHODS, noise_levels or DEFAULT_NOISE, seeds or DEFAULT_SEEDS)

    shared, shared_cfg = open_run(config=config, overrides=overrides + run_overrides(sweep_dir, SHARED_RUN))
    stages = shared_stages(shared_cfg)
    run_shared_stages(shared, stages)
    starting = evaluate_starting_models(str(shared.path), str(Path(sweep_dir) / "transfer" / "starting"))

    pairs_runs: dict[str, RunFolder] = {SHARED_RUN: shared}
    for cell in cells:
        if cell.pairs_run in pairs_runs:
            continue
        folder, _ = open_run(
            config=config, overrides=overrides + cell.pair_overrides() + run_overrides(sweep_dir, cell.pairs_run)
        )
        link_shared(str(shared.path), str(folder.path), noise_free_stages(stages))
        run_shared_stages(folder, stages)
        pairs_runs[cell.pairs_run] = folder

    results = {"starting": starting}
    for cell in cells:
        cell_overrides = overrides + cell.overrides() + [CELL_EVAL_ROLES] + run_overrides(sweep_dir, cell.name)
        folder, _ = open_run(config=config, overrides=cell_overrides)
        linked = link_shared(str(pairs_runs[cell.pairs_run].path), str(folder.path), stages)
        logger.info("cell %s: shared stages %s hard-linked from %s", cell.name, linked, cell.pairs_run)
        outputs = mpo_pipeline(run=str(folder.path))
        results[cell.name] = outputs["eval"]
        freed = prune_resume_checkpoints(folder)
        logger.info("cell %s done; its resume checkpoints removed (%.1f GB)", cell.name, freed / 1e9)
    return results
