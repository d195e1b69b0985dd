#!/usr/bin/env bash
# Quickstart act: the sealed host (issue 17). The host image `make host-image` builds (a kernel
# with no modules, no /dev/mem, no kexec, lockdown=confidentiality, and an initramfs holding only
# Bulkhead's PID 1, attestation agent and controller) boots under QEMU with OVMF firmware and its
# own swtpm, so the firmware measures the image into PCRs 4/9/11/12. The act runs the real
# sealed-host tests and prints what they found: one boot is scanned from the host network (every
# TCP and UDP port) and typed at on its serial console; then the host attests through its
# controller's mTLS port and the verifier accepts exactly the PCR values the image build
# computed, and the same image with `lockdown=none` on its command line is refused, naming the
# PCRs that moved. Last, `bulkhead up --sealed-hosts` runs a dev cluster whose hosts are that
# image under QEMU: its control plane attests each one's whole boot chain as it polls, and a host
# booted from the lockdown=none image is refused (host_attestation_failed). Needs root (network namespace, tap), qemu-system-x86, OVMF, swtpm and curl;
# without them the tests say loudly that they skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Act: a sealed host — no way in, measured from the firmware up"
if [ -z "$(ls -A "${BULKHEAD_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/host}" 2>/dev/null)" ]; then
  echo "(the host kernel is built once and cached: ~10 minutes on 2 cores; QEMU boots it under TCG, ~30 s a boot)"
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if cargo test --release -q -p bulkhead-hostinit --test sealed_host --test sealed_attest -- \
  --nocapture --test-threads=1 >"$out" 2>&1; then
  grep -E "^sealed host:|^sealed attest:|^tampered|SKIPPED|test result" "$out" | sed 's/^/  /'
else
  tail -n 40 "$out" | sed 's/^/  /'
  echo "*** the sealed-host act FAILED (output above) ***"
fi
say "bulkhead up --sealed-hosts: a cluster of sealed hosts, one booted from the tampered image"
if cargo test --release -q -p bulkhead-devcluster --test sealed_hosts -- --nocapture >"$out" 2>&1; then
  grep -E "^sealed hosts:|SKIPPED|test result" "$out" | sed 's/^/  /'
else
  tail -n 40 "$out" | sed 's/^/  /'
  echo "*** the sealed-cluster act FAILED (output above) ***"
fi
