#!/usr/bin/env bash
# `make quickstart`: the main story on embedded defaults. Each act is a real run of the real
# daemons; nothing is simulated. Run from the repository root after `make deps guest build`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
GUEST=${CARGO_TARGET_DIR:-target}/guest
ARGS="console=ttyS0 reboot=k panic=-1 quiet noxsave clearcpuid=popcnt,cx16,smap"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
b64() { printf '%s' "$1" | base64 -w0; }

say "Act 1: the hypervisor boots a real Linux guest under KVM and shows its console"
echo "(this machine's KVM emulates guest kernel code in software: the boot takes 20-60 s)"
script='echo "hello from the guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPUs"
echo "random bytes from virtio-rng: $(head -c 8 /dev/hwrng | od -An -tx1 | tr -d " ")"'
"$BIN/bulkhead-hypervisor" run --kernel "$GUEST/vmlinux" --initrd "$GUEST/initramfs.cpio" \
  --memory-mib 128 --vcpus 2 --cmdline "$ARGS bulkhead.run=$(b64 "$script")"
echo "(the guest powered off through the i8042 reset line; the hypervisor exited with status $?)"

for act in scripts/quickstart-*.sh; do
  [ -x "$act" ] && "$act"
done
say "Done. See README.md for usage and docs/ for the design, claims and benchmarks."
