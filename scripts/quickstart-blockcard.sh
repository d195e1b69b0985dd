#!/usr/bin/env bash
# Quickstart act: the block card. A volume is attached to a guest through an encrypting card, the
# guest writes data, the backing file holds only ciphertext, and a detach of this ephemeral
# (instance-storage) volume crypto-erases it: the key existed only in the card's memory.
# Real binaries: bulkhead-blockcard (vhost-user backend) and bulkhead-hypervisor (KVM guest).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
GUEST=${CARGO_TARGET_DIR:-target}/guest
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
DIR=$(mktemp -d); chmod 755 "$DIR"
CARD=
trap '[ -n "$CARD" ] && kill "$CARD" 2>/dev/null; rm -rf "$DIR"' EXIT

say "Act: the block card — AES-256-XTS per sector, key only in the card's memory"
truncate -s 16M "$DIR/volume.img"
uidgid=()
[ "$(id -u)" -eq 0 ] && { chown 65534:65534 "$DIR/volume.img" "$DIR"; uidgid=(--uid 65534 --gid 65534); }
"$BIN/bulkhead-blockcard" --control-socket "$DIR/card.ctl" --vhost-socket "$DIR/card.sock" \
  --backing "$DIR/volume.img" "${uidgid[@]}" 2>"$DIR/card.log" &
CARD=$!
for _ in $(seq 100); do [ -S "$DIR/card.ctl" ] && break; sleep 0.1; done
# One control frame: len u32 LE | version 1 | kind | payload (crates/blockcard/src/control.rs).
ctl() { python3 - "$DIR/card.ctl" "$1" <<'PY'
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
body = bytes.fromhex(sys.argv[2]); s.sendall(struct.pack('<I', len(body)) + body)
n = struct.unpack('<I', s.recv(4))[0]; r = s.recv(n)
kinds = {0x81: 'Attached', 0x82: 'Detached', 0xff: 'Error'}
print('card replied:', kinds.get(r[1], hex(r[1])), end='')
if r[1] == 0x81: print(f' (capacity {struct.unpack("<Q", r[2:10])[0]} sectors, encrypted={r[10]})')
else: print('', r[2:].decode(errors='replace'))
PY
}
vid=$(printf 'vol-quickstart' | od -An -tx1 | tr -d ' \n')
echo "controller → card: Attach vol-quickstart, 4 KiB crypto sectors, ephemeral key (made inside the card)"
ctl "0101$(printf '%02x' 14)${vid}0c01"

say "The guest writes a secret to its disk (/dev/vda, served by the card over vhost-user)"
script='read -r n </sys/block/vda/size; echo "guest sees /dev/vda: $n sectors"
echo BULKHEAD-QUICKSTART-SECRET >/s; dd if=/s of=/dev/vda bs=4096 count=1 conv=sync,fsync 2>/dev/null
dd if=/dev/vda of=/r bs=4096 count=1 2>/dev/null; read -r l </r; echo "guest reads back: $l"'
"$BIN/bulkhead-hypervisor" run --kernel "$GUEST/vmlinux" --initrd "$GUEST/initramfs.cpio" \
  --memory-mib 128 --block "$DIR/card.sock" \
  --cmdline "$(cat guest/cmdline) bulkhead.run=$(printf '%s' "$script" | guest/encode-run.sh)" | grep -E "guest|BULKHEAD-RUN-EXIT"

say "The backing file holds only ciphertext"
if grep -q BULKHEAD-QUICKSTART-SECRET "$DIR/volume.img"; then echo "UNEXPECTED: plaintext on disk"; exit 1; fi
echo "grep for the secret in volume.img: not found. First bytes of sector 0:"
od -An -tx1 -N 32 "$DIR/volume.img"

say "Detach: the card zeroizes the key and exits; this ephemeral volume is now unreadable by anyone"
ctl 0102
wait "$CARD" 2>/dev/null || true; CARD=
echo "card exited; its key never left its locked, non-dumpable memory"
