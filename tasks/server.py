"""The temporary local Prefect server of one ``mpo`` command, owned by it.

With no ``PREFECT_API_URL`` configured, Prefect would start its own temporary server in a child process that
shares the terminal's process group (a Ctrl-C kills it before the run can report) and can outlive a killed
``mpo``. Instead the command starts that server itself (:func:`owned_server`): the same Prefect API
application in its own process group, killed by the kernel if ``mpo`` dies (:mod:`tasks.processes`), and
stopped when the command ends, after its flow runs have reported their final states. Nothing here imports
Prefect, so ``PREFECT_API_URL`` is set before Prefect reads its settings.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib.util
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from mpo_core.plumbing.errors import MPOError, OrchestrationUnreachableError
from tasks.processes import group

# What Prefect's own temporary server sets (prefect.server.api.server.SubprocessASGIServer): no UI.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
WATCH_INTERVAL_S = 2.0
# After a lost API interrupted the command: how long its flow may spend failing (Prefect's client retries a
# dead server for minutes) before the process exits; children die with it (:mod:`tasks.processes`).
EXIT_GRACE_S = 15.0


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
def owned_server(while_starting: Callable[[], object] | None = None) -> Iterator[str | None]:
    """Within the block ``PREFECT_API_URL`` points at a Prefect server this process started and stops at the
    end; a configured ``PREFECT_API_URL`` is used as it is (yields None then). ``while_starting`` runs while
    the server boots (``PREFECT_API_URL`` already set; for imports the command needs next, which then
    cost no wall time). The block's flow runs send no heartbeats: their only reader would be this server's
    automations, and it has none (it lives as long as the command); each flow run would wait up to 1 s
    at its end for Prefect's heartbeat thread."""
    if configured_api_url():
        if while_starting is not None:
            while_starting()
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
        os.environ["PREFECT_API_URL"] = api_url
        _owned.append(api_url)
        try:
            if while_starting is not None:
                while_starting()
            while not api_healthy(api_url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode("utf-8", errors="replace")[-2000:]
                    raise PrefectServerStartError(
                        f"the temporary Prefect server on {api_url} did not start within {timeout_s:.0f} s "
                        f"({STARTUP_TIMEOUT_ENV}); its output:\n{tail}")
                time.sleep(0.3)
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                yield api_url
        finally:
            _flush_prefect_logs()
            _owned.pop()
            os.environ.pop("PREFECT_API_URL", None)


def _flush_prefect_logs() -> None:
    """Send the log records and events Prefect still buffers for the API while the server is up (else
    Prefect retries them against the stopped server at exit, for minutes)."""
    if "prefect" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            with contextlib.suppress(Exception):  # a display concern: never fail the command over it
                service.drain_all(timeout=5)


@contextlib.contextmanager
def api_watchdog(api_url: str | None, limit_s: float, interval_s: float = WATCH_INTERVAL_S) -> Iterator[None]:
    """Within the block, the Prefect API at ``api_url`` is checked every ``interval_s``; once it has not
    answered for ``limit_s`` the command is interrupted and ends in an :class:`OrchestrationUnreachableError`
    naming the URL and what to do (or, if its flow cannot finish failing within :data:`EXIT_GRACE_S`, the
    process exits with status 2 after printing it). The running stage is marked interrupted and resumes."""
    if not api_url:
        yield
        return
    stop = threading.Event()
    tripped: list[OrchestrationUnreachableError] = []

    def watch() -> None:
        down_since = None
        while not stop.wait(interval_s):
            if api_healthy(api_url):
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since < limit_s:
                continue
            tripped.append(OrchestrationUnreachableError(
                f"the Prefect API at {api_url} has not answered for {limit_s:.0f} s (runtime.api_unreachable_s): "
                "start that server again (or point PREFECT_API_URL at a running one), then rerun the same "
                "command: the run resumes where it stopped"))
            print(f"mpo: {tripped[0]}", file=sys.stderr, flush=True)
            _thread.interrupt_main()
            if not stop.wait(EXIT_GRACE_S):
                os._exit(2)
            return

    thread = threading.Thread(target=watch, name="mpo-api-watchdog", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        if tripped:
            raise tripped[0] from None
        raise
    finally:
        stop.set()


def configured_api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL`` from the environment, else from the active
    Prefect profile (``prefect config set PREFECT_API_URL=...``), else None. Read without importing Prefect."""
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None
