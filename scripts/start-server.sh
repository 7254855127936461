#!/usr/bin/env bash
# Start a Prefect server (API + UI) on SQLite in $PREFECT_HOME, bound to loopback unless told otherwise.
#
#   scripts/start-server.sh                       # http://127.0.0.1:4200
#   MPO_SERVER_HOST=0.0.0.0 scripts/start-server.sh   # reachable from other machines: put auth in front
#
# Clients then use: export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
venv_bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"; [ -d "$venv_bin" ] && export PATH="$venv_bin:$PATH"  # the project venv
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
host="${MPO_SERVER_HOST:-127.0.0.1}"
port="${MPO_SERVER_PORT:-4200}"
exec prefect server start --host "$host" --port "$port" "$@"
