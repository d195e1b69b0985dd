#!/usr/bin/env bash
# `make quickstart`: the main story on embedded defaults. Each act is a real run of the real
# daemons; nothing is simulated. Run from the repository root after `make deps guest build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
GUEST=${CARGO_TARGET_DIR:-target}/guest
ARGS=$(cat guest/cmdline)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
enc() { printf '%s' "$1" | guest/encode-run.sh; }

say "Act 1: the hypervisor boots a real Linux guest under KVM and shows its console"
echo "(this machine's KVM emulates guest kernel code in software: the boot takes 20-60 s)"
# Shell builtins only: on this machine every exec in the guest costs seconds.
script='n=0; while read -r l; do case "$l" in processor*) n=$((n+1));; esac; done </proc/cpuinfo
read -r v </proc/version; echo "hello from the guest: ${v%% (*}, $n vCPUs"
dd if=/dev/hwrng of=/r bs=8 count=1 2>/dev/null; md5sum /r >/s; read -r h f </s; echo "virtio-rng works: md5 of 8 random bytes = $h"'
"$BIN/bulkhead-hypervisor" run --kernel "$GUEST/vmlinux" --initrd "$GUEST/initramfs.cpio" \
  --memory-mib 128 --vcpus 2 --cmdline "$ARGS bulkhead.run=$(enc "$script")"
echo "(the guest powered off through the i8042 reset line; the hypervisor exited with status $?)"

say "Act: the root of trust — a host attests before it gets a volume key; a tampered host is refused"
cargo run --release -q -p bulkhead-rot --example quickstart_rot

for act in scripts/quickstart-*.sh; do
  [ -x "$act" ] && "$act"
done
say "Done. See README.md for usage and docs/ for the design, claims and benchmarks."
