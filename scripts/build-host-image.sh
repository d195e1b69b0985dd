#!/usr/bin/env bash
# Builds the Bulkhead sealed host image: a Linux 6.1 EFI-stub kernel configured for a host, an
# initramfs holding only Bulkhead's binaries (PID 1 `bulkhead-init`, `bulkhead-controller`,
# `bulkhead-launcher`), the exact shared libraries they load and their configuration, and a
# unified kernel image (UKI) that OVMF boots and measures. Writes to the directory given as $1:
#
#   bzImage  initramfs.cpio  cmdline  os-release  bulkhead-host.efi  manifest.json  digest
#
#   scripts/build-host-image.sh target/host-image       (= make host-image)
#
# Inputs: Debian's linux-source-6.1, systemd-boot-efi (linuxx64.efi.stub) and binutils (objcopy),
# host/kernel.config (merged on top of `make tinyconfig`), host/cmdline, host/os-release,
# host/controller.toml, the release binaries in $CARGO_TARGET_DIR/release (built first unless
# BULKHEAD_HOST_NO_CARGO=1) and this script. The kernel is cached outside the repository, keyed
# by the SHA-256 of its inputs only (kernel source, compiler, kernel.config and the text of
# build_kernel below):
#   ${BULKHEAD_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/host}/<key>/
# Everything else is packed on every run, deterministically (fixed timestamps, sorted entries),
# so the same inputs give the same `digest` (the SHA-256 of the UKI). See host/README.md.
#
# For tests only (crates/hostinit/tests/sealed_tamper.rs, sealed_attest.rs, image_reproducible.rs,
# crates/devcluster/tests/sealed_hosts.rs): BULKHEAD_HOST_CMDLINE replaces the command line;
# BULKHEAD_HOST_TAMPER flips one byte of the staged copy of a part, never of the cached kernel,
# in a string nothing reads at run time, so the tampered image still boots and serves and only
# its measurements change:
#   kernel  the bzImage's setup-header version string (`6.1.x (bulkhead@...`: `b` -> `B`)
#   binary  bulkhead-controller's `--backend` help text (`nothing runs`: `n` -> `N`)
# Either one needs BULKHEAD_TEST_ONLY=1 and an output directory that is absent or empty, never
# $CARGO_TARGET_DIR/host-image. The manifest marks such an image: `tamper` names the flipped
# byte, `cmdline_override: true` (with `cmdline`, the command line used) a replaced command line;
# the verifiers refuse a marked manifest as expectations (crates/rot/src/boot.rs, TestImage).
set -euo pipefail

die() { echo "build-host-image: $*" >&2; exit 1; }
log() { echo "build-host-image: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 <output-dir>"
out_dir=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tamper=${BULKHEAD_HOST_TAMPER:-}
case "$tamper" in
  ""|kernel|binary) ;;
  *) die "BULKHEAD_HOST_TAMPER=$tamper: want kernel or binary" ;;
esac
cmdline_override=${BULKHEAD_HOST_CMDLINE:+1}
if [ -n "$tamper" ] || [ -n "$cmdline_override" ]; then
  what="${tamper:+BULKHEAD_HOST_TAMPER=$tamper}${tamper:+${cmdline_override:+ and }}${cmdline_override:+BULKHEAD_HOST_CMDLINE}"
  [ "${BULKHEAD_TEST_ONLY:-}" = 1 ] ||
    die "$what builds a test image: set BULKHEAD_TEST_ONLY=1 to mean it"
  default_out=$(realpath -m "${CARGO_TARGET_DIR:-$repo/target}/host-image")
  [ "$(realpath -m "$out_dir")" != "$default_out" ] ||
    die "a test image ($what) goes to its own directory, not $out_dir"
  if [ -e "$out_dir" ] && { [ ! -d "$out_dir" ] || [ -n "$(ls -A "$out_dir")" ]; }; then
    die "a test image ($what) goes to a new or empty directory: $out_dir is not empty"
  fi
fi
host=$repo/host
kernel_tar=/usr/src/linux-source-6.1.tar.xz
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
jobs=${BULKHEAD_GUEST_JOBS:-2}
# Fixed timestamps and names make the output independent of when and where it is built.
epoch=1700000000
export SOURCE_DATE_EPOCH=$epoch

for f in "$kernel_tar" "$stub"; do
  [ -e "$f" ] || die "$f is missing: run 'make deps' (packages linux-source-6.1, systemd-boot-efi)"
done
command -v objcopy >/dev/null || die "objcopy is missing: run 'make deps' (binutils)"
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# --- kernel build (cached; runs under a lock, so concurrent runs build once) -----------------
cache_root=${BULKHEAD_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/host}
mkdir -p "$cache_root"

build_kernel() {
  rm -rf "$cache_root"/work-* "$cache_root"/stage-*
  mkdir -p "$work"
  log "cache miss ($key): building in $work"

  log "unpacking $kernel_tar"
  tar -xJf "$kernel_tar" -C "$work"
  local src=$work/linux-source-6.1
  [ -d "$src" ] || die "unexpected layout of $kernel_tar"

  export KBUILD_BUILD_TIMESTAMP="@$epoch" KBUILD_BUILD_USER=bulkhead \
         KBUILD_BUILD_HOST=bulkhead KBUILD_BUILD_VERSION=1
  local mk=(make -s -C "$src" ARCH=x86_64 "-j$jobs")
  "${mk[@]}" tinyconfig >/dev/null
  (cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m -O . .config \
      "$host/kernel.config" >/dev/null)
  "${mk[@]}" olddefconfig >/dev/null

  # Every line of the fragment must survive olddefconfig; a dropped dependency fails here.
  local line sym bad=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) grep -qxF "$line" "$src/.config" || { log "kernel.config: $line did not stick"; bad=1; } ;;
      "# CONFIG_"*" is not set")
                  sym=${line#\# }; sym=${sym%% *}
                  if grep -q "^$sym=" "$src/.config"; then log "kernel.config: $sym is still set"; bad=1; fi ;;
    esac
  done <"$host/kernel.config"
  [ $bad -eq 0 ] || die "host/kernel.config does not apply cleanly to tinyconfig"

  log "building bzImage (make -j$jobs)"
  "${mk[@]}" bzImage
  [ "$(head -c2 "$src/arch/x86/boot/bzImage")" = MZ ] || die "bzImage has no EFI (PE) header"
  [ -x "$src/usr/gen_init_cpio" ] || "${mk[@]}" usr/gen_init_cpio

  local stage=$cache_root/stage-$key
  rm -rf "$stage"
  mkdir -p "$stage"
  cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
  cp "$src/.config" "$stage/kernel.config.full"
  cp "$src/usr/gen_init_cpio" "$stage/gen_init_cpio"
  rm -rf "$cache"
  mv "$stage" "$cache"
}

key_input() {
  echo "build-host-image kernel cache key v1"
  echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
  echo "gcc $(gcc -dumpfullversion 2>/dev/null || echo unknown)"
  echo "binutils $(ld --version 2>/dev/null | head -n1)"
  declare -f build_kernel
  echo "host/kernel.config $(sha256sum <"$host/kernel.config" | cut -d' ' -f1)"
}
key=$(key_input | sha256sum | cut -d' ' -f1)
cache=$cache_root/$key
work=$cache_root/work-$key

exec 9>"$cache_root/lock"
flock 9
if [ -f "$cache/bzImage" ] && [ -x "$cache/gen_init_cpio" ]; then
  log "kernel cache hit ($key)"
elif [ -n "${BULKHEAD_HOST_REQUIRE_CACHE:-}" ]; then
  echo "build-host-image: kernel not cached ($key): run 'make host-image' first" >&2
  exit 3
else
  start=$(date +%s)
  build_kernel
  log "kernel built in $(( $(date +%s) - start )) s"
fi
flock -u 9
if [ -d "$work" ] && [ -z "${BULKHEAD_GUEST_KEEP_WORK:-}" ]; then
  rm -rf "$work"
fi
[ -n "${BULKHEAD_HOST_KERNEL_ONLY:-}" ] && exit 0

# --- Bulkhead binaries (release), stripped copies ---------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bins=(bulkhead-init bulkhead-host-agent bulkhead-controller)
# Loaded with dlopen (tss2-tctildr picks the TCTI at run time), so ldd does not list them.
dlopened=(libtss2-tcti-device.so.0)
if [ -z "${BULKHEAD_HOST_NO_CARGO:-}" ]; then
  log "building ${bins[*]} (cargo --release)"
  (cd "$repo" && cargo build --release -q -p bulkhead-hostinit -p bulkhead-controller --bins)
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"
for b in "${bins[@]}"; do
  [ -x "$target_dir/release/$b" ] || die "$target_dir/release/$b is missing (cargo build --release)"
  objcopy --strip-all "$target_dir/release/$b" "$stage/bin/$b"
done

# Flips one byte of FILE (the staged copy) for BULKHEAD_HOST_TAMPER (MODE kernel or binary) and
# prints what it did; fails when the string is not found exactly where it is expected.
flip_byte() {
  python3 - "$1" "$2" <<'PY'
import struct, sys
path, mode = sys.argv[1], sys.argv[2]
b = bytearray(open(path, "rb").read())
if mode == "kernel":
    # Setup header (Documentation/x86/boot.rst): "HdrS" at 0x202, kernel_version at 0x20e points
    # at the version string (offset - 0x200). Only boot loaders that print it read it.
    assert b[0x202:0x206] == b"HdrS", "no x86 setup header"
    start = struct.unpack_from("<H", b, 0x20E)[0] + 0x200
    text = bytes(b[start:b.index(b"\0", start)])
    assert b" (bulkhead@" in text, f"unexpected version string {text!r}"
    off = start + text.index(b" (bulkhead@") + 2
elif mode == "binary":
    needle = b"explicit fallback: nothing runs"
    assert b.count(needle) == 1, f"{needle!r} occurs {b.count(needle)} times, want once"
    off = b.find(needle) + needle.index(b"nothing")
else:
    sys.exit(f"unknown tamper {mode}")
before = b[off]
b[off] ^= 0x20
open(path, "wb").write(b)
print(f"{mode}: {path.rsplit('/', 1)[-1]} byte {off:#x} {before:#04x} -> {b[off]:#04x}")
PY
}
: >"$stage/tamper"
if [ "$tamper" = binary ]; then
  flip_byte "$stage/bin/bulkhead-controller" binary >"$stage/tamper"
  log "TAMPERED (tests only): $(cat "$stage/tamper")"
fi
cp "$host/os-release" "$stage/os-release"

# The binaries are dynamically linked (glibc; the TPM code links tpm2-tss): the initramfs holds
# exactly the shared objects the dynamic loader resolves for them (ldd's closure), at the paths
# it resolves them to, with the contents of the files those paths point at.
extra=()
for l in "${dlopened[@]}"; do
  # awk reads all of ldconfig's output: exiting at the first match would kill ldconfig with
  # SIGPIPE mid-write, and under pipefail that fails the assignment (and the script) at random.
  p=$(ldconfig -p | awk -v l="$l" '$1 == l && /x86-64/ && p == "" { p = $NF } END { print p }')
  [ -n "$p" ] || die "$l is missing (package libtss2-dev)"
  extra+=("$p")
done
libs=$( (for b in "${bins[@]}"; do ldd "$stage/bin/$b"; done; for l in "${extra[@]}"; do echo "	$l (0x0)"; ldd "$l"; done) |
  sed -n -e 's/^.*=> \(\/[^ ]*\) (0x.*$/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*$/\1/p' |
  LC_ALL=C sort -u)
[ -n "$libs" ] || die "ldd found no libraries (is the dynamic loader missing?)"

# --- initramfs: every entry sorted, uid 0, fixed mtime ----------------------------------------
spec=$stage/initramfs.spec
{
  echo "dir /dev 0755 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  echo "dir /proc 0555 0 0"
  echo "dir /sys 0555 0 0"
  echo "dir /run 0755 0 0"
  echo "dir /usr 0755 0 0"
  echo "dir /usr/bin 0755 0 0"
  echo "file /init $stage/bin/bulkhead-init 0500 0 0"
  echo "file /usr/bin/bulkhead-controller $stage/bin/bulkhead-controller 0500 0 0"
  echo "file /usr/bin/bulkhead-host-agent $stage/bin/bulkhead-host-agent 0500 0 0"
  echo "dir /etc 0755 0 0"
  echo "file /etc/os-release $stage/os-release 0444 0 0"
  dirs=$(for l in $libs; do d=$(dirname "$l"); while [ "$d" != / ]; do echo "$d"; d=$(dirname "$d"); done; done | LC_ALL=C sort -u)
  for d in $dirs; do
    case "$d" in /usr|/usr/bin|/etc|/run|/dev|/proc|/sys) ;; *) echo "dir $d 0755 0 0" ;; esac
  done
  for l in $libs; do
    mkdir -p "$stage/root$(dirname "$l")"
    cp "$(readlink -f "$l")" "$stage/root$l"
    echo "file $l $stage/root$l 0555 0 0"
  done
} | LC_ALL=C sort -k2,2 >"$spec"
# gen_init_cpio -t fixes the mtime of directories and nodes; files keep their own, so give every
# packed file the fixed one.
find "$stage" -type f -exec touch -h -d "@$epoch" {} +
"$cache/gen_init_cpio" -t "$epoch" "$spec" >"$stage/initramfs.cpio"

# --- UKI: systemd-stub + .osrel + .cmdline + .linux + .initrd ---------------------------------
# BULKHEAD_HOST_CMDLINE replaces host/cmdline (tests build tampered images with it).
if [ -n "${BULKHEAD_HOST_CMDLINE:-}" ]; then
  printf '%s' "$BULKHEAD_HOST_CMDLINE" >"$stage/cmdline"
else
  tr -d '\n' <"$host/cmdline" >"$stage/cmdline"
fi
cp "$cache/bzImage" "$stage/bzImage"
if [ "$tamper" = kernel ]; then
  flip_byte "$stage/bzImage" kernel >"$stage/tamper"
  log "TAMPERED (tests only): $(cat "$stage/tamper")"
fi
objcopy \
  --add-section .osrel="$stage/os-release" --change-section-vma .osrel=0x20000 \
  --add-section .cmdline="$stage/cmdline" --change-section-vma .cmdline=0x30000 \
  --add-section .linux="$stage/bzImage" --change-section-vma .linux=0x2000000 \
  --add-section .initrd="$stage/initramfs.cpio" --change-section-vma .initrd=0x4000000 \
  "$stub" "$stage/bulkhead-host.efi"
[ "$(stat -c %s "$stage/bzImage")" -lt $((0x2000000)) ] || die "bzImage is over 32 MiB: move .initrd"
# objcopy stamps the PE header with the current time: set TimeDateStamp to the fixed epoch and
# recompute the PE checksum over the result.
python3 - "$stage/bulkhead-host.efi" "$epoch" <<'PY'
import struct, sys
path, epoch = sys.argv[1], int(sys.argv[2])
b = bytearray(open(path, "rb").read())
pe = struct.unpack_from("<I", b, 0x3c)[0]
assert b[pe:pe + 4] == b"PE\0\0"
struct.pack_into("<I", b, pe + 8, epoch)
ck = pe + 24 + 64
struct.pack_into("<I", b, ck, 0)
total = 0
data = bytes(b) + (b"\0" if len(b) % 2 else b"")
for (w,) in struct.iter_unpack("<H", data):
    total += w
    total = (total & 0xFFFF) + (total >> 16)
total = (total & 0xFFFF) + (total >> 16)
struct.pack_into("<I", b, ck, (total + len(b)) & 0xFFFFFFFF)
open(path, "wb").write(b)
PY

# --- manifest and digest ------------------------------------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
part() { printf '    {"name": "%s", "sha256": "%s", "bytes": %s}' "$1" "$(sha "$2")" "$(stat -c %s "$2")"; }
{
  echo "{"
  echo '  "format": "bulkhead-host-image/1",'
  echo "  \"uki_sha256\": \"$(sha "$stage/bulkhead-host.efi")\","
  echo "  \"kernel_cache_key\": \"$key\","
  echo "  \"inputs\": {"
  echo "    \"linux-source-6.1\": \"$(pkg_version linux-source-6.1)\","
  echo "    \"systemd-boot-efi\": \"$(pkg_version systemd-boot-efi)\","
  echo "    \"binutils\": \"$(pkg_version binutils)\","
  echo "    \"libc6\": \"$(pkg_version libc6)\""
  echo "  },"
  echo '  "parts": ['
  part bulkhead-host.efi "$stage/bulkhead-host.efi"; echo ","
  part stub "$stub"; echo ","
  part bzImage "$stage/bzImage"; echo ","
  part initramfs.cpio "$stage/initramfs.cpio"; echo ","
  part cmdline "$stage/cmdline"; echo ","
  part os-release "$stage/os-release"; echo
  echo '  ],'
  echo '  "initramfs": ['
  first=1
  while read -r kind path src _; do
    [ "$kind" = file ] || continue
    [ $first -eq 1 ] || echo ","
    first=0
    part "$path" "$src"
  done <"$spec"
  echo
  echo '  ]'
  echo "}"
} >"$stage/manifest.json"
# Expected PCRs, computed from the parts by the rules of the event log (crates/rot/src/boot.rs
# documents them; checked against real boots by crates/hostinit/tests/sealed_attest.rs):
#   PCR 4  = OVMF: EV_EFI_ACTION "Calling EFI Application from Boot Option", EV_SEPARATOR (0u32),
#            then the Authenticode SHA-256 of the UKI and of the kernel it loads;
#   PCR 9  = kernel EFI stub: its load options (the command line, UTF-16LE with the NUL), then the
#            initrd;
#   PCR 11 = systemd-stub 252: each section's name with its NUL, then its contents, in the order
#            .linux .osrel .cmdline .initrd;
#   PCR 12 = zero (no command line replaced the UKI's).
python3 - "$stage" >"$stage/expected_pcrs.json" <<'PY'
import hashlib, json, struct, sys
d = sys.argv[1]
def H(x):
    return hashlib.sha256(x).digest()
def chain(digests):
    pcr = bytes(32)
    for x in digests:
        pcr = hashlib.sha256(pcr + x).digest()
    return pcr.hex()
def read(f):
    return open(f"{d}/{f}", "rb").read()
def authenticode(b):
    # PE/COFF Authenticode image hash: the headers without CheckSum and the certificate-table
    # directory entry, the sections' raw data in file order, then any data after them.
    pe = struct.unpack_from("<I", b, 0x3c)[0]
    assert b[pe:pe + 4] == b"PE\0\0", "not a PE image"
    coff = pe + 4
    nsec = struct.unpack_from("<H", b, coff + 2)[0]
    optsz = struct.unpack_from("<H", b, coff + 16)[0]
    opt = coff + 20
    assert struct.unpack_from("<H", b, opt)[0] == 0x20b, "not PE32+"
    ck, cert_dd = opt + 64, opt + 112 + 4 * 8
    soh = struct.unpack_from("<I", b, opt + 60)[0]
    h = hashlib.sha256(b[:ck] + b[ck + 4:cert_dd] + b[cert_dd + 8:soh])
    secs = sorted((struct.unpack_from("<II", b, opt + optsz + 40 * i + 16)[::-1]
                   for i in range(nsec)))
    done = soh
    for ptr, size in secs:
        if size:
            h.update(b[ptr:ptr + size])
            done += size
    cert_off, cert_size = struct.unpack_from("<II", b, cert_dd)
    end = len(b) - (cert_size if cert_off else 0)
    if end > done:
        h.update(b[done:end])
    return h.digest()
cmdline = read("cmdline")
pcr11 = []
for name, f in ((".linux", "bzImage"), (".osrel", "os-release"), (".cmdline", "cmdline"), (".initrd", "initramfs.cpio")):
    pcr11 += [H(name.encode() + b"\0"), H(read(f))]
print(json.dumps({
    "4": chain([H(b"Calling EFI Application from Boot Option"), H(bytes(4)),
                authenticode(read("bulkhead-host.efi")), authenticode(read("bzImage"))]),
    "9": chain([H(cmdline.decode("ascii").encode("utf-16-le") + b"\0\0"), H(read("initramfs.cpio"))]),
    "11": chain(pcr11),
    "12": bytes(32).hex(),
}, sort_keys=True))
PY
python3 - "$stage/manifest.json" "$stage/expected_pcrs.json" "$stage/tamper" "$stage/cmdline" "$cmdline_override" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["expected_pcrs"] = json.load(open(sys.argv[2]))
m["expected_pcrs_note"] = "SHA-256 bank, computed at build time from the parts (host/README.md); PCR 23 is per host"
tamper = open(sys.argv[3]).read().strip()
if tamper:
    m["tamper"] = tamper
# Test-image markers: crates/rot/src/boot.rs refuses a manifest that carries either.
if sys.argv[5]:
    m["cmdline_override"] = True
    m["cmdline"] = open(sys.argv[4]).read()
open(sys.argv[1], "w").write(json.dumps(m, indent=2, sort_keys=True) + "\n")
PY
sha "$stage/bulkhead-host.efi" >"$stage/digest"

mkdir -p "$out_dir"
for f in bzImage initramfs.cpio cmdline os-release bulkhead-host.efi manifest.json digest; do
  cp "$stage/$f" "$out_dir/$f.tmp"
  mv "$out_dir/$f.tmp" "$out_dir/$f"
done
log "UKI $(stat -c %s "$out_dir/bulkhead-host.efi") bytes, initramfs $(stat -c %s "$out_dir/initramfs.cpio") bytes"
echo "$(cat "$out_dir/digest")  bulkhead-host.efi"
