//! Shared helpers for the hypervisor's integration tests: where the guest is, how to skip
//! loudly, and how to pass a script to the guest.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kernel arguments the test guest needs on this kind of machine (software KVM): see
/// guest/README.md. Hardware KVM needs none of the `noxsave`/`clearcpuid` ones.
pub const GUEST_ARGS: &str = include_str!("../../../guest/cmdline").trim_ascii_end();

pub fn hypervisor() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-hypervisor"))
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

/// Returns (vmlinux, initramfs) or prints a loud SKIP and returns None when KVM or the guest
/// is truly absent.
pub fn guest_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if std::fs::metadata("/dev/kvm").is_err() {
        bulkhead_testkit::skip_or_fail(&format!("{test}: /dev/kvm is absent on this machine"));
        return None;
    }
    let d = guest_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio"));
    if !k.exists() || !i.exists() {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: no test guest in {} (run `make guest`)",
            d.display()
        ));
        return None;
    }
    Some((k, i))
}

/// The `bulkhead.run=` argument for a shell script: every byte outside `[A-Za-z0-9_./,:=+-]`
/// written as `\0ooo` (octal), which the guest's init decodes with `printf '%b'` (see
/// guest/README.md). Scripts should use shell builtins: every exec costs seconds here.
pub fn run_arg(script: &str) -> String {
    let enc: String = script
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'_'
            | b'.'
            | b'/'
            | b','
            | b':'
            | b'='
            | b'+'
            | b'-' => char::from(b).to_string(),
            _ => format!("\\0{b:03o}"),
        })
        .collect();
    format!("bulkhead.run={enc}")
}

/// Guest boots are serialized within a test binary: two at once on a 2-core machine whose KVM
/// emulates guest kernel code would each take several times longer.
pub static BOOT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the hypervisor standalone to completion (bounded), returning (exit code, stdout).
pub fn run_guest(
    extra: &[&str],
    script: Option<&str>,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let (k, i) = (
        guest_dir().join("vmlinux"),
        guest_dir().join("initramfs.cpio"),
    );
    let mut cmdline = GUEST_ARGS.to_string();
    if let Some(s) = script {
        cmdline.push(' ');
        cmdline.push_str(&run_arg(s));
    }
    let mut cmd = Command::new(hypervisor());
    cmd.arg("run")
        .arg("--kernel")
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .arg("--cmdline")
        .arg(&cmdline)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn hypervisor");
    wait_output(child, timeout)
}

pub fn wait_output(mut child: Child, timeout: Duration) -> (Option<i32>, String, String) {
    // Drain both pipes while waiting: a full pipe would block the guest's console.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        code,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(bin))
        .find(|p| p.exists())
}

/// A zeroed disk image in a temporary directory, served over vhost-user-blk by
/// qemu-storage-daemon (the independent peer); the daemon is stopped on drop.
pub struct QsdDisk {
    pub img: PathBuf,
    pub sock: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl QsdDisk {
    /// `None` (after a loud message) when qemu-storage-daemon is not installed.
    pub fn new(test: &str, mib: usize, queues: u16) -> Option<QsdDisk> {
        let Some(qsd) = which("qemu-storage-daemon") else {
            bulkhead_testkit::skip_or_fail(&format!("{test}: qemu-storage-daemon absent"));
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; mib << 20]).expect("image");
        let sock = dir.path().join("vhost.sock");
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Some(QsdDisk {
            img,
            sock,
            child,
            _dir: dir,
        })
    }

    /// A new vhost-user connection to the daemon.
    pub fn connect(&self) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::connect(&self.sock).expect("connect to qemu-storage-daemon")
    }
}

impl Drop for QsdDisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends what a running hypervisor's console has from `cursor` on to `text` (advancing the
/// cursor); fails the test if the console ring dropped bytes.
pub fn read_console(
    hv: &bulkhead_hypervisor_client::Hypervisor,
    cursor: &mut u64,
    text: &mut String,
) {
    use bulkhead_channel::{Command, Reply};
    loop {
        let r = hv.channel().call(
            Command::ReadConsole {
                cursor: *cursor,
                max: 32 * 1024,
            },
            None,
        );
        let Ok(Reply::Console { data, next, lost }) = r else {
            panic!("console read: {r:?}");
        };
        assert_eq!(lost, 0, "the console ring dropped bytes");
        text.push_str(&String::from_utf8_lossy(&data));
        *cursor = next;
        if data.is_empty() {
            return;
        }
    }
}

/// The number after `prefix` on the last console line that starts with it (a guest's counter),
/// 0 before the first.
pub fn last_number(text: &str, prefix: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix)?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// What in the console means the guest saw an I/O error (its shell's, or its kernel's): none may
/// appear on the console of a test whose disk must keep working.
pub const IO_ERRORS: [&str; 5] = [
    "IOERR-",
    "I/O error",
    "blk_update_request",
    "Buffer I/O",
    "virtio_blk",
];

/// The guest's console, read by cursor.
pub struct Console {
    pub cursor: u64,
    pub text: String,
}

impl Console {
    pub fn drain(&mut self, hv: &bulkhead_hypervisor_client::Hypervisor) {
        read_console(hv, &mut self.cursor, &mut self.text);
    }

    /// The last write-and-read-back the guest reported.
    pub fn last(&self) -> u64 {
        last_number(&self.text, "W=")
    }

    /// Waits until the guest reported `more` further round trips.
    pub fn wait_io(
        &mut self,
        hv: &bulkhead_hypervisor_client::Hypervisor,
        more: u64,
        within: Duration,
    ) {
        let start = self.last();
        let until = Instant::now() + within;
        while self.last() < start + more {
            assert!(
                Instant::now() < until,
                "the guest's disk I/O stopped at {start}:\n{}",
                tail(&self.text)
            );
            std::thread::sleep(Duration::from_millis(100));
            self.drain(hv);
        }
    }
}

pub fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(3000)..]
}

/// Whether process `pid` still exists (a zombie counts until it is reaped).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
