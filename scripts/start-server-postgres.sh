#!/usr/bin/env bash
# Start a Prefect server backed by PostgreSQL (Debian packages), for teams.
#
#   sudo apt-get update && sudo apt-get install -y postgresql    # once; or MPO_PG_INSTALL=1 below
#   scripts/start-server-postgres.sh                             # http://127.0.0.1:4200
#
# A private PostgreSQL cluster lives in $MPO_PG_DATA (default ~/.mpo/postgres), listens on 127.0.0.1:$MPO_PG_PORT
# only, uses password (scram-sha-256) authentication, and holds database and role `prefect`. The password is
# generated once into $MPO_PG_DATA.password (mode 600) unless MPO_PG_PASSWORD is set; it is passed to Prefect
# through PREFECT_API_DATABASE_CONNECTION_URL (postgresql+asyncpg) in the environment, never on a command line.
# When run as root the cluster runs as the `postgres` system user (PostgreSQL refuses to run as root).
#
# Environment: MPO_PG_DATA, MPO_PG_PORT (5433), MPO_PG_PASSWORD, MPO_PG_INSTALL=1 (apt-get install if missing),
# MPO_SERVER_HOST (127.0.0.1), MPO_SERVER_PORT (4200), MPO_PG_ONLY=1 (start the database, print nothing
# secret, do not start Prefect).
set -euo pipefail

data="${MPO_PG_DATA:-$HOME/.mpo/postgres}"
pg_port="${MPO_PG_PORT:-5433}"
pw_file="${data%/}.password"

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(pg_bin)" ]; then
  if [ "${MPO_PG_INSTALL:-0}" = "1" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL binaries not found: apt-get install postgresql (or set MPO_PG_INSTALL=1)" >&2
    exit 1
  fi
fi
bin="$(pg_bin)"

as_owner() {
  if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ ! -f "$pw_file" ]; then
  mkdir -p "$(dirname "$pw_file")"
  (umask 077; printf '%s' "${MPO_PG_PASSWORD:-$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')}" > "$pw_file")
fi
if [ ! -f "$data/PG_VERSION" ]; then
  mkdir -p "$data"
  chmod 700 "$data"
  tmp_pw="$(mktemp)"
  cp "$pw_file" "$tmp_pw"
  if [ "$(id -u)" = "0" ]; then chown postgres "$data" "$tmp_pw"; fi
  as_owner "$bin/initdb" -D "$data" -U prefect --pwfile="$tmp_pw" --auth=scram-sha-256 -E UTF8 >/dev/null
  rm -f "$tmp_pw"
fi
if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  as_owner "$bin/pg_ctl" -D "$data" -w -l "$data/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $data" start >/dev/null
fi

password="$(cat "$pw_file")"
if ! PGPASSWORD="$password" "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U prefect -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
  PGPASSWORD="$password" "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U prefect prefect
fi
echo "PostgreSQL ready on 127.0.0.1:$pg_port (data: $data)"
[ "${MPO_PG_ONLY:-0}" = "1" ] && exit 0

export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:${password}@127.0.0.1:${pg_port}/prefect"
exec "$(dirname "$0")/start-server.sh" "$@"
