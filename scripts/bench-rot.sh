#!/usr/bin/env bash
# Root-of-trust benchmark (for scripts/bench.sh, which appends stdout to docs/benchmarks.md):
# on a real swtpm, measured start, unseal, attestation round trip and full host start, then the
# time to deploy a signed release in waves to N simulated hosts (one swtpm each), same run.
# BENCH_ROT_ITERS (default 20), BENCH_ROT_HOSTS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TARGET=${CARGO_TARGET_DIR:-target}
$CARGO build --release -q -p bulkhead-rot --example rot_bench >&2
"$TARGET/release/examples/rot_bench" "${BENCH_ROT_ITERS:-20}" "${BENCH_ROT_HOSTS:-10}"
