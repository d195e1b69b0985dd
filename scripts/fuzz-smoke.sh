#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 10 s each).
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them, since this machine can only have one toolchain.
#
# All targets live in one package (fuzz/Cargo.toml), so the sanitizer build of their dependency
# tree happens once. A target's source, seeds and corpus stay beside its crate
# (crates/<crate>/fuzz/); a target file that fuzz/Cargo.toml does not list is an error, so no
# target is silently left out.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECONDS:-10}
export RUSTC_BOOTSTRAP=1
FUZZ_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
# name<TAB>directory holding fuzz_targets/, seeds/ and corpus/ of that target<TAB>file stem
targets=$(python3 - <<'PY'
import glob, os, sys, tomllib
bins = tomllib.load(open("fuzz/Cargo.toml", "rb"))["bin"]
listed = {os.path.normpath(os.path.join("fuzz", b["path"])) for b in bins}
missing = [f for f in glob.glob("fuzz/fuzz_targets/*.rs") + glob.glob("crates/*/fuzz/fuzz_targets/*.rs")
           if os.path.normpath(f) not in listed]
if missing:
    sys.exit("fuzz-smoke: not listed in fuzz/Cargo.toml: " + " ".join(sorted(missing)))
for b in bins:
    src = os.path.normpath(os.path.join("fuzz", b["path"]))
    print(f"{b['name']}\t{os.path.dirname(os.path.dirname(src))}\t{os.path.basename(src)[:-3]}")
PY
)
echo "fuzz-smoke: building $(echo "$targets" | wc -l) targets"
cargo fuzz build --fuzz-dir "$PWD/fuzz" --target-dir "$FUZZ_TARGET_DIR"
bin_dir="$FUZZ_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"
ran=0
while IFS=$'\t' read -r name dir stem; do
  echo "fuzz-smoke: $name ($dir) for ${SECS}s"
  corpus="$PWD/$dir/corpus/$stem"
  mkdir -p "$corpus"
  [ -d "$dir/seeds/$stem" ] && cp -n "$dir/seeds/$stem"/* "$corpus"/ 2>/dev/null || true
  artifacts="$PWD/$dir/artifacts/$stem"
  mkdir -p "$artifacts"
  # The binary cargo fuzz built above, run directly: a `cargo fuzz run` per target would only
  # re-check the build. A crash exits non-zero and fails the script (pipefail).
  "$bin_dir/$name" "$corpus" -artifact_prefix="$artifacts/" -max_total_time="$SECS" \
      -rss_limit_mb=2048 -print_final_stats=1 < /dev/null 2>&1 | tail -n 3
  ran=$((ran + 1))
done <<< "$targets"
echo "fuzz-smoke: $ran targets ran without a crash"
