#!/usr/bin/env bash
# Control-plane benchmark: starts a local cluster (KMS, 2 host controllers, control plane), then
# measures RunInstances and AttachVolume latency (p50/p99) and signed-API throughput. Prints a
# markdown section `## Control plane` on stdout. Run from the repository root after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
"$BIN/bulkhead-control" bench --hosts 2 --iterations "${BENCH_ITERATIONS:-40}" \
  --seconds "${BENCH_SECONDS:-3}" --concurrency "${BENCH_CONCURRENCY:-8}" 2>/dev/null
