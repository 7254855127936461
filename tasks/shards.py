"""A sharded stage's fan-out: one flow run per shard that is not done yet, on the gpu pool through the stage's
deployment (all at once; the pool's concurrency limit and its workers decide how many run together) or in
this process one after another; then every shard's end is awaited and a failed one is named.

The shard flow runs are children of the calling flow run, named ``<run>/<stage>/shard-<i>-of-<n>``
(:func:`tasks.monitoring.flow_run_namer`). What the shards compute and how they merge:
:mod:`mpo_core.plumbing.shards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import MPOError
from mpo_core.plumbing.runs import FAILED, RunFolder
from mpo_core.plumbing.shards import Shard, pending_shards, shard_count
from mpo_core.plumbing.stage_table import StageSpec

POLL_S = 2.0


def run_shards(
    spec: StageSpec,
    run: RunFolder,
    config: PipelineConfig,
    inputs: dict[str, Path],
    *,
    stage_flow: Callable[..., Any],
    deployment: str | None = None,
    force: bool = False,
) -> None:
    """Run every shard of ``spec`` that is not current (all of them with ``force``); raise an
    :class:`MPOError` naming each shard that failed (the others stay done for the rerun)."""
    count = shard_count(spec, config)
    shards = [Shard(i, count) for i in range(count)] if force else pending_shards(spec, config, run, inputs)
    logger = get_run_logger()
    logger.info("stage %s: %d of %d shards to run%s", spec.name, len(shards), count,
                f" on deployment {deployment}" if deployment else " in this process")
    base = {"run": str(run.path.resolve()), "inputs": {k: str(v) for k, v in inputs.items()}, "force": force}
    if deployment is not None:
        failed = _on_deployment(deployment, shards, base)
    else:
        failed = {}
        for shard in shards:
            state = stage_flow(**base, shard=[shard.index, count], return_state=True)
            if not state.is_completed():
                failed[shard.index] = f"{state.name}: {state.message}"
    if failed:
        detail = "; ".join(f"shard {i} of {count}: {why}" for i, why in sorted(failed.items()))
        error = f"stage {spec.name} failed in {len(failed)} of {count} shards ({detail}); the rerun redoes only those"
        run.record(spec.name, status=FAILED, error=error[:2000])
        raise MPOError(error)


def _on_deployment(deployment: str, shards: list[Shard], base: dict[str, Any]) -> dict[int, str]:
    """Start a flow run of ``deployment`` per shard, wait for all of them; ``{index: why}`` of those that
    did not complete."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    children = {
        shard.index: run_deployment(name=deployment, parameters={**base, "shard": [shard.index, shard.count]},
                                    as_subflow=True, timeout=0)
        for shard in shards
    }
    failed: dict[int, str] = {}
    with get_client(sync_client=True) as client:
        waiting = dict(children)
        while waiting:
            for index, child in list(waiting.items()):
                state = client.read_flow_run(child.id).state
                if state is not None and state.is_final():
                    del waiting[index]
                    if not state.is_completed():
                        failed[index] = f"flow run {child.name} ended {state.name}: {state.message}"
            if waiting:
                time.sleep(POLL_S)
    return failed
