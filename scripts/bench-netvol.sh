#!/usr/bin/env bash
# Network-volume benchmark (issue 15): 4 KiB random read/write at QD 1 and 32, 1 MiB sequential
# read/write, on a volume of a real bulkhead-storage node (file engine) on this machine, through
#   (a) the block card as the node's NBD-over-TLS client, AES-256-XTS (4 KiB crypto sectors),
#   (b) the same card on the same volume, plain (unencrypted),
#   (c) qemu-storage-daemon's nbd client (tls-creds-x509, the same host certificate) under a LUKS
#       layer (aes-xts-plain64, AES-256, LUKS1: QEMU 7.2 cannot open LUKS2) — the peer,
#   (d) the same qemu-storage-daemon without LUKS (transport reference),
# all driven by the card benchmark's vhost-user frontend (crates/blockcard/examples/blkbench.rs),
# in alternating rounds, medians. The driver is scripts/bench_netvol.py.
# Prints the "Network volume" markdown section on stdout (progress on stderr), so scripts/bench.sh
# can append it to docs/benchmarks.md. Run alone on a terminal, or with BENCH_OUT set, it also
# replaces its section (between markers) in that file.
#
# Env: BENCH_SECONDS (per workload, default 3), BENCH_ROUNDS (default 3), BENCH_SIZE_MB (volume,
#      default 256), BENCH_OUT (file to update). Run as root (the card and the node drop to nobody).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${BENCH_OUT:-}
if [ -z "$OUT" ] && [ -t 1 ]; then OUT=docs/benchmarks.md; fi
exec 3>&1 1>&2
cargo build -q --release -p bulkhead-blockcard --bins --examples || echo "bench-netvol: build of bulkhead-blockcard FAILED" >&2
cargo build -q --release -p bulkhead-storage --bins || echo "bench-netvol: build of bulkhead-storage FAILED" >&2
section=$(mktemp)
trap 'rm -f "$section"' EXIT
rc=0
python3 scripts/bench_netvol.py > "$section" || rc=$?
cat "$section" >&3
if [ -n "$OUT" ]; then
  python3 - "$OUT" "$section" <<'PY'
import os, sys
out, sec = sys.argv[1], open(sys.argv[2]).read().strip("\n")
doc = open(out).read() if os.path.exists(out) else "# Benchmarks\n"
b, e = "<!-- netvol:begin -->", "<!-- netvol:end -->"
if b in doc and e in doc:
    doc = doc[:doc.index(b)] + sec + doc[doc.index(e) + len(e):]
else:
    doc = doc.rstrip("\n") + "\n\n" + sec + "\n"
open(out, "w").write(doc)
PY
  echo "bench-netvol: updated $OUT"
fi
exit $rc
