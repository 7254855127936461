#!/usr/bin/env bash
# Stop the private PostgreSQL cluster started by start-server-postgres.sh.
set -euo pipefail
data="${MPO_PG_DATA:-$HOME/.mpo/postgres}"
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
if [ "$(id -u)" = "0" ]; then
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast stop
else
  "$bin/pg_ctl" -D "$data" -m fast stop
fi
