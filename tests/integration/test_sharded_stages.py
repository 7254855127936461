"""A sharded generate stage on the gpu pool: a real Prefect server, the deployments of ``scripts/deploy.sh``,
two process workers serving the ``gpu`` pool (one flow run at a time each), the embedded model.

- ``generate.shards: 3``: three child flow runs ``<run>/generate/shard-<i>-of-3``, run by both workers; the
  merged responses equal an unsharded run's (content hash of the rows); the stage's manifest and its summary
  in the UI name the shards;
- a shard whose process is killed fails the stage with its index named; the rerun runs that shard alone (no
  new flow run of the others) and the merged responses are the same;
- ``evaluate.shards: 2``: the models' answers in two shard flow runs, the evaluation on their merge equal to
  an unsharded one.
"""

from __future__ import annotations

import contextvars
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mpo_core.plumbing.artifacts import read_artifact, read_manifest
from mpo_core.plumbing.config import PipelineConfig, canonical_hash, load_config
from mpo_core.plumbing.errors import MPOError
from mpo_core.plumbing.stage_run import run_stage_function
from tests.integration.conftest import BIN, ROOT, PrefectServer, stop
from tests.integration.test_monitoring import latest_artifact
from tests.integration.test_pipeline_deployment import tiny_recipe

pytestmark = pytest.mark.slow

SHARDS = 3
WORKERS = 2
# the deployment test's tiny recipe, with more prompts and samples so that each shard has work
SHARDED = ["prompts.limit=12", "generate.num_samples=2", "generate.max_new_tokens=16", "generate.batch_size=4"]


@pytest.fixture(scope="module")
def gpu_pool(tmp_path_factory):
    """A server, the deployments, and two workers on the gpu pool that take one flow run at a time."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    folder = tmp_path_factory.mktemp("sharded")
    server = PrefectServer(folder / "prefect-home").start()
    workers: list[subprocess.Popen] = []
    try:
        env = {**server.client_env, "MPO_PROJECT_DIR": str(ROOT), "MPO_GPU_SLOTS": str(WORKERS)}
        deployed = subprocess.run([str(ROOT / "scripts" / "deploy.sh")], env=env, cwd=folder, capture_output=True,
                                  text=True, timeout=600, check=False)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        logs = [folder / f"worker-{i}.log" for i in range(WORKERS)]
        for i, log_path in enumerate(logs):
            with open(log_path, "wb") as log:
                workers.append(subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--name", f"gpu-{i}", "--limit", "1"],
                    env={**server.client_env, "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_NUM_THREADS": "1"},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                ))
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home}):
            yield folder, logs
    finally:
        for worker in workers:
            stop(worker)
        server.stop()


def _config(folder: Path, name: str, shards: int) -> PipelineConfig:
    return load_config(tiny_recipe(folder, name), [*SHARDED, f"generate.shards={shards}"])


def _prepared(folder: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A run of the recipe with its ingest and translate stages done in this process: (run folder, translated)."""
    from flows.stage_flows import STAGE_FLOWS

    overrides = [*SHARDED, f"generate.shards={SHARDS}"]
    prompts = STAGE_FLOWS["ingest"](config=str(tiny_recipe(folder, name)), overrides=overrides)
    run_dir = Path(_config(folder, name, SHARDS).run_dir)
    return run_dir, STAGE_FLOWS["translate"](run=str(run_dir), inputs=prompts)


def _rows_hash(path: str | Path) -> str:
    return canonical_hash(read_artifact(path, "responses").to_pylist())


def _shard_runs(name: str, stage: str = "generate") -> dict[str, list]:
    """The flow runs of the run's shards of ``stage``, by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{name}/{stage}/shard-")))
    by_name: dict[str, list] = {}
    for flow_run in runs:
        by_name.setdefault(flow_run.name, []).append(flow_run)
    return by_name


def test_generate_in_three_shards_on_two_workers(gpu_pool):
    from prefect.client.orchestration import get_client

    from flows.stage_flows import STAGE_FLOWS

    folder, logs = gpu_pool
    run_dir, translated = _prepared(folder, "sharded")
    outputs = STAGE_FLOWS["generate"](run=str(run_dir), inputs=translated, shard_deployment="gpu")

    shard_runs = _shard_runs("sharded")
    assert sorted(shard_runs) == [f"sharded/generate/shard-{i}-of-{SHARDS}" for i in range(SHARDS)]
    assert all(len(r) == 1 and r[0].state.is_completed() for r in shard_runs.values())
    ids = {str(r[0].id) for r in shard_runs.values()}
    served = [{i for i in ids if i in log.read_text()} for log in logs]
    assert all(served), f"each worker ran a shard: {served}"
    assert set().union(*served) == ids

    manifest = read_manifest(outputs["responses"])
    assert [s["index"] for s in manifest.extra["shards"]] == list(range(SHARDS))
    assert {s["flow_run_id"] for s in manifest.extra["shards"]} == ids
    with get_client(sync_client=True) as client:
        summary = latest_artifact(client, "sharded-generate-summary").data
    assert f"{SHARDS} shards:" in summary and all(i in summary for i in ids), summary

    whole = _config(folder, "whole", 1)
    unsharded = run_stage_function("generate", whole, translated, folder / "unsharded-generate")
    assert _rows_hash(outputs["responses"]) == _rows_hash(unsharded["responses"])


def test_evaluate_in_two_shards_on_the_gpu_pool(gpu_pool):
    """The whole pipeline with gpu deployments and ``evaluate.shards: 2``: evaluate's generation in two shard
    flow runs on the workers, the stage then judging and measuring the merged answers: the same ``eval`` rows
    as an unsharded evaluate on the same inputs, its manifest naming both shards."""
    from flows.pipeline import mpo_pipeline
    from mpo_core.plumbing.runs import RunFolder

    folder, _ = gpu_pool
    recipe, overrides = tiny_recipe(folder, "sharded-eval"), [*SHARDED, "evaluate.shards=2"]
    outputs = mpo_pipeline(config=str(recipe), overrides=overrides, gpu_deployments=True)

    shard_runs = _shard_runs("sharded-eval", "evaluate")
    assert sorted(shard_runs) == [f"sharded-eval/evaluate/shard-{i}-of-2" for i in range(2)]
    assert all(len(r) == 1 and r[0].state.is_completed() for r in shard_runs.values())
    shards = read_manifest(outputs["eval"]).extra["shards"]
    assert {s["flow_run_id"] for s in shards} == {str(r[0].id) for r in shard_runs.values()}
    run = RunFolder(Path(load_config(recipe, overrides).run_dir))
    generations = read_artifact(run.path / "evaluate" / "generations.parquet", "generations")
    assert generations.num_rows == sum(s["rows"] for s in shards) > 0
    assert set(generations.column("role").to_pylist()) == {"base", "trained"}

    inputs = {name: run.path / path for stage in ("translate", "filter", "reference", "train")
              for name, path in run.read_marker(stage)["outputs"].items()}
    whole = load_config(recipe, SHARDED)
    unsharded = run_stage_function("evaluate", whole, inputs, folder / "unsharded-evaluate")
    assert (read_artifact(outputs["eval"], "eval").to_pylist()
            == read_artifact(unsharded["eval"], "eval").to_pylist())


def _kill_when_running(flow_run_name: str, timeout_s: float = 600) -> None:
    """SIGKILL the process that runs ``flow_run_name`` (the worker started it with its id in the environment)
    as soon as the flow run is RUNNING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _shard_runs(flow_run_name.split("/")[0]).get(flow_run_name, [])
        if found and found[0].state.is_running():
            needle = f"PREFECT__FLOW_RUN_ID={found[0].id}".encode()
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if needle in environ.split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
                    return
        time.sleep(0.5)
    raise AssertionError(f"{flow_run_name} never ran")


def test_a_killed_shard_fails_the_stage_and_is_the_only_one_redone(gpu_pool):
    from flows.stage_flows import STAGE_FLOWS

    folder, _ = gpu_pool
    run_dir, translated = _prepared(folder, "killed")
    outcome: dict = {}

    def generate() -> None:
        try:
            STAGE_FLOWS["generate"](run=str(run_dir), inputs=translated, shard_deployment="gpu")
        except MPOError as err:
            outcome["error"] = err

    context = contextvars.copy_context()  # the Prefect settings of the fixture
    thread = threading.Thread(target=context.run, args=(generate,))
    thread.start()
    _kill_when_running(f"killed/generate/shard-1-of-{SHARDS}")
    thread.join(timeout=900)
    assert not thread.is_alive()
    assert re.search(rf"stage generate failed in 1 of {SHARDS} shards \(shard 1 of {SHARDS}: flow run .* ended Crashed",
                     str(outcome.get("error"))), outcome

    outputs = STAGE_FLOWS["generate"](run=str(run_dir), inputs=translated, shard_deployment="gpu")
    shard_runs = _shard_runs("killed")
    assert {name: len(runs) for name, runs in shard_runs.items()} == {
        f"killed/generate/shard-{i}-of-{SHARDS}": 2 if i == 1 else 1 for i in range(SHARDS)
    }
    whole = _config(folder, "whole-killed", 1)
    unsharded = run_stage_function("generate", whole, translated, folder / "unsharded-killed")
    assert _rows_hash(outputs["responses"]) == _rows_hash(unsharded["responses"])
