#!/usr/bin/env bash
# `make bench`: runs every benchmark with its peer in the same run and writes docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/benchmarks.md
tmp=$(mktemp)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` on $(date -u +%Y-%m-%dT%H:%MZ). Every figure has its peer measured in the"
  echo "same run; ratios are Bulkhead / peer. Each Bulkhead-vs-peer table is also drawn as a chart"
  echo "(docs/charts/, linked under its heading; \`scripts/bench_charts.py\`, run last by \`make bench\`)."
  echo
  echo "## Machine"
  echo
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "- Memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
  echo "- /dev/kvm: $(if [ -e /sys/module/kvm_pvm ]; then echo 'kvm_pvm (software KVM: guest kernel code is emulated)'; elif [ -e /dev/kvm ]; then echo 'hardware KVM'; else echo absent; fi)"
  echo "- Load while measuring (1-min load average at start): $(cut -d' ' -f1 /proc/loadavg)"
  echo
} > "$tmp"
python3 scripts/bench_hypervisor.py >> "$tmp"
BULKHEAD_GUEST_DIR="${CARGO_TARGET_DIR:-$PWD/target}/guest" cargo bench -q -p bulkhead-hypervisor --bench hotplug 2>/dev/null >> "$tmp" \
  || echo "## Hot-plug: Bulkhead vs QEMU q35"$'\n\n'"Not measured: the benchmark failed (run it alone to see why)."$'\n' >> "$tmp"
BULKHEAD_GUEST_DIR="${CARGO_TARGET_DIR:-$PWD/target}/guest" cargo bench -q -p bulkhead-hypervisor --bench live_update 2>/dev/null >> "$tmp" \
  || echo "## Live update: Bulkhead vs QEMU local migration (shared memory)"$'\n\n'"Not measured: the benchmark failed (run it alone to see why)."$'\n' >> "$tmp"
for extra in scripts/bench-blockcard.sh scripts/bench-controller.sh scripts/bench-controller-restart.sh scripts/bench-card-update.sh scripts/bench-rot.sh scripts/bench-control.sh scripts/bench-netcard.sh scripts/bench-vpc.sh; do
  if [ -x "$extra" ]; then "$extra" >> "$tmp"; fi
done
scripts/bench-netvol.sh >> "$tmp" || echo "bench: scripts/bench-netvol.sh FAILED (its section in $out says why)" >&2
scripts/bench-sealed-host.sh >> "$tmp" \
  || echo "## Sealed host (issue 17)"$'\n\n'"Not measured: the benchmark failed or cannot run here (needs root, QEMU, OVMF, swtpm; run scripts/bench-sealed-host.sh alone to see why)."$'\n' >> "$tmp"
echo >> "$tmp"
python3 scripts/bench_attach.py >> "$tmp"
mv "$tmp" "$out"
echo "bench: wrote $out"
python3 scripts/bench_charts.py || echo "bench: scripts/bench_charts.py made no chart (see above)" >&2
