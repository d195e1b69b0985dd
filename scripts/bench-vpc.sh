#!/usr/bin/env bash
# VPC benchmark with real guests: two `bulkhead-hypervisor run` guests talking through
# `bulkhead-netcard vhost` cards, sealed vs --plain in the same boot, and boot-to-network time.
# Prints a markdown section on stdout (see scripts/bench_vpc.py for the method and the knobs).
set -uo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-$PWD/target}
if [ ! -x "$T/release/bulkhead-netcard" ] || [ ! -x "$T/release/bulkhead-hypervisor" ]; then
  cargo build -q --release -p bulkhead-netcard -p bulkhead-hypervisor --bins >&2 || true
fi
exec python3 scripts/bench_vpc.py
