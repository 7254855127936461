"""A real Prefect server for integration tests: a subprocess on 127.0.0.1 with its own temporary home."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a Prefect subprocess: its own home, analytics off, offline hubs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="mpo_core,transformers",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        **extra,
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def mpo_run(recipe: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """``mpo run --config recipe`` as a user runs it; asserts exit 0 and shows the output's tail if not."""
    result = subprocess.run([str(BIN / "mpo"), "run", "--config", str(recipe)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout_s, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def wait_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class PrefectServer:
    """A started ``prefect server start`` subprocess and the environment its clients need."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.server_env = prefect_env(home, **(extra_env or {}))
        self.process: subprocess.Popen | None = None

    @property
    def client_env(self) -> dict[str, str]:
        return prefect_env(self.home, self.api_url)

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.server_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.home,
            )
        wait_healthy(self.api_url, self.process, self.log, SERVER_START_TIMEOUT_S)
        return self

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``prefect`` CLI against this server (raises with its output on failure)."""
        result = subprocess.run(
            [str(BIN / "prefect"), *args],
            check=False,
            env=self.client_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (SQLite) on a free loopback port, for the whole session."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    yield server
    server.stop()


@pytest.fixture
def use_server(prefect_server):
    """Point in-process Prefect clients (flows run in this test process) at the session's server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(
        updates={PREFECT_API_URL: prefect_server.api_url, PREFECT_HOME: prefect_server.home}
    ):
        yield prefect_server
