//! Interop with an independent frontend: QEMU's vhost-user-blk (virtio-mmio on `-M microvm`,
//! guest memory from a shared memfd, TCG) boots the project's test guest (target/guest/, built
//! by `make guest`), which writes a known file to /dev/vda; the VM is powered off, booted again,
//! and the guest verifies the data. Then the backing file is decrypted independently (Python
//! `cryptography`) and compared with what the guest wrote.
//!
//! Skipped (with a note on stderr) when qemu-system-x86_64 or target/guest/{vmlinux,
//! initramfs.cpio} are missing.

// Test code: casts are on trusted, test-chosen values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::guest::*;
use common::*;

const VOL_BYTES: u64 = 16 << 20;
#[test]
fn qemu_guest_writes_and_reads_through_the_card() {
    if !can_boot() {
        bulkhead_testkit::skip_or_fail(
            "qemu interop: needs qemu-system-x86_64 and target/guest/{vmlinux,initramfs.cpio} (make guest)",
        );
        return;
    }
    let env = Env::new(VOL_BYTES);
    let key = test_key(21);
    let mut card = Card::start(&env, CardOpts::default());
    assert!(matches!(
        card.attach(
            "vol-qemu",
            CryptoSectorSize::S4096,
            KeySource::Sealed(env.seal("vol-qemu", &key))
        ),
        ControlResponse::Attached { .. }
    ));
    // Boot 1: write /init (a file both sides know) at 64 KiB.
    let write = "busybox dd if=/init of=/dev/vda bs=4096 seek=16 conv=fsync 2>/dev/null || exit 3\nbusybox sync\nexit 0\n";
    assert_eq!(boot(&env, &card.vhost, write, "1"), 0, "guest write failed");
    // Power cycle: a fresh VM (and a fresh vhost-user connection) reads it back.
    let verify = "n=$(busybox wc -c </init)\nbusybox dd if=/dev/vda of=/back bs=4096 skip=16 count=1 2>/dev/null || exit 4\nbusybox head -c $n /back >/back2\nbusybox cmp /init /back2 || exit 5\nexit 0\n";
    assert_eq!(
        boot(&env, &card.vhost, verify, "2"),
        0,
        "guest read-back failed"
    );
    assert!(card.metric("writes") >= 1);
    card.detach();

    let init = std::fs::read(repo_root().join("guest/init")).expect("guest/init");
    let raw = std::fs::read(&env.backing).expect("backing");
    assert!(
        !contains(&raw, b"BULKHEAD-GUEST-READY"),
        "guest plaintext on disk"
    );
    let plain = python_decrypt(&key, &env.backing, 4096, &env.path("plain.img"));
    assert!(
        plain[65536..65536 + init.len()] == init[..],
        "decrypted backing file differs from what the guest wrote"
    );
}
