"""A stage deployment from deployments/prefect.yaml, run by a real process worker against a real server."""

from __future__ import annotations

import subprocess

import pytest

from mpo_core.plumbing.artifacts import read_artifact
from mpo_core.plumbing.runs import RunFolder
from tests.integration.conftest import BIN, ROOT, stop

pytestmark = pytest.mark.slow


def _recipe(tmp_path, shared_data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "run:\n  name: deployed\n"
        f"  root: {tmp_path / 'runs'}\n"
        "prompts:\n"
        f"  source: {shared_data / 'multijail' / 'MultiJail.csv'}\n"
        "  limit: 12\n",
        encoding="utf-8",
    )
    return recipe


def test_ingest_deployment_runs_through_a_process_worker(prefect_server, use_server, shared_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    recipe = _recipe(tmp_path, shared_data)
    prefect_server.prefect("work-pool", "create", "cpu", "--type", "process")
    deploy_env = {**prefect_server.client_env, "MPO_PROJECT_DIR": str(ROOT)}
    deployed = subprocess.run(
        [
            str(BIN / "prefect"),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "--name",
            "mpo-ingest/cpu",
        ],
        check=False,
        env=deploy_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--limit", "1"],
            env={**prefect_server.client_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
    try:
        flow_run = run_deployment(
            "mpo-ingest/cpu", parameters={"config": str(recipe)}, timeout=600, as_subflow=False
        )
    finally:
        stop(worker)
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{worker_log.read_text()[-4000:]}"
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    by_key = {a.key: a for a in artifacts}
    summary = by_key["deployed-ingest-summary"]
    prompts_path = tmp_path / "runs" / "deployed" / "ingest" / "prompts.parquet"
    assert "`ingest/prompts.parquet`" in summary.data and "file://" not in summary.data
    assert "ingest — ran" in summary.data
    languages = by_key["deployed-ingest-languages"]
    assert '"lang"' in str(languages.data) or "lang" in str(languages.data)

    table = read_artifact(prompts_path, "prompts")
    assert table.num_rows == 12 * 10  # 12 prompts x the 10 MultiJail languages
    for text in table.column("text").to_pylist()[:20]:
        assert text not in summary.data  # links and counts, never the data
    assert RunFolder(tmp_path / "runs" / "deployed").stage_statuses() == {"ingest": "ran"}
