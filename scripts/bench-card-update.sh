#!/usr/bin/env bash
# Block card update → I/O resumed (issue 14): a keyed block card replaced 20 times by a new card
# process under continuous, checked 4 KiB random I/O (QD 1 and QD 32), against
# qemu-storage-daemon restarted on the same socket under the same frontend. The bench itself is
# crates/hypervisor/benches/card_update.rs (how it drives the hand-over: its header).
# Prints the markdown section on stdout (progress on stderr). A card that does not build, a wrong
# status, a wrong read or a request that never completes fails it: exit 1, with the reason in the
# section and on stderr. Builds into $CARGO_TARGET_DIR when set (cargo's own rule), else target/.
# Needs root (the card drops to uid 65534).
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! cargo build -q --release -p bulkhead-blockcard --bins >"$log" 2>&1; then
  cat "$log" >&2
  printf '## Block card update → I/O resumed\n\n**FAILED**: bulkhead-blockcard did not build (run `scripts/bench-card-update.sh` alone to see why).\n\n'
  echo "bench-card-update: FAILED (the card did not build, see above)" >&2
  exit 1
fi
if cargo bench -q -p bulkhead-hypervisor --bench card_update 2>"$log"; then
  exit 0
fi
cat "$log" >&2
printf '## Block card update → I/O resumed\n\n**FAILED**: %s\n\n' \
  "$(grep -m1 -A1 'panicked' "$log" | tail -1 | sed 's/[`|]//g')"
echo "bench-card-update: FAILED (see above)" >&2
exit 1
