"""The whole MPO pipeline as one Prefect flow that reads like the pipeline diagram.

Each stage is first checked against its marker (:func:`mpo_core.plumbing.runs.check_stage`): a current stage is
recorded as skipped and costs no Prefect run at all; a stage that must run becomes a subflow run of its
stage flow, in this process, or, for GPU stages with ``gpu_deployments=True``, a flow run of its deployment
``mpo-<stage>/<gpu_deployment>`` on the ``gpu`` work pool (``run_deployment``, shown as a subflow). A stage
of several shards runs its stage flow here, which sends each shard to that deployment and merges them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.stage_flows import STAGE_FLOWS, stage_flow_name
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import MPOError
from mpo_core.plumbing.runs import (
    FAILED,
    PAIR_SOURCE_BYPASSES,
    RunFolder,
    bypass_stage,
    check_stage,
    open_run,
    pair_source,
    record_skip,
    resolve_inputs,
    run_lock,
)
from mpo_core.plumbing.shards import shard_count
from mpo_core.plumbing.stage_table import STAGES, align_enabled, get_stage
from tasks.monitoring import (
    crash_orphaned_flow_runs,
    flow_run_namer,
    flow_run_url,
    publish_run_page,
    tag_flow_run,
)

Outputs = dict[str, str]


class StageDispatch:
    """Runs one stage of the pipeline given its upstream outputs: skipped when current, else its stage flow
    in this process or its GPU deployment on the ``gpu`` pool."""

    def __init__(self, run: RunFolder, config: PipelineConfig, gpu_deployments: bool, gpu_deployment: str):
        self.run, self.config = run, config
        self.gpu_deployments, self.gpu_deployment = gpu_deployments, gpu_deployment

    def __call__(self, stage: str, *upstream: Outputs) -> Outputs:
        spec = get_stage(stage)
        available = {k: Path(v) for outputs in upstream for k, v in outputs.items()}
        inputs = resolve_inputs(spec, self.config, available)
        check = check_stage(spec, self.config, self.run, inputs)
        if check.current:
            get_run_logger().info("stage %s skipped: %s", stage, check.reason)
            return {k: str(v) for k, v in record_skip(spec, self.run, check).outputs.items()}
        parameters = {"run": str(self.run.path.resolve()), "inputs": {k: str(v) for k, v in inputs.items()}}
        on_gpu_pool = spec.device == "gpu" and self.gpu_deployments
        if shard_count(spec, self.config) > 1:
            # every stage that shards runs a model: with gpu deployments its shards go to the gpu pool; the
            # stage flow itself runs here, so that waiting for them holds no slot of the pool
            shard_deployment = self.gpu_deployment if self.gpu_deployments else None
            return STAGE_FLOWS[stage](**parameters, shard_deployment=shard_deployment)
        if on_gpu_pool:
            return self._via_deployment(stage, parameters)
        return STAGE_FLOWS[stage](**parameters)

    def _via_deployment(self, stage: str, parameters: dict) -> Outputs:
        """Run the stage as a flow run of its GPU deployment and read its outputs from the run folder."""
        name = f"{stage_flow_name(stage)}/{self.gpu_deployment}"
        child = run_deployment(name=name, parameters=parameters, as_subflow=True, timeout=None)
        if child.state is None or not child.state.is_completed():
            self._record_remote_failure(stage, name, child)
        marker = self.run.read_marker(stage) or {}
        return {k: str(self.run.path / v) for k, v in marker.get("outputs", {}).items()}

    def _record_remote_failure(self, stage: str, deployment: str, child) -> None:
        """Mark the stage failed in ``state.json`` (the worker may have died, or not seen the run folder,
        before it could) and fail the pipeline with an error that names the stage."""
        state = child.state
        detail = f"{state.name}: {state.message}" if state is not None else "no state"
        error = (
            f"stage {stage} failed: flow run {child.name} of deployment {deployment} "
            f"(work pool {child.work_pool_name}) ended {detail}"
        )
        if self.run.read_state()["stages"].get(stage, {}).get("status") != FAILED:
            self.run.record(stage, status=FAILED, error=error[:2000])
        self.run.record(stage, flow_run=str(child.id))
        raise MPOError(error)

    def bypass(self, *stages: str, reason: str) -> None:
        for stage in stages:
            bypass_stage(get_stage(stage), self.run, reason)


@flow(name="mpo-pipeline", flow_run_name=flow_run_namer("pipeline"), persist_result=False)
def mpo_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    run: str | None = None,
    gpu_deployments: bool = False,
    gpu_deployment: str = "gpu",
) -> Outputs:
    """ingest -> translate -> [align] -> generate -> label -> pair -> filter -> reference -> train -> evaluate.

    With ``align.enabled`` the aligned checkpoint is the model of every later stage, else align is
    bypassed. With ``pair.source`` set (ready-made quadruples), generate and label are bypassed. Returns the
    outputs of evaluate (``eval`` and ``report``).
    """
    folder, cfg = open_run(run, config, overrides)
    with run_lock(folder.path):  # the CLI holds it already; a deployment's flow run takes it here
        tag_flow_run(folder.name, "pipeline")
        for orphan in crash_orphaned_flow_runs(folder.name):
            get_run_logger().warning("flow run %s was left running by a killed mpo process: marked Crashed", orphan)
        flow_run_id = flow_run.get_id()
        folder.begin_invocation("pipeline", [s.name for s in STAGES], flow_run_url(flow_run_id), flow_run_id)
        stage = StageDispatch(folder, cfg, gpu_deployments, gpu_deployment)

        prompts = stage("ingest")
        translated = stage("translate", prompts)
        if align_enabled(cfg):
            aligned = stage("align", translated)
        else:
            stage.bypass("align", reason="align.enabled is off")
            aligned = {}
        if pair_source(cfg):
            stage.bypass(*PAIR_SOURCE_BYPASSES, reason=f"pairs read from {pair_source(cfg)}")
            pairs = stage("pair")
        else:
            responses = stage("generate", translated, aligned)
            labelled = stage("label", responses)
            pairs = stage("pair", labelled)
        filtered = stage("filter", pairs)
        reference = stage("reference", filtered, aligned)
        checkpoint = stage("train", filtered, reference, aligned, translated)
        evaluation = stage("evaluate", translated, filtered, reference, checkpoint, aligned)

        for line in publish_run_page(folder, cfg):
            get_run_logger().info("result: %s", line)
        return evaluation
