#!/usr/bin/env bash
# Control-plane benchmark: starts a local cluster (KMS, 2 host controllers, control plane), then
# measures RunInstances and AttachVolume latency (p50/p99) and signed-API throughput, with SQLite
# and — when PostgreSQL is installed — again with PostgreSQL (a throw-away server from
# scripts/with-postgres.sh). Prints a markdown section `## Control plane` on stdout.
# Run from the repository root after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
if [ -z "${BULKHEAD_PG_URL:-}" ] && [ -z "${BENCH_NO_PG:-}" ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exec scripts/with-postgres.sh "$0" "$@" 2>/dev/null
fi
PG=()
[ -n "${BULKHEAD_PG_URL:-}" ] && PG=(--database-url "$BULKHEAD_PG_URL")
"$BIN/bulkhead-devcluster" bench --hosts 2 --iterations "${BENCH_ITERATIONS:-40}" \
  --seconds "${BENCH_SECONDS:-3}" --concurrency "${BENCH_CONCURRENCY:-8}" "${PG[@]}" 2>/dev/null
