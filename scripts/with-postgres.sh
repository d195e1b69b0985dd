#!/usr/bin/env bash
# Runs COMMAND with a throw-away PostgreSQL 15 server: initdb in a temp dir, pg_ctl start on a
# free loopback port (no unix socket outside the temp dir), then exports
#   BULKHEAD_PG_URL="host=127.0.0.1 port=PORT user=bulkhead dbname=bulkhead"
# and runs the command; the server and its directory are removed afterwards.
# Usage: scripts/with-postgres.sh cargo test --release -p bulkhead-control pg::
# `make test` runs it with BULKHEAD_REQUIRE_ALL=1 (passed through to the command), so the
# PostgreSQL test fails instead of skipping if BULKHEAD_PG_URL does not reach it.
# Needs Debian's postgresql package (scripts/install-deps.sh). As root, the server runs as the
# `postgres` system user (initdb refuses to run as root).
set -euo pipefail
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PGBIN/initdb" ] || { echo "with-postgres: no PostgreSQL binaries (install the postgresql package)" >&2; exit 1; }
DIR=$(mktemp -d /tmp/bulkhead-pg.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AS=()
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$DIR"; AS=(runuser -u postgres --); fi
cleanup() { "${AS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT
"${AS[@]}" "$PGBIN/initdb" -D "$DIR/data" -U bulkhead --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
"${AS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=on" start >/dev/null
"$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U bulkhead bulkhead
export BULKHEAD_PG_URL="host=127.0.0.1 port=$PORT user=bulkhead dbname=bulkhead"
echo "with-postgres: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
"$@"
