#!/usr/bin/env bash
# Sealed host benchmark (issue 17), markdown on stdout: power-on → attested and ready, p50 of
# BENCH_SEALED_RUNS (default 5) one-host clusters `bulkhead-devcluster up --hosts 1
# --sealed-hosts` (the host image under QEMU TCG + OVMF + its own swtpm; "attested" is the control
# plane's boot-chain verdict), beside one-host clusters of host processes (`up --hosts 1`), and the
# image's size. Each run is a whole cluster (CA, KMS, token service, control plane) started from
# nothing; both columns are measured from `up`'s start. Needs root, qemu-system-x86_64, OVMF,
# swtpm and the release binaries; the host kernel is built once (`make host-image`).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
N=${BENCH_SEALED_RUNS:-5}
bin="$TARGET/release/bulkhead-devcluster"
scripts/build-host-image.sh "$TARGET/host-image" >&2
[ -x "$bin" ] || { echo "bench-sealed-host: $bin missing (make build)" >&2; exit 1; }

# run_up OUTFILE ARGS...: starts `up`, waits for its ready line, stops it; prints the seconds
# from start to ready.
run_up() {
  local out=$1; shift
  local dir; dir=$(mktemp -d -t bulkhead-bench-sealed-up.XXXXXX)
  local t0; t0=$(date +%s.%N)
  "$bin" up --dir "$dir" --hosts 1 "$@" >"$out" 2>"$dir/up.log" &
  local pid=$!
  until grep -q '"event":"ready"' "$out" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "bench-sealed-host: up $* failed:" >&2; tail -n 20 "$dir/up.log" >&2
      rm -rf "$dir"; return 1
    fi
    sleep 0.1
  done
  local t1; t1=$(date +%s.%N)
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "$t1 - $t0" | bc
}

p50() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

tmp=$(mktemp -d -t bulkhead-bench-sealed.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
: >"$tmp/sealed_up"; : >"$tmp/sealed_attested"; : >"$tmp/sealed_ready"; : >"$tmp/proc_up"
for i in $(seq "$N"); do
  run_up "$tmp/out" --sealed-hosts --host-image "$TARGET/host-image" >>"$tmp/sealed_up"
  grep -q "host-1: attested" "$tmp/out" || { echo "bench-sealed-host: run $i not attested:" >&2; cat "$tmp/out" >&2; exit 1; }
  # `up` prints "attested (AK certified by its TPM's EK; PCRs 4, 9, 11, 12, 23 exact) S s after
  # power-on" and "controller ready S s after power-on"; a line that no longer matches is a loud
  # failure, never a silent exit of the pipeline.
  att=$(grep -o 'attested ([^)]*PCRs 4, 9, 11, 12, 23 exact) [0-9.]* s' "$tmp/out" | awk '{print $(NF-1)}' || true)
  rdy=$(grep -o 'controller ready [0-9.]* s after power-on' "$tmp/out" | awk '{print $3}' || true)
  if [ -z "$att" ] || [ -z "$rdy" ]; then
    echo "bench-sealed-host: run $i: no 'attested (...) S s' or 'controller ready S s' line in up's output:" >&2
    cat "$tmp/out" >&2; exit 1
  fi
  echo "$att" >>"$tmp/sealed_attested"; echo "$rdy" >>"$tmp/sealed_ready"
  run_up "$tmp/out" >>"$tmp/proc_up"
done
uki=$(stat -c %s "$TARGET/host-image/bulkhead-host.efi")
echo "## Sealed host (issue 17)"
echo
echo "One-host clusters started from nothing, $N runs each, on this machine (QEMU TCG: no OVMF under"
echo "its KVM). Sealed: the host image under QEMU + OVMF + its own swtpm, 'attested' = the control"
echo "plane's verdict on its whole boot chain (PCRs 4, 9, 11, 12, 23 exact). Process host: the"
echo "controller as a host process (with its own swtpm and measured start when swtpm is present)."
echo
echo "| p50 of $N | sealed host | host of host processes |"
echo "|---|---|---|"
printf '| power-on → controller ready | %.1f s | — |\n' "$(p50 <"$tmp/sealed_ready")"
printf '| power-on → attested | %.1f s | (attested at first placement) |\n' "$(p50 <"$tmp/sealed_attested")"
printf '| `up` start → cluster ready | %.1f s | %.1f s |\n' "$(p50 <"$tmp/sealed_up")" "$(p50 <"$tmp/proc_up")"
echo
printf 'Image: UKI %.1f MB (kernel + initramfs of bulkhead-init, bulkhead-host-agent, bulkhead-controller and their libraries).\n' "$(echo "$uki / 1000000" | bc -l)"
