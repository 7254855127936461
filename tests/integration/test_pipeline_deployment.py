"""The pipeline deployment end to end on two pools: a real Prefect server, deployments made by
``scripts/deploy.sh``, one process worker serving ``cpu`` and one serving ``gpu`` (on a machine without a
GPU the gpu worker is just another process: the routing is what is tested), and a tiny recipe on the
embedded model.

- ``mpo-pipeline/default`` sends every GPU stage to the gpu pool as a child flow run and keeps the CPU stages
  in its own process on the cpu pool; its artifacts and report equal a local ``mpo run`` of the same recipe;
- a rerun through the deployment skips every stage;
- a GPU stage that fails on the gpu worker fails the pipeline run with the stage named, and ``state.json``
  says which stage failed;
- two pipeline runs started together never run two GPU flow runs at once (the gpu pool's concurrency limit);
- the weekly schedule exists and the server's scheduler creates the next runs;
- a worker that cannot see the run folder fails with an error that says so.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpo_core.plumbing.artifacts import file_hash, read_manifest
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.stage_table import STAGES
from tests.integration.conftest import BIN, ROOT, PrefectServer, mpo_run, stop

pytestmark = pytest.mark.slow

ACTIVE = [s for s in STAGES if s.name != "align"]  # align is off in the tiny recipe: bypassed, no flow run
GPU_STAGES = [s.name for s in ACTIVE if s.device == "gpu"]
CPU_STAGES = [s.name for s in ACTIVE if s.device == "cpu"]
PIPELINE = "mpo-pipeline/default"
RUN_TIMEOUT_S = 1500
WORKER_POLL_S = "2"

def statuses_all(status: str) -> dict[str, str]:
    """Every stage of the tiny recipe in ``status``; align (off) bypassed."""
    return {s.name: ("bypassed" if s.name == "align" else status) for s in STAGES}


TINY_RECIPE = """run:
  name: {name}
  root: {root}
  target_langs: [zh]
model:
  dtype: float32
  device: cpu
prompts:
  source: seed
  limit: 6
generate:
  backend: {backend}
  num_samples: 1
  max_new_tokens: 8
label:
  judge: refusal_patterns
reference:
  batch_size: {reference_batch_size}
  max_length: 64
  min_safe_share: 0.0  # plumbing: the raw embedded model is not safe in English
train:
  learning_rate: 1.0e-5
  max_steps: 1
  per_device_batch_size: 2
  max_length: 64
evaluate:
  max_prompts_per_lang: 2
  max_new_tokens: 4
  bootstrap_samples: 10
  max_pairs_per_lang: 2
"""


def tiny_recipe(
    folder: Path, name: str, *, backend: str = "transformers", reference_batch_size: int = 4
) -> Path:
    """Six seed prompts in en and zh, one sample of 8 tokens, one training step, 2 eval prompts a language."""
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        TINY_RECIPE.format(
            name=name, root=folder / "runs", backend=backend, reference_batch_size=reference_batch_size
        ),
        encoding="utf-8",
    )
    return recipe


@dataclass
class Cluster:
    server: PrefectServer
    folder: Path
    logs: dict[str, Path]

    def worker_logs(self) -> str:
        return "\n".join(
            f"--- {pool} worker ---\n{log.read_text()[-3000:]}" for pool, log in self.logs.items()
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A server, the deployments of ``scripts/deploy.sh``, and a worker on each of the cpu and gpu pools."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    folder = tmp_path_factory.mktemp("deployed")
    # the scheduler visits deployments every 60 s by default; 5 s keeps the schedule test short
    server = PrefectServer(
        folder / "prefect-home", extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    ).start()
    workers: list[subprocess.Popen] = []
    try:
        deployed = subprocess.run(
            [str(ROOT / "scripts" / "deploy.sh")],
            env={**server.client_env, "MPO_PROJECT_DIR": str(ROOT)},
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        logs = {pool: folder / f"worker-{pool}.log" for pool in ("cpu", "gpu")}
        for pool, log_path in logs.items():
            with open(log_path, "wb") as log:
                workers.append(
                    subprocess.Popen(
                        [str(BIN / "prefect"), "worker", "start", "--pool", pool],
                        env={**server.client_env, "PREFECT_WORKER_QUERY_SECONDS": WORKER_POLL_S},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=folder,
                    )
                )
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home}):
            yield Cluster(server, folder, logs)
    finally:
        for worker in workers:
            stop(worker)
        server.stop()


def wait_until_final(flow_run_id):
    """The flow run once it has reached a final state."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run {flow_run.name} not final after {RUN_TIMEOUT_S} s"
            time.sleep(2)
    return flow_run


def run_pipeline(cluster: Cluster, recipe: Path):
    """One flow run of the pipeline deployment on ``recipe``, waited for."""
    from prefect.deployments import run_deployment

    return run_deployment(
        PIPELINE, parameters={"config": str(recipe)}, timeout=RUN_TIMEOUT_S, as_subflow=False
    )


@dataclass(frozen=True)
class RunNode:
    """A flow run as the API reports it: what ran, where (work pool, deployment), when, how it ended."""

    id: object
    name: str
    flow: str
    pool: str | None
    deployment: str | None
    state: str
    message: str
    created: dt.datetime
    start: dt.datetime | None
    end: dt.datetime | None

    def line(self) -> str:
        where = f"pool {self.pool}, deployment {self.deployment}" if self.pool else "in the parent's process"
        return f"{self.flow} [{self.name}]  {where}  {self.state}"


def read_node(client, flow_run) -> RunNode:
    deployment = None
    if flow_run.deployment_id:
        found = client.read_deployment(flow_run.deployment_id)
        deployment = f"{client.read_flow(found.flow_id).name}/{found.name}"
    return RunNode(
        flow_run.id,
        flow_run.name,
        client.read_flow(flow_run.flow_id).name,
        flow_run.work_pool_name,
        deployment,
        flow_run.state.name,
        flow_run.state.message or "",
        flow_run.created,
        flow_run.start_time,
        flow_run.end_time,
    )


def flow_run_tree(flow_run_id) -> tuple[RunNode, list[RunNode]]:
    """The flow run and its child flow runs (subflows and deployment runs started from it), by start time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        parent = read_node(client, client.read_flow_run(flow_run_id))
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        nodes = [read_node(client, child) for child in children]
    return parent, sorted(nodes, key=lambda n: n.start or n.created)


def show_tree(title: str, parent: RunNode, children: list[RunNode]) -> None:
    print(f"\n{title}\n{parent.line()}")
    for child in children:
        print(f"  └─ {child.line()}")


def comparable(run_dir: Path) -> dict[str, object]:
    """What a run produced, in a form two runs of one recipe must share: every Parquet artifact's row count
    and content hash (byte-identical rows), every figure's bytes, the trained weights, and the report less
    the lines that hold time taken and the config hash (the checkpoint it covers is hashed by file times)."""
    seen: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*.parquet")):
        manifest = read_manifest(path)
        seen[str(path.relative_to(run_dir))] = (manifest.rows, manifest.content_hash)
    for path in sorted(run_dir.rglob("*.png")) + sorted(run_dir.rglob("model/*.safetensors")):
        seen[str(path.relative_to(run_dir))] = file_hash(path)
    report = (run_dir / "evaluate" / "report" / "report.md").read_text(encoding="utf-8")
    seen["report.md"] = re.sub(r"(?m)^- \*\*(config hash|evaluation time)\*\*: .*$", "", report)
    return seen


def test_weekly_schedule_is_created_and_scheduler_makes_next_runs(cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PIPELINE)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            ("0 3 * * 1", "UTC", True)
        ]
        deadline = time.monotonic() + 120
        while True:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))
                ),
            )
            if len(scheduled) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(2)
    starts = sorted(r.expected_start_time.astimezone(dt.UTC) for r in scheduled)
    assert len(starts) >= 3, f"the scheduler created {len(starts)} runs of {PIPELINE}"
    assert all((s.weekday(), s.hour, s.minute) == (0, 3, 0) for s in starts), starts
    assert all(b - a == dt.timedelta(days=7) for a, b in itertools.pairwise(starts)), starts
    assert starts[0] > dt.datetime.now(dt.UTC)
    print(f"\nnext runs of {PIPELINE}: {', '.join(s.isoformat() for s in starts[:3])}, ...")


def test_pipeline_deployment_sends_gpu_stages_to_the_gpu_pool_and_matches_a_local_run(cluster):
    recipe = tiny_recipe(cluster.folder, "tiny")
    run_dir = cluster.folder / "runs" / "tiny"
    mpo_run(recipe, cluster.server.client_env, RUN_TIMEOUT_S)
    local_dir = cluster.folder / "local-tiny"
    shutil.move(run_dir, local_dir)  # the deployed run then writes the very same paths

    started = time.perf_counter()
    pipeline_run = run_pipeline(cluster, recipe)
    seconds = time.perf_counter() - started
    assert pipeline_run.state.is_completed(), f"{pipeline_run.state}\n{cluster.worker_logs()}"
    parent, children = flow_run_tree(pipeline_run.id)
    show_tree(f"pipeline deployment run ({seconds:.0f} s):", parent, children)

    assert (parent.pool, parent.deployment) == ("cpu", PIPELINE)
    by_flow = {child.flow: child for child in children}
    assert len(children) == len(ACTIVE) and set(by_flow) == {f"mpo-{s.name}" for s in ACTIVE}
    for stage in GPU_STAGES:
        child = by_flow[f"mpo-{stage}"]
        assert (child.pool, child.deployment, child.state) == ("gpu", f"mpo-{stage}/gpu", "Completed"), child
    for stage in CPU_STAGES:
        child = by_flow[f"mpo-{stage}"]
        assert (child.pool, child.deployment, child.state) == (None, None, "Completed"), child
    assert RunFolder(run_dir).stage_statuses() == statuses_all("ran")

    assert comparable(run_dir) == comparable(local_dir)


def test_rerun_through_the_deployment_skips_every_stage(cluster):
    recipe = cluster.folder / "tiny.yaml"
    run = RunFolder(cluster.folder / "runs" / "tiny")
    before = comparable(run.path)
    pipeline_run = run_pipeline(cluster, recipe)
    assert pipeline_run.state.is_completed(), f"{pipeline_run.state}\n{cluster.worker_logs()}"
    assert run.stage_statuses() == statuses_all("skipped")
    assert flow_run_tree(pipeline_run.id)[1] == []  # a skipped stage costs no flow run, on no pool
    assert comparable(run.path) == before


def test_gpu_stage_failing_on_the_gpu_worker_fails_the_pipeline_naming_it(cluster):
    # vLLM's engine (make test installs its CPU build) refuses prompts longer than its context: a real
    # failure of the stage on the gpu worker, after ingest and translate ran on the cpu side
    recipe = tiny_recipe(cluster.folder, "broken", backend="vllm")
    text = recipe.read_text(encoding="utf-8").replace("  backend: vllm\n", "  backend: vllm\n  vllm:\n    max_model_len: 16\n")
    recipe.write_text(text, encoding="utf-8")
    pipeline_run = run_pipeline(cluster, recipe)
    assert pipeline_run.state.is_failed(), pipeline_run.state
    assert "stage generate failed" in pipeline_run.state.message
    parent, children = flow_run_tree(pipeline_run.id)
    show_tree("failing pipeline run:", parent, children)
    generate = next(c for c in children if c.flow == "mpo-generate")
    assert (generate.pool, generate.state) == ("gpu", "Failed")
    state = RunFolder(cluster.folder / "runs" / "broken").read_state()["stages"]
    assert state["generate"]["status"] == "failed", state["generate"]
    assert "maximum context length is 16 tokens" in state["generate"]["error"], state["generate"]["error"]
    assert state["generate"]["flow_run"] == str(generate.id)
    assert {s: state[s]["status"] for s in ("ingest", "translate")} == {"ingest": "ran", "translate": "ran"}
    assert all(state[s]["status"] == "pending" for s in ("label", "pair", "filter", "reference", "train"))


def test_two_pipelines_started_together_never_run_two_gpu_stages_at_once(cluster):
    """Two runs made from the finished one (hard links: its checkpoint keeps its file times) with another
    reference batch size: in each, filter (whose identity holds the reference section) and reference are the
    stages to run, and as their rows do not change nothing downstream does. Both pipelines reach their GPU
    stage together; the gpu pool's concurrency limit makes one wait."""
    from prefect.deployments import run_deployment

    source = cluster.folder / "runs" / "tiny"
    recipes = []
    for name in ("twin-a", "twin-b"):
        shutil.copytree(source, cluster.folder / "runs" / name, copy_function=os.link)
        recipes.append(tiny_recipe(cluster.folder, name, reference_batch_size=2))
    submitted = [
        run_deployment(PIPELINE, parameters={"config": str(r)}, timeout=0, as_subflow=False) for r in recipes
    ]
    finished = [wait_until_final(f.id) for f in submitted]
    assert all(f.state.is_completed() for f in finished), [f.state for f in finished]

    trees = [flow_run_tree(f.id) for f in finished]
    for (parent, children), name in zip(trees, ("twin-a", "twin-b")):
        show_tree(f"concurrent pipeline {name}:", parent, children)
        assert [(c.flow, c.pool) for c in children] == [("mpo-filter", None), ("mpo-reference", "gpu")]
        statuses = RunFolder(cluster.folder / "runs" / name).stage_statuses()
        assert statuses == {
            s.name: ("ran" if s.name in ("filter", "reference") else "skipped") for s in ACTIVE
        } | {"align": "bypassed"}
    pipelines = sorted((t[0] for t in trees), key=lambda n: n.start)
    assert pipelines[1].start < pipelines[0].end, "the two pipeline runs did not overlap"
    gpu_runs = sorted(
        (c for _, children in trees for c in children if c.pool == "gpu"), key=lambda n: n.start
    )
    first, second = gpu_runs
    assert second.created < first.end, (
        "the second GPU run was created after the first ended: nothing to limit"
    )
    assert first.end <= second.start, (
        f"GPU flow runs overlap: {first.line()} {first.start}-{first.end}, "
        f"{second.line()} {second.start}-{second.end}"
    )
    print(
        f"\ngpu flow runs: {first.start:%H:%M:%S}-{first.end:%H:%M:%S} and {second.start:%H:%M:%S}-"
        f"{second.end:%H:%M:%S} (the second created at {second.created:%H:%M:%S})"
    )


def test_a_worker_that_cannot_see_the_run_folder_says_so(cluster):
    from prefect.deployments import run_deployment

    missing = cluster.folder / "not-shared" / "runs" / "tiny"
    flow_run = run_deployment(
        "mpo-label/gpu", parameters={"run": str(missing)}, timeout=RUN_TIMEOUT_S, as_subflow=False
    )
    assert flow_run.state.is_failed(), flow_run.state
    message = flow_run.state.message
    assert "RunFolderNotVisible" in message and str(missing) in message, message
    assert "does not exist on this machine" in message and "same absolute path" in message, message
