"""The temporary Prefect server of an ``mpo`` command (:func:`tasks.server.owned_server`): it boots while the
command imports what it needs, and what would only cost time against it (heartbeats, concurrency limits it
cannot have) is off for its flow runs."""

from __future__ import annotations

import contextlib
import os

import pytest

from mpo_core.plumbing.stage_table import get_stage
from tasks.server import api_healthy, owned_api_url, owned_server

pytestmark = pytest.mark.slow


def test_the_temporary_server_boots_beside_the_imports_and_its_flow_runs_skip_heartbeats_and_limits(
    tmp_path, monkeypatch
):
    from prefect import flow
    from prefect.settings import get_current_settings

    from tasks.stage_task import _gpu_slot

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    seen = {}

    def while_starting() -> None:
        seen["api_url"] = os.environ.get("PREFECT_API_URL")
        seen["healthy"] = api_healthy(seen["api_url"])

    @flow(persist_result=False)
    def settings_inside_a_flow() -> tuple[str | None, int | None]:
        return get_current_settings().api.url, get_current_settings().flows.heartbeat_frequency

    heartbeats_outside = get_current_settings().flows.heartbeat_frequency
    with owned_server(while_starting) as api_url:
        assert seen == {"api_url": api_url, "healthy": False}  # ran before the server answered
        assert owned_api_url() == api_url and api_healthy(api_url)
        assert settings_inside_a_flow() == (api_url, None)  # the flow ran against it, without heartbeats
        assert isinstance(_gpu_slot(get_stage("train")), contextlib.nullcontext)  # no limit to ask it for
    assert owned_api_url() is None and "PREFECT_API_URL" not in os.environ
    assert not api_healthy(api_url)
    assert heartbeats_outside is not None
    assert get_current_settings().flows.heartbeat_frequency == heartbeats_outside
