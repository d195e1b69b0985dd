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
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VOL_BYTES: u64 = 16 << 20;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet noxsave clearcpuid=popcnt,cx16,smap";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `make test` passes the guest build directory; otherwise target/guest.
fn guest_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_GUEST_DIR")
        .map_or_else(|| repo_root().join("target/guest"), PathBuf::from)
}

fn encode_run(script: &str) -> String {
    let mut out = String::new();
    for b in script.bytes() {
        if b.is_ascii_alphanumeric() || b"_./,:=+-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\0{b:03o}"));
        }
    }
    out
}

/// Boots the guest once with `script`; returns the script's exit status from the console.
fn boot(env: &Env, vhost: &Path, script: &str, tag: &str) -> i32 {
    let guest = guest_dir();
    let serial = env.path(&format!("serial-{tag}.log"));
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off,memory-backend=mem", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args([
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio"))
        .arg("-append")
        .arg(format!("{CMDLINE} bulkhead.run={}", encode_run(script)))
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}", vhost.display()))
        .args(["-device", "vhost-user-blk,chardev=blk0,num-queues=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu");
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if let Some(rest) = log.split("BULKHEAD-RUN-EXIT=").nth(1) {
            let code: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break code.parse::<i32>().unwrap_or(-1);
        }
        if let Ok(Some(st)) = qemu.try_wait() {
            panic!("qemu exited ({st}) before the guest finished; console:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "guest did not finish; console:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The guest resets itself; give QEMU a moment, then make sure it is gone.
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Ok(Some(_)) = qemu.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    status
}

#[test]
fn qemu_guest_writes_and_reads_through_the_card() {
    let guest = guest_dir();
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_qemu || !guest.join("vmlinux").exists() || !guest.join("initramfs.cpio").exists() {
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
