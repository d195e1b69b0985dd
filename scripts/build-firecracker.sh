#!/usr/bin/env bash
# Builds Firecracker (a pinned release) from its public source as a benchmark peer and caches the
# binary, so `make bench` builds it once, like the test guest.
#
#   scripts/build-firecracker.sh          # prints the path of the cached binary on stdout
#
# Source, in this order:
#   1. $FIRECRACKER_SRC: a git checkout or a bare git directory holding the tag below (the tree of
#      the tag is exported through a scratch index; blobs the repository does not hold, e.g. a test
#      fixture missing from a partial mirror, are left out and named), or an unpacked source tree of
#      that release (its src/firecracker/Cargo.toml must carry the version).
#   2. a shallow clone of the tag from GitHub, when the network allows it.
#   Neither: a LOUD skip on stderr and exit status 3 (the bench prints "not measured" and why).
#
# Build: `cargo build --release -p firecracker` (the release profile of the release: LTO,
# panic=abort) for x86_64-unknown-linux-musl when that Rust target is installed, else for
# x86_64-unknown-linux-gnu. Firecracker ships a seccomp filter only for musl; for a gnu build its
# build script compiles resources/seccomp/unimplemented.json (an empty, allow-all policy) instead.
# The bench discloses which of the two ran (see the build-info file next to the binary).
# Dependencies come from crates.io through cargo. Toolchain: the release's rust-toolchain.toml
# channel when installed (RUSTUP_TOOLCHAIN overrides it, so rustup does not try to add targets).
#
# Cache: ${CARGO_TARGET_DIR:-target}/peers/firecracker/<tag>/{firecracker,build-info.txt}; the
# cargo build directory beside it is removed after a successful build unless FIRECRACKER_KEEP_BUILD=1.
set -euo pipefail

tag=v1.16.1
version=${tag#v}

die() { echo "build-firecracker: $*" >&2; exit 1; }
log() { echo "build-firecracker: $*" >&2; }
skip() {
  {
    echo "################################################################################"
    echo "build-firecracker: SKIPPED — $*"
    echo "build-firecracker: set FIRECRACKER_SRC to a firecracker git checkout/dir with tag $tag"
    echo "################################################################################"
  } >&2
  exit 3
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
base=$target_dir/peers/firecracker
out=$base/$tag
bin=$out/firecracker

if [ -x "$bin" ] && [ -f "$out/build-info.txt" ]; then
  log "cache hit: $bin"
  echo "$bin"
  exit 0
fi

mkdir -p "$base"
exec 9>"$base/lock"
flock 9
if [ -x "$bin" ] && [ -f "$out/build-info.txt" ]; then echo "$bin"; exit 0; fi

src=$base/src-$tag
rm -rf "$src" "$src.tmp"
mkdir -p "$src.tmp"

export_git() { # $1: git dir
  local g=$1 c missing
  c=$(git --git-dir="$g" rev-parse -q --verify "$tag^{commit}") || return 1
  # Paths whose blobs are absent (partial mirrors) are excluded by name, so the export cannot
  # silently drop anything else.
  missing=$(git --git-dir="$g" ls-tree -r "$c" | awk '$2=="blob"{print $3" "$4}' |
    while read -r h p; do git --git-dir="$g" cat-file -e "$h" 2>/dev/null || echo "$p"; done)
  # git archive stops at the first absent blob, so the tree goes through a scratch index instead.
  local idx
  idx=$(mktemp)
  GIT_INDEX_FILE=$idx git --git-dir="$g" read-tree "$c"
  if [ -n "$missing" ]; then
    while IFS= read -r p; do
      log "source lacks $p (left out)"
      GIT_INDEX_FILE=$idx git --git-dir="$g" update-index --force-remove -- "$p"
    done <<<"$missing"
  fi
  GIT_INDEX_FILE=$idx git --git-dir="$g" --work-tree="$src.tmp" checkout-index -a -f --prefix="$src.tmp/"
  rm -f "$idx"
  echo "$c" >"$src.tmp/.source-commit"
}

if [ -n "${FIRECRACKER_SRC:-}" ]; then
  s=$FIRECRACKER_SRC
  if [ -d "$s/.git" ]; then s=$s/.git; fi
  if git --git-dir="$s" rev-parse -q --verify HEAD >/dev/null 2>&1 || [ -f "$s/HEAD" ]; then
    export_git "$s" || skip "FIRECRACKER_SRC ($s) has no tag $tag"
    how="export of $tag from FIRECRACKER_SRC"
  elif [ -f "$s/src/firecracker/Cargo.toml" ]; then
    grep -q "^version = \"$version\"" "$s/src/firecracker/Cargo.toml" ||
      skip "FIRECRACKER_SRC ($s) is not Firecracker $version"
    cp -a "$s/." "$src.tmp/"
    echo unknown >"$src.tmp/.source-commit"
    how="source tree from FIRECRACKER_SRC"
  else
    skip "FIRECRACKER_SRC ($s) is neither a git directory nor a Firecracker source tree"
  fi
else
  g=$base/clone-$tag.git
  rm -rf "$g"
  if timeout 120 git clone -q --bare --depth 1 --branch "$tag" \
       https://github.com/firecracker-microvm/firecracker "$g" 2>/dev/null; then
    export_git "$g" || skip "the clone has no tag $tag"
    rm -rf "$g"
    how="shallow clone of $tag from GitHub"
  else
    rm -rf "$g"
    skip "no FIRECRACKER_SRC and GitHub is not reachable"
  fi
fi
mv "$src.tmp" "$src"
grep -q "^version = \"$version\"" "$src/src/firecracker/Cargo.toml" ||
  die "exported source is not Firecracker $version"

want_tc=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$src/rust-toolchain.toml" 2>/dev/null || true)
if [ -n "${RUSTUP_TOOLCHAIN:-}" ]; then tc=$RUSTUP_TOOLCHAIN
elif [ -n "$want_tc" ] && rustup toolchain list 2>/dev/null | grep -q "^$want_tc"; then tc=$want_tc
else tc=stable; fi
if rustup +"$tc" target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  triple=x86_64-unknown-linux-musl
  seccomp="the release's default filter (resources/seccomp/$triple.json)"
else
  triple=x86_64-unknown-linux-gnu
  seccomp="none in effect: gnu build, so the build script compiled resources/seccomp/unimplemented.json (empty policy)"
fi

# The release pins one git dependency (micro_http, by commit, in Cargo.lock; cargo also fetches
# its rust-vmm-ci submodule, CI scripts only). Where GitHub is not reachable,
# FIRECRACKER_MICRO_HTTP_SRC and FIRECRACKER_RUST_VMM_CI_SRC (git directories holding those commits)
# stand in for their URLs through git's url.<base>.insteadOf; the pinned commits are still the ones
# built.
gitcfg=(CARGO_NET_GIT_FETCH_WITH_CLI=true)
n=0
mirror() { # $1: URL, $2: git dir
  local d=$2
  [ -d "$d/.git" ] && d=$d/.git
  gitcfg+=("GIT_CONFIG_KEY_$n=url.file://$d.insteadOf" "GIT_CONFIG_VALUE_$n=$1")
  n=$((n + 1))
  how="$how; ${1##*/} from a local mirror"
}
[ -z "${FIRECRACKER_MICRO_HTTP_SRC:-}" ] ||
  mirror https://github.com/firecracker-microvm/micro-http "$FIRECRACKER_MICRO_HTTP_SRC"
[ -z "${FIRECRACKER_RUST_VMM_CI_SRC:-}" ] ||
  mirror https://github.com/rust-vmm/rust-vmm-ci.git "$FIRECRACKER_RUST_VMM_CI_SRC"
if [ $n -gt 0 ]; then
  gitcfg+=("GIT_CONFIG_KEY_$n=protocol.file.allow" "GIT_CONFIG_VALUE_$n=always")
  gitcfg+=("GIT_CONFIG_COUNT=$((n + 1))")
fi
log "building Firecracker $tag ($how) for $triple with toolchain $tc in $base/build"
start=$(date +%s)
(cd "$src" && env "${gitcfg[@]}" RUSTUP_TOOLCHAIN=$tc CARGO_TARGET_DIR=$base/build \
   cargo build -q --release -p firecracker --bin firecracker --target "$triple") >&2
secs=$(( $(date +%s) - start ))
log "built in $secs s"

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "$base/build/$triple/release/firecracker" "$out.tmp/firecracker"
{
  echo "firecracker $tag commit $(cat "$src/.source-commit")"
  echo "source: $how"
  echo "target: $triple; toolchain: $(RUSTUP_TOOLCHAIN=$tc rustc --version)"
  echo "seccomp: $seccomp"
  echo "build: cargo build --release -p firecracker ($secs s)"
} >"$out.tmp/build-info.txt"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$src"
[ -n "${FIRECRACKER_KEEP_BUILD:-}" ] || rm -rf "$base/build"
cat "$out/build-info.txt" >&2
echo "$bin"
