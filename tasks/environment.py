"""Process-wide Prefect settings mpo needs, applied before Prefect is first imported.

Each is a default: a value the user already set in the environment wins.

- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: with no server configured Prefect starts a
  temporary local one; a fresh Prefect home needs ~30 s on a small machine (Prefect's default is 20 s).
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: the start-up telemetry write races the ephemeral server's
  SQLite database ("database is locked").
- ``PREFECT_LOGGING_EXTRA_LOGGERS``: records of these libraries' loggers reach the Prefect run logs.
- ``PREFECT_SERVER_API_HOST=127.0.0.1``: a server started from this process binds to loopback only.
"""

from __future__ import annotations

import os

FORWARDED_LOGGERS = ("mpo_core", "transformers", "vllm", "accelerate", "peft", "trl")

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(FORWARDED_LOGGERS),
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
}


def apply_defaults() -> None:
    """Set each of :data:`DEFAULTS` unless already set (they take effect where Prefect is not yet imported;
    deployments set them as job variables)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
