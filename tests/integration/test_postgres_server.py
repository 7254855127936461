"""scripts/start-server-postgres.sh: a private PostgreSQL cluster and a real Prefect server on it, used by a flow."""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, free_port, prefect_env, stop, wait_healthy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not glob.glob("/usr/lib/postgresql/*/bin/initdb"), reason="PostgreSQL binaries not installed"
    ),
]


@pytest.fixture
def pg_folder():
    """A world-traversable temporary folder: as root the cluster runs as the `postgres` system user."""
    folder = Path(tempfile.mkdtemp(prefix="mpo-pg-"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(
        [str(ROOT / "scripts" / "stop-postgres.sh")],
        env={**os.environ, "MPO_PG_DATA": str(folder / "data")},
        capture_output=True,
        check=False,
        timeout=60,
    )
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_prefect_server_on_postgres_runs_a_flow(pg_folder, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = prefect_env(
        home, MPO_PG_DATA=str(pg_folder / "data"), MPO_PG_PORT=str(free_port()), MPO_SERVER_PORT=str(port)
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(ROOT / "scripts" / "start-server-postgres.sh")],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, server, log_path, 240)
        password = (pg_folder / "data.password").read_text()
        assert password and password not in log_path.read_text()

        @flow(name="postgres-smoke")
        def smoke() -> int:
            return 42

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            state = smoke(return_state=True)
            assert state.is_completed()
            with get_client(sync_client=True) as client:
                stored = client.read_flow_run(state.state_details.flow_run_id)
                assert stored.state.is_completed()
        settings = httpx.get(f"{api_url}/admin/settings", timeout=10).text
        assert password not in settings
        psql = max(glob.glob("/usr/lib/postgresql/*/bin/psql"))
        rows = subprocess.run(
            [
                psql,
                "-h",
                "127.0.0.1",
                "-p",
                env["MPO_PG_PORT"],
                "-U",
                "prefect",
                "-d",
                "prefect",
                "-tAc",
                "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'",
            ],
            env={**os.environ, "PGPASSWORD": password},
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert int(rows.stdout.strip()) >= 1  # the flow run lives in PostgreSQL
    finally:
        stop(server)
