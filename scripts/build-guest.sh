#!/usr/bin/env bash
# Builds the Bulkhead test guest: a Linux 6.1 `vmlinux` (booted through its PVH note) and a
# busybox-static `initramfs.cpio`, then copies both to the directory given as $1.
#
#   scripts/build-guest.sh target/guest
#
# Inputs: Debian's linux-source-6.1 and busybox-static packages, guest/kernel.config (merged on
# top of `make tinyconfig`), guest/patches/*.patch, guest/init, guest/fstab, guest/udhcpc.script
# and this script. The kernel (with the kernel tree's `gen_init_cpio`) is cached outside the
# repository, keyed by the SHA-256 of its inputs only (kernel source, compiler, kernel.config,
# patches and the text of build_kernel below):
#   ${BULKHEAD_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/guest}/<key>/
# A cache hit builds no kernel. The initramfs is packed on every run (well under a second,
# deterministic), so changing /init or its files never rebuilds the kernel. No network access.
# See guest/README.md.
set -euo pipefail

die() { echo "build-guest: $*" >&2; exit 1; }
log() { echo "build-guest: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 <output-dir>"
out_dir=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
guest=$repo/guest
kernel_tar=/usr/src/linux-source-6.1.tar.xz
busybox_bin=/bin/busybox
jobs=${BULKHEAD_GUEST_JOBS:-2}
# Fixed timestamps and names make the output independent of when and where it is built.
epoch=1700000000

for f in "$kernel_tar" "$busybox_bin"; do
  [ -e "$f" ] || die "$f is missing: run 'make deps' (packages linux-source-6.1, busybox-static)"
done
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# --- kernel build (cached; runs under a lock, so concurrent `make guest` runs build once) -----
cache_root=${BULKHEAD_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/guest}
mkdir -p "$cache_root"

build_kernel() {
  # Trees of earlier failed or interrupted builds are kept for debugging until the next build.
  rm -rf "$cache_root"/work-* "$cache_root"/stage-*
  mkdir -p "$work"
  log "cache miss ($key): building in $work"

  log "unpacking $kernel_tar"
  tar -xJf "$kernel_tar" -C "$work"
  local src=$work/linux-source-6.1
  [ -d "$src" ] || die "unexpected layout of $kernel_tar"

  local p
  for p in "$guest"/patches/*.patch; do
    [ -e "$p" ] || continue
    log "applying ${p#"$repo"/}"
    patch -p1 -s -d "$src" <"$p"
  done

  export KBUILD_BUILD_TIMESTAMP="@$epoch" KBUILD_BUILD_USER=bulkhead \
         KBUILD_BUILD_HOST=bulkhead KBUILD_BUILD_VERSION=1
  local mk=(make -s -C "$src" ARCH=x86_64 "-j$jobs")
  "${mk[@]}" tinyconfig >/dev/null
  (cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m -O . .config \
      "$guest/kernel.config" >/dev/null)
  "${mk[@]}" olddefconfig >/dev/null

  # Every line of the fragment must survive olddefconfig; a dropped dependency fails here.
  local line sym bad=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) sym=${line%%=*}
                  grep -qxF "$line" "$src/.config" || { log "kernel.config: $line did not stick"; bad=1; } ;;
      "# CONFIG_"*" is not set")
                  sym=${line#\# }; sym=${sym%% *}
                  if grep -q "^$sym=" "$src/.config"; then log "kernel.config: $sym is still set"; bad=1; fi ;;
    esac
  done <"$guest/kernel.config"
  [ $bad -eq 0 ] || die "kernel.config does not apply cleanly to tinyconfig"

  log "building vmlinux (make -j$jobs)"
  "${mk[@]}" vmlinux
  grep -q . <(readelf -n "$src/vmlinux" | grep -i 'Xen\|0x00000012') ||
    die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
  # usr/gen_init_cpio is built with vmlinux; keep it to pack the initramfs without the tree.
  [ -x "$src/usr/gen_init_cpio" ] || "${mk[@]}" usr/gen_init_cpio

  local stage=$cache_root/stage-$key
  rm -rf "$stage"
  mkdir -p "$stage"
  cp "$src/vmlinux" "$stage/vmlinux"
  cp "$src/.config" "$stage/kernel.config.full"
  cp "$src/usr/gen_init_cpio" "$stage/gen_init_cpio"
  rm -rf "$cache"
  mv "$stage" "$cache"
}

# The cache key covers the kernel's inputs and the recipe above (its text, via `declare -f`), not
# the initramfs files.
key_input() {
  echo "build-guest kernel cache key v2"
  echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
  echo "gcc $(gcc -dumpfullversion 2>/dev/null || echo unknown)"
  echo "binutils $(ld --version 2>/dev/null | head -n1)"
    declare -f build_kernel
  local f
  for f in "$guest/kernel.config" "$guest"/patches/*.patch; do
    [ -e "$f" ] || continue
    echo "${f#"$repo"/} $(sha256sum <"$f" | cut -d' ' -f1)"
  done
}
key=$(key_input | sha256sum | cut -d' ' -f1)
cache=$cache_root/$key
work=$cache_root/work-$key

exec 9>"$cache_root/lock"
flock 9
if [ -f "$cache/vmlinux" ] && [ -x "$cache/gen_init_cpio" ]; then
  log "kernel cache hit ($key)"
else
  start=$(date +%s)
  build_kernel
  log "kernel built in $(( $(date +%s) - start )) s"
fi
flock -u 9

# --- initramfs (packed on every run) ---------------------------------------------------------
mkdir -p "$out_dir"
spec=$(mktemp)
trap 'rm -f "$spec"' EXIT
{
  echo "dir /bin 0755 0 0"
  echo "dir /dev 0755 0 0"
  echo "dir /proc 0755 0 0"
  echo "dir /sys 0755 0 0"
  echo "dir /tmp 1777 0 0"
  echo "dir /etc 0755 0 0"
  echo "file /etc/fstab $guest/fstab 0644 0 0"
  echo "file /etc/udhcpc.script $guest/udhcpc.script 0755 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "file /bin/busybox $busybox_bin 0755 0 0"
  echo "file /init $guest/init 0755 0 0"
  for a in sh cat dd echo mount umount base64 reboot sync sleep ls ip udhcpc ping nc wget; do
    echo "slink /bin/$a busybox 0777 0 0"
  done
} >"$spec"
"$cache/gen_init_cpio" -t "$epoch" "$spec" >"$out_dir/initramfs.cpio.tmp"
cp "$cache/vmlinux" "$out_dir/vmlinux.tmp"
mv "$out_dir/vmlinux.tmp" "$out_dir/vmlinux"
mv "$out_dir/initramfs.cpio.tmp" "$out_dir/initramfs.cpio"
(cd "$out_dir" && sha384sum vmlinux initramfs.cpio)

# The kernel tree is ~1.5 GB; remove it last, once the outputs are in place.
if [ -d "$work" ] && [ -z "${BULKHEAD_GUEST_KEEP_WORK:-}" ]; then
  log "removing $work"
  flock 9
  rm -rf "$work"
fi
