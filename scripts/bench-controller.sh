#!/usr/bin/env bash
# Controller benchmark (called by scripts/bench.sh, which appends stdout to docs/benchmarks.md):
# DescribeHost over mTLS 1.3 through the real bulkhead-controller (token + policy + quota +
# fsync'd group-commit audit) vs the same axum/rustls server with no authz/audit, same run.
# BENCH_CONTROLLER_SECONDS (default 10) per side, BENCH_CONTROLLER_CONNS (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TARGET=${CARGO_TARGET_DIR:-target}
$CARGO build --release -q -p bulkhead-controller --bins --example bench_controller >&2
BENCH_DIR="$TARGET" "$TARGET/release/examples/bench_controller" \
  "${BENCH_CONTROLLER_SECONDS:-10}" "${BENCH_CONTROLLER_CONNS:-16}"
