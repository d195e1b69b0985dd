#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 20 s each).
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them, since this machine can only have one toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECONDS:-15}
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
ran=0
for dir in fuzz crates/*/fuzz; do
  [ -f "$dir/Cargo.toml" ] || continue
  abs="$PWD/$dir"
  for t in $(cd "$dir/.." && cargo fuzz list --fuzz-dir "$abs" 2>/dev/null); do
    echo "fuzz-smoke: $dir/$t for ${SECS}s"
    corpus="$abs/corpus/$t"
    mkdir -p "$corpus"
    [ -d "$abs/seeds/$t" ] && cp -n "$abs/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    (cd "$dir/.." && cargo fuzz run --fuzz-dir "$abs" "$t" "$corpus" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 3)
    ran=$((ran + 1))
  done
done
echo "fuzz-smoke: $ran targets ran without a crash"
