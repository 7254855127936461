"""What a person watching a run finds in the Prefect UI, read back through the API of a real server after a
small pipeline (a few real quadruples, two training steps): the per-language metrics with intervals, the
training curve, the filter's reasons per language, the run's front page, named and tagged flow runs, the
library's log lines and the outputs declared as assets."""

from __future__ import annotations

import json
import time

import pytest

from mpo_core.plumbing.runs import RunFolder
from tests.integration.test_pipeline_reuse import fast_recipe

pytestmark = pytest.mark.slow

RUN = "watched"


def latest_artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert artifacts, f"no artifact {key}"
    return max(artifacts, key=lambda a: a.created)


def materialization_events(client, wait_s: float = 60.0) -> list[dict]:
    """Asset materialization events (they reach the server asynchronously: wait for the last stage's)."""
    deadline = time.monotonic() + wait_s
    while True:
        events = client.request("POST", "/events/filter", json={
            "filter": {"event": {"prefix": ["prefect.asset.materialization"]}}, "limit": 50,
        }).json()["events"]
        if any(e["resource"]["prefect.resource.id"].endswith("/evaluate/eval.parquet") for e in events):
            return events
        assert time.monotonic() < deadline, f"no materialization of the evaluation: {events}"
        time.sleep(1.0)


def table_rows(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@pytest.fixture(scope="module")
def watched_run(prefect_server, tmp_path_factory, shared_data):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.pipeline import mpo_pipeline

    folder = tmp_path_factory.mktemp("monitoring")
    recipe = fast_recipe(folder, shared_data, RUN, max_steps=2, noisy_pair=True)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url, PREFECT_HOME: prefect_server.home}):
        mpo_pipeline(config=str(recipe))
        yield RunFolder(folder / "runs" / RUN)


def test_stage_results_reach_the_api(watched_run, use_server):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        metrics = table_rows(latest_artifact(client, f"{RUN}-evaluate-metrics"))
        curve = table_rows(latest_artifact(client, f"{RUN}-train-curve"))
        reasons = table_rows(latest_artifact(client, f"{RUN}-filter-reasons"))
        reference = table_rows(latest_artifact(client, f"{RUN}-reference-rg-d"))
        report = latest_artifact(client, f"{RUN}-evaluate-report").data
        training = latest_artifact(client, f"{RUN}-train-training").data

    asr = {row["lang"]: row for row in metrics if row["metric"] == "asr"}
    assert set(asr) == {"en", "zh"}
    for row in asr.values():
        for role in ("base", "trained"):
            assert 0.0 <= row[f"{role}_ci_low"] <= row[role] <= row[f"{role}_ci_high"] <= 1.0
        assert row["n"] >= 1 and row["delta"] == pytest.approx(row["trained"] - row["base"], abs=1e-3)
    gaps = [row for row in metrics if row["metric"] == "reward_gap"]
    assert gaps and all(row["base"] is not None and row["trained"] is not None for row in gaps)

    assert [row["step"] for row in curve] == [1, 2]
    assert all(isinstance(row[key], float) for row in curve for key in ("loss", "l1", "l2", "target_gap"))
    assert all(row["loss"] == pytest.approx(row["l1"] + row["l2"], rel=1e-3, abs=1e-4) for row in curve)
    assert all(any(key.startswith("target_gap/") for key in row) for row in curve)  # the batch's languages
    assert "data:image/png;base64," in training and "| l1 |" in training

    by_outcome = {row["outcome"]: row for row in reasons}
    assert by_outcome["dropped: chosen_equals_rejected"]["zh"] >= 1
    assert by_outcome["input"]["total"] == by_outcome["kept"]["total"] + by_outcome["dropped: any"]["total"]

    assert reference[-1]["target_lang"] == "all" and 0.0 <= reference[-1]["safe_share"] <= 1.0
    assert reference[-1]["pairs"] == by_outcome["kept"]["total"]

    assert report.count("data:image/png;base64,") >= 2  # the report's plots travel inside the artifact
    assert "file://" not in report


def test_front_page_names_tags_logs_and_lineage(watched_run, use_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        page = latest_artifact(client, f"{RUN}-run").data
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{RUN}"])))
        by_name = {run.name: run for run in runs}
        train_logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[by_name[f"{RUN}/train"].id]))
        )
        asset_events = materialization_events(client)

    lines = page.splitlines()
    assert lines[2].startswith("- Attack success rate") and lines[3].startswith("- Reward gap")
    assert lines[4].startswith("- Over-refusal")
    assert "file://" not in page and "evaluate/report/report.html" in page

    stages = ["ingest", "translate", "pair", "filter", "reference", "train", "evaluate"]
    assert {f"{RUN}/{s}" for s in stages} | {f"{RUN}/pipeline"} <= set(by_name)
    for stage in stages:
        run = by_name[f"{RUN}/{stage}"]
        assert {f"stage:{stage}", f"run:{RUN}", "mpo"} <= set(run.tags)
        assert f"/runs/flow-run/{run.id}" in page

    messages = [log.message for log in train_logs]
    assert any("train: step 2/2" in m and "L1" in m and "RG^t by language" in m for m in messages), messages
    assert any("loading model" in m for m in messages)

    state = watched_run.read_state()
    assert state["flow_run_url"].startswith("http://127.0.0.1:") and "None" not in state["flow_run_url"]

    materialized = {e["resource"]["prefect.resource.id"]: e for e in asset_events}
    checkpoint = materialized[f"mpo://{RUN}/train/model"]
    upstream = {r["prefect.resource.id"] for r in checkpoint["related"] if r.get("prefect.resource.role") == "asset"}
    assert upstream == {f"mpo://{RUN}/filter/filtered.parquet", f"mpo://{RUN}/reference/reference.parquet",
                        f"mpo://{RUN}/translate/translated.parquet"}  # train leaves held-out prompts' pairs out
    filtered = materialized[f"mpo://{RUN}/filter/filtered.parquet"]["payload"]
    assert filtered["rows"] >= 1 and len(filtered["content_hash"]) == 64
