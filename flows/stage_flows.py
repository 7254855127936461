"""One Prefect flow per stage, each runnable and deployable alone.

Every stage flow takes the run (an existing run folder, or a recipe that creates/refreshes one), optional
``key=value`` overrides and optional input artifact paths, and returns ``{artifact name: path}``. Without
``inputs`` it reads the outputs the run's earlier stages left (their ``stage.json`` markers). A stage flow
reruns its stage only when its identity changed, unless ``force`` is set.

Deployment entry points: ``flows/stage_flows.py:mpo_ingest``, ``...:mpo_translate``, ... ``...:mpo_evaluate``; the
attribute names equal the flow names (``mpo-ingest``, ...), so ``prefect deploy --name mpo-ingest/cpu`` and
``run_deployment("mpo-ingest/cpu")`` name the same deployment.

A stage of several shards (``translate.shards``, ``generate.shards``, ``label.shards``, ``evaluate.shards``)
runs each shard that is not done as a child
flow run (``shard=[i, n]``): on the deployment ``mpo-<stage>/<shard_deployment>`` when one is named (the
pipeline names its GPU deployment), else in this process in turn; then it merges them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_flow_run

from mpo_core.plumbing.runs import open_run, resolve_inputs
from mpo_core.plumbing.shards import shard_count
from mpo_core.plumbing.stage_table import STAGES, StageSpec
from tasks.monitoring import crash_orphaned_flow_runs, flow_run_namer, tag_flow_run
from tasks.shards import run_shards
from tasks.stage_task import stage_task_for


def stage_flow_name(stage: str) -> str:
    """The Prefect flow name of a stage (``mpo-<stage>``), also the first half of its deployment names."""
    return f"mpo-{stage}"


def _make_stage_flow(spec: StageSpec):
    def stage_flow(
        run: str | None = None,
        config: str | None = None,
        overrides: list[str] | None = None,
        inputs: dict[str, str] | None = None,
        force: bool = False,
        shard: list[int] | None = None,
        shard_deployment: str | None = None,
    ) -> dict[str, str]:
        folder, cfg = open_run(run, config, overrides)
        tag_flow_run(folder.name, spec.name)
        if prefect_flow_run.get_parent_flow_run_id() is None:  # run alone (mpo stage), not in a pipeline
            for orphan in crash_orphaned_flow_runs(folder.name):
                get_run_logger().warning("flow run %s was left running by a killed mpo process: marked Crashed",
                                         orphan)
        available = folder.available_outputs() if inputs is None else inputs
        resolved = resolve_inputs(spec, cfg, available)
        if shard is None and shard_count(spec, cfg) > 1:
            deployment = f"{stage_flow_name(spec.name)}/{shard_deployment}" if shard_deployment else None
            run_shards(spec, folder, cfg, resolved, stage_flow=STAGE_FLOWS[spec.name], deployment=deployment,
                       force=force)
        return stage_task_for(spec)(
            spec.name, str(folder.path.resolve()), {k: str(v) for k, v in resolved.items()}, force, shard
        )

    stage_flow.__name__ = f"mpo_{spec.name}"
    stage_flow.__doc__ = (
        f"Stage {spec.name} ({spec.device}): reads {', '.join(spec.inputs) or 'the prompt source'}, "
        f"writes {', '.join(spec.outputs)}."
    )
    return flow(
        stage_flow,
        name=stage_flow_name(spec.name),
        flow_run_name=flow_run_namer(spec.name),
        persist_result=False,
        validate_parameters=True,
    )


STAGE_FLOWS = {spec.name: _make_stage_flow(spec) for spec in STAGES}

mpo_ingest = STAGE_FLOWS["ingest"]
mpo_translate = STAGE_FLOWS["translate"]
mpo_align = STAGE_FLOWS["align"]
mpo_generate = STAGE_FLOWS["generate"]
mpo_label = STAGE_FLOWS["label"]
mpo_pair = STAGE_FLOWS["pair"]
mpo_filter = STAGE_FLOWS["filter"]
mpo_reference = STAGE_FLOWS["reference"]
mpo_train = STAGE_FLOWS["train"]
mpo_evaluate = STAGE_FLOWS["evaluate"]
