"""The temporary local Prefect server of one ``mpo`` command, owned by it.

With no ``PREFECT_API_URL`` configured, Prefect would start its own temporary server in a child process that
shares the terminal's process group (a Ctrl-C kills it before the run can report) and can outlive a killed
``mpo``. Instead the command starts that server itself (:func:`owned_server`): the same Prefect API
application in its own process group, killed by the kernel if ``mpo`` dies (:mod:`tasks.processes`), and
stopped when the command ends, after its flow runs have reported their final states. Nothing here imports
Prefect, so ``PREFECT_API_URL`` is set before Prefect reads its settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mpo_core.plumbing.errors import MPOError
from tasks.processes import group

# What Prefect's own temporary server sets (prefect.server.api.server.SubprocessASGIServer): no UI.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


_owned: list[str] = []  # the API URL of the server this process owns now, if any


def owned_api_url() -> str | None:
    """The API URL of the temporary server :func:`owned_server` runs now, or None."""
    return _owned[-1] if _owned else None


class PrefectServerStartError(MPOError):
    """The temporary local Prefect server did not become healthy."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def owned_server() -> Iterator[str | None]:
    """Within the block ``PREFECT_API_URL`` points at a Prefect server this process started and stops at the
    end; a configured ``PREFECT_API_URL`` is used as it is (yields None then)."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    timeout_s = float(os.environ.get(STARTUP_TIMEOUT_ENV, "120"))
    with tempfile.TemporaryFile() as log, group(command, env={**os.environ, **SERVER_ENV}, stdout=log,
                                                  stderr=log, stdin=None) as server:
        deadline = time.monotonic() + timeout_s
        while not api_healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode("utf-8", errors="replace")[-2000:]
                raise PrefectServerStartError(
                    f"the temporary Prefect server on {api_url} did not start within {timeout_s:.0f} s "
                    f"({STARTUP_TIMEOUT_ENV}); its output:\n{tail}")
            time.sleep(0.3)
        os.environ["PREFECT_API_URL"] = api_url
        _owned.append(api_url)
        try:
            yield api_url
        finally:
            _owned.pop()
            os.environ.pop("PREFECT_API_URL", None)
