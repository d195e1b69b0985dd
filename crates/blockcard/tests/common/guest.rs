//! Booting the project's test guest under QEMU (microvm, TCG) with a vhost-user-blk disk served
//! by a card, running one shell script and reading its exit status from the console.

use super::Env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet noxsave clearcpuid=popcnt,cx16,smap";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `make test` passes the guest build directory; otherwise target/guest.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_GUEST_DIR")
        .map_or_else(|| repo_root().join("target/guest"), PathBuf::from)
}

pub fn encode_run(script: &str) -> String {
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
pub fn boot(env: &Env, vhost: &Path, script: &str, tag: &str) -> i32 {
    boot_with(env, vhost, script, tag, &mut |_| {})
}

/// As [`boot`], calling `watch` with the console text on every poll (every 200 ms).
pub fn boot_with(
    env: &Env,
    vhost: &Path,
    script: &str,
    tag: &str,
    watch: &mut dyn FnMut(&str),
) -> i32 {
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
        watch(&log);
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

/// Whether QEMU and the built guest are there (else the caller skips loudly).
pub fn can_boot() -> bool {
    let guest = guest_dir();
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    have_qemu && guest.join("vmlinux").exists() && guest.join("initramfs.cpio").exists()
}
