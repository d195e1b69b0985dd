//! The sealed-host tests' network: a namespace with one tap device, and the per-host
//! configuration disk from a dev PKI. Booting the image (QEMU q35 under TCG, OVMF, a per-host
//! swtpm, the UKI on a read-only ESP, the configuration disk on virtio-blk, the NIC on the tap)
//! and the port scans are `bulkhead_devcluster::sealed`, what `bulkhead up --sealed-hosts`
//! runs. Everything started is stopped on drop.
#![allow(dead_code)]

pub mod attest;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead_devcluster::sealed::SealedVm;
use bulkhead_rot::endorsement::LocalManufacturer;
// Not every test of this crate scans.
#[allow(unused_imports)]
pub use bulkhead_devcluster::sealed::{tcp_scan, udp_scan, MTLS_PORT};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Everything a boot needs, or the reason it cannot run here.
pub fn missing_resource() -> Option<String> {
    if let Some(why) = bulkhead_devcluster::sealed::missing_resource() {
        return Some(why);
    }
    if !target_dir().join("release/bulkhead-controller").is_file() {
        return Some(
            "no release bulkhead-controller (cargo build --release --workspace --bins)".into(),
        );
    }
    None
}

/// Builds the image into `out` from the current release binaries; `Err(reason)` when the
/// host kernel is not cached.
pub fn build_image(out: &Path, cmdline: Option<&str>) -> Result<(), String> {
    match bulkhead_devcluster::sealed::build_image(&repo(), out, cmdline) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the host kernel is not built: run `make host-image`".into()),
        Err(e) => panic!("{e}"),
    }
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The per-host configuration disk for `host_id` at `net.host_ip`, from a dev PKI in `pki`.
pub fn config_disk(pki: &Path, host_id: &str, net: &HostNet, out: &Path) -> [u8; 32] {
    let dir = bulkhead_tokens::statedir::StateDir::new(pki);
    dir.ensure_dev(host_id).expect("dev PKI");
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let cfg = bulkhead_hostinit::config::HostConfig {
        host_id: host_id.into(),
        address: net.host_ip,
        prefix: 24,
        gateway: Some(net.peer_ip),
        ca_cert: read(dir.ca().ca_pem()),
        host_cert: read(dir.ca().cert(host_id)),
        host_key: read(dir.ca().key(host_id)).into(),
        token_public_key: read(dir.token_pub()),
        rights: read(dir.rights()),
        revocations: std::fs::read_to_string(dir.revoked()).unwrap_or_default(),
    };
    let disk = bulkhead_hostinit::config::encode_disk(&cfg).expect("encode config disk");
    std::fs::write(out, &disk).expect("write disk");
    bulkhead_hostinit::config::measured_digest(&disk).expect("digest")
}

/// A network namespace with one tap device (`10.213.N.1/24`) for one sealed host (`.2`).
pub struct HostNet {
    pub ns: String,
    pub tap: String,
    pub host_ip: std::net::Ipv4Addr,
    pub peer_ip: std::net::Ipv4Addr,
}

impl HostNet {
    pub fn new(tag: &str) -> HostNet {
        let n = u8::try_from(std::process::id() % 200).unwrap_or(0) + 20;
        let ns = format!("bhsealed-{tag}-{}", std::process::id());
        let tap = format!("bhs{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &ns]));
        let net = HostNet {
            ns,
            tap,
            host_ip: std::net::Ipv4Addr::new(10, 213, n, 2),
            peer_ip: std::net::Ipv4Addr::new(10, 213, n, 1),
        };
        let x = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &net.ns]).args(args);
            run(&mut c);
        };
        x(&["ip", "link", "set", "lo", "up"]);
        x(&["ip", "tuntap", "add", "dev", &net.tap, "mode", "tap"]);
        x(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", net.peer_ip),
            "dev",
            &net.tap,
        ]);
        x(&["ip", "link", "set", &net.tap, "up"]);
        net
    }

    /// Runs `f` on a thread inside the namespace; threads it spawns are inside too.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on an open namespace fd; affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "ip", "link", "del", &self.tap])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A running sealed host (`bulkhead_devcluster::sealed::SealedVm`) whose failures panic with
/// its console.
pub struct SealedHost(SealedVm);

impl SealedHost {
    /// Boots `uki` with `config_disk` on `net`. `dir` is this host's scratch directory; the
    /// host's TPM is made by `manufacturer` (blank without one).
    pub fn boot(
        dir: &Path,
        uki: &Path,
        config_disk: &Path,
        net: &HostNet,
        manufacturer: Option<&LocalManufacturer>,
    ) -> SealedHost {
        SealedHost(
            SealedVm::boot(
                "host-1",
                dir,
                uki,
                config_disk,
                &net.ns,
                &net.tap,
                manufacturer,
            )
            .unwrap_or_else(|e| panic!("boot: {e}")),
        )
    }

    pub fn console_text(&self) -> String {
        self.0.console_text()
    }

    pub fn console_len(&self) -> usize {
        self.0.console_len()
    }

    /// Waits until the console shows `marker`; returns the time since QEMU started.
    pub fn wait_for(&mut self, marker: &'static str, timeout: Duration) -> Duration {
        match self.0.wait_for(marker, timeout) {
            Ok(d) => d,
            Err(e) => panic!(
                "{e}; console:\n{}\nqemu: {}",
                self.0.console_text(),
                std::fs::read_to_string(self.0.dir.join("qemu.err")).unwrap_or_default()
            ),
        }
    }

    pub fn type_on_console(&mut self, bytes: &[u8]) {
        self.0.type_on_console(bytes).expect("write serial");
    }

    pub fn exited(&mut self) -> bool {
        self.0.exited()
    }
}
