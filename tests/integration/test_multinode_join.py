"""A node joining a multi-node training launch finds the run folder from its flow run, as Prefect's kubernetes
worker gives every pod of the job the same ``PREFECT__FLOW_RUN_ID``: read back from a real server."""

from __future__ import annotations

import pytest


def test_a_joining_node_finds_the_run_of_its_flow_run(use_server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.stage_flows import STAGE_FLOWS
    from mpo_core.plumbing.errors import ConfigError
    from tasks.launch import run_of_flow_run

    run = tmp_path / "runs" / "multinode"
    with get_client(sync_client=True) as client:
        with_run = client.create_flow_run(STAGE_FLOWS["train"], parameters={"run": str(run)})
        without_run = client.create_flow_run(STAGE_FLOWS["train"], parameters={"config": "configs/default.yaml"})
    assert run_of_flow_run(str(with_run.id)) == run
    with pytest.raises(ConfigError, match=f"flow run {without_run.id} has no 'run' parameter"):
        run_of_flow_run(str(without_run.id))
