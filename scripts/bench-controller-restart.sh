#!/usr/bin/env bash
# Controller restart → every instance adopted (issue 14): kill -9 the controller with N created
# VMs (each a running hypervisor process with an encrypted volume on its block card), start it
# again, ROUNDS times. Markdown on stdout, for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BULKHEAD_BENCH_INSTANCES:-2}
ROUNDS=${BULKHEAD_BENCH_ROUNDS:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "## Controller restart: every instance adopted"
echo
if ! BULKHEAD_GUEST_DIR="${BULKHEAD_GUEST_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/guest}" \
   BULKHEAD_BENCH_INSTANCES=$N BULKHEAD_BENCH_ROUNDS=$ROUNDS \
   cargo test -q --release -p bulkhead-controller --test restart -- --ignored --nocapture \
   bench_controller_restart_adopts_every_instance >"$log" 2>&1; then
  echo "Not measured: the benchmark failed (run \`scripts/bench-controller-restart.sh\` alone to see why)."
  echo
  exit 0
fi
grep -o 'RESTART-BENCH .*' "$log" | python3 -c '
import sys, statistics
ready, adopt = [], []
for line in sys.stdin:
    kv = dict(x.split("=", 1) for x in line.split()[1:])
    ready.append(float(kv["start_to_ready_ms"])); adopt.append(float(kv["adopt_ms"]))
def pct(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
n = kv["instances"]
print(f"{len(ready)} restarts of a controller holding {n} instances (created VMs: one hypervisor process and one")
print("keyed block card each), killed -9 each time. No peer: no other VMM here has a restartable")
print("management process to compare with.")
print()
print("| | p50 | p99 | max |")
print("|---|---|---|---|")
print(f"| new controller process start → ready (record read, keeper found, all adopted, audited) | {pct(ready,50):.0f} ms | {pct(ready,99):.0f} ms | {max(ready):.0f} ms |")
print(f"| adoption alone (channels taken over, Stats, card control reconnected, record written) | {pct(adopt,50):.0f} ms | {pct(adopt,99):.0f} ms | {max(adopt):.0f} ms |")
print()
'
