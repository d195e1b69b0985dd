//! Sealed hosts for a dev cluster (issue 17, `bulkhead up --sealed-hosts`): each host is the
//! host image (`make host-image`: one UKI holding the kernel, `bulkhead-init` as PID 1, the
//! attestation agent and the controller) booted the way a fleet would run it here — QEMU q35
//! under TCG, OVMF (code + a fresh copy of the variables), the host's own swtpm (tpm-crb), the
//! UKI on a read-only ESP, the per-host configuration disk (generated here: identity, address,
//! certificates, token key, rights) on virtio-blk, one virtio-net NIC on a tap device.
//!
//! Network: the host's namespace (the same veth link to the orchestrator a process host gets)
//! bridges the veth's inner end to the tap, so the VM itself holds the host address and the
//! control plane reaches it over that link exactly as it reaches a process host. Nothing is
//! forwarded or filtered: a port scan of that address sees what the image listens on (only the
//! controller's mTLS port). OVMF starts only under TCG here and there is no nested
//! virtualization, so the image's controller runs the detached backend.
//!
//! Everything started is stopped on drop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The image's controller port (mTLS + tokens): the only port a sealed host listens on.
pub const MTLS_PORT: u16 = 8443;
/// The image's UKI and manifest inside an image directory.
pub const UKI: &str = "bulkhead-host.efi";
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("{0}")]
    Missing(String),
    #[error("sealed host {host}: QEMU exited before {marker:?} (see {dir})")]
    Exited {
        host: String,
        marker: &'static str,
        dir: PathBuf,
    },
    #[error("sealed host {host}: no {marker:?} within {secs} s (see {dir})")]
    Timeout {
        host: String,
        marker: &'static str,
        secs: u64,
        dir: PathBuf,
    },
    #[error("sealed host {0}: no attestation key line on its console")]
    NoAk(String),
    #[error("manufacturing the host's TPM: {0}")]
    Manufacture(bulkhead_rot::endorsement::EndorsementError),
    #[error("configuration disk: {0}")]
    Config(String),
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What booting sealed hosts needs on this machine, or why it cannot.
pub fn missing_resource() -> Option<String> {
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Some(format!("{f} is missing (package ovmf)"));
        }
    }
    for b in ["qemu-system-x86_64", "swtpm", "ip"] {
        if !on_path(b) {
            return Some(format!("{b} is not installed"));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and tap devices)".into());
    }
    None
}

/// Whether `dir` holds a built host image (UKI + manifest).
pub fn image_missing(dir: &Path) -> Option<String> {
    for f in [UKI, MANIFEST] {
        if !dir.join(f).is_file() {
            return Some(format!(
                "{} is missing: build the host image (`make host-image`)",
                dir.join(f).display()
            ));
        }
    }
    None
}

/// A one-byte change the image script makes for tests (`BULKHEAD_HOST_TAMPER`): one byte of
/// the staged copy of a part, in a string nothing reads at run time, so the image still boots
/// and serves and only its measurements change. The cached kernel is never touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// The bzImage's setup-header version string.
    Kernel,
    /// `bulkhead-controller`'s `--backend` help text, inside the initramfs.
    Binary,
}

impl Tamper {
    fn env_value(self) -> &'static str {
        match self {
            Tamper::Kernel => "kernel",
            Tamper::Binary => "binary",
        }
    }
}

/// Builds the host image into `out` with `scripts/build-host-image.sh` of `repo` from the
/// release binaries already built (no cargo run), optionally with another kernel command line:
/// a test image then (`out` absent or empty; its manifest says `cmdline_override`, and
/// `bulkhead_rot::boot::ExpectedPcrs::from_manifest` refuses it as expectations).
/// `Ok(false)`: the host kernel is not in its cache (`make host-image` builds it, ~10 min).
pub fn build_image(repo: &Path, out: &Path, cmdline: Option<&str>) -> Result<bool, SealedError> {
    build_image_tampered(repo, out, cmdline, None)
}

/// As [`build_image`], with one byte of a part flipped (tests of the boot chain's refusals;
/// the manifest says `tamper`).
pub fn build_image_tampered(
    repo: &Path,
    out: &Path,
    cmdline: Option<&str>,
    tamper: Option<Tamper>,
) -> Result<bool, SealedError> {
    let mut cmd = Command::new(repo.join("scripts/build-host-image.sh"));
    cmd.arg(out)
        .env("BULKHEAD_HOST_NO_CARGO", "1")
        .env("BULKHEAD_HOST_REQUIRE_CACHE", "1");
    // Nothing inherited from the caller's environment changes the image: only the arguments.
    match cmdline {
        Some(c) => cmd.env("BULKHEAD_HOST_CMDLINE", c),
        None => cmd.env_remove("BULKHEAD_HOST_CMDLINE"),
    };
    match tamper {
        Some(t) => cmd.env("BULKHEAD_HOST_TAMPER", t.env_value()),
        None => cmd.env_remove("BULKHEAD_HOST_TAMPER"),
    };
    // The script builds a test image (its manifest marked, refused as expectations) only when
    // told so explicitly.
    if cmdline.is_some() || tamper.is_some() {
        cmd.env("BULKHEAD_TEST_ONLY", "1");
    } else {
        cmd.env_remove("BULKHEAD_TEST_ONLY");
    }
    let o = cmd
        .output()
        .map_err(|e| SealedError::Io("build-host-image.sh", e))?;
    if o.status.code() == Some(3) {
        return Ok(false);
    }
    if !o.status.success() {
        return Err(SealedError::Missing(format!(
            "build-host-image.sh failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(true)
}

/// The configuration disk of a sealed host of a dev cluster (CA directory `ca`): its identity,
/// `address/prefix` and gateway, the CA certificate, its certificate and TLS key, the token
/// service's public key, the rights policy and the revocations. Returns the SHA-256 PID 1
/// extends into PCR 23.
pub fn write_config_disk(
    ca: &Path,
    host_id: &str,
    address: std::net::Ipv4Addr,
    prefix: u8,
    gateway: std::net::Ipv4Addr,
    out: &Path,
) -> Result<[u8; 32], SealedError> {
    let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| SealedError::Io("ca file", e));
    let cfg = bulkhead_hostinit::config::HostConfig {
        host_id: host_id.into(),
        address,
        prefix,
        gateway: Some(gateway),
        ca_cert: read(ca.join("ca.pem"))?,
        host_cert: read(ca.join(format!("{host_id}.pem")))?,
        host_key: read(ca.join(format!("{host_id}.key")))?.into(),
        token_public_key: read(ca.join("token-service.pub"))?,
        rights: read(ca.join("rights.toml"))?,
        revocations: std::fs::read_to_string(ca.join("revoked.txt")).unwrap_or_default(),
    };
    let disk = bulkhead_hostinit::config::encode_disk(&cfg)
        .map_err(|e| SealedError::Config(e.to_string()))?;
    std::fs::write(out, &disk).map_err(|e| SealedError::Io("config disk", e))?;
    bulkhead_hostinit::config::measured_digest(&disk)
        .map_err(|e| SealedError::Config(e.to_string()))
}

/// A running sealed host: swtpm + QEMU, and its serial console's bytes as they arrive
/// (also appended to `console.log` in its directory).
pub struct SealedVm {
    pub name: String,
    pub dir: PathBuf,
    swtpm: Child,
    qemu: Child,
    serial: UnixStream,
    console: Arc<Mutex<Vec<u8>>>,
    /// When QEMU was started (power-on).
    pub started: Instant,
}

impl SealedVm {
    /// Boots `uki` with `config_disk`, its NIC on tap `tap` of network namespace `ns`. `dir`
    /// is this host's scratch directory (ESP copy, OVMF variables, TPM state, logs). The
    /// host's TPM is fresh, made by `manufacturer` (an EK certificate from its CA in NV, what
    /// the control plane checks before it enrols the AK), or blank without one.
    pub fn boot(
        name: &str,
        dir: &Path,
        uki: &Path,
        config_disk: &Path,
        ns: &str,
        tap: &str,
        manufacturer: Option<&bulkhead_rot::endorsement::LocalManufacturer>,
    ) -> Result<SealedVm, SealedError> {
        let io = |what: &'static str| move |e| SealedError::Io(what, e);
        std::fs::create_dir_all(dir.join("esp/EFI/BOOT")).map_err(io("esp"))?;
        std::fs::copy(uki, dir.join("esp/EFI/BOOT/BOOTX64.EFI")).map_err(io("copy UKI"))?;
        std::fs::copy(OVMF_VARS, dir.join("OVMF_VARS.fd")).map_err(io("OVMF vars"))?;
        let tpm_dir = dir.join("tpm");
        // A fresh TPM each power-on (a dev cluster's host has no persistent identity here).
        let _ = std::fs::remove_dir_all(&tpm_dir);
        std::fs::create_dir_all(&tpm_dir).map_err(io("tpm dir"))?;
        if let Some(m) = manufacturer {
            m.manufacture(&tpm_dir).map_err(SealedError::Manufacture)?;
        }
        let ctrl = tpm_dir.join("ctrl.sock");
        let mut swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate"])
            .arg("--tpmstate")
            .arg(format!("dir={}", tpm_dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--log")
            .arg(format!("file={}", tpm_dir.join("swtpm.log").display()))
            .stdin(Stdio::null())
            .spawn()
            .map_err(io("swtpm"))?;
        let t = Instant::now();
        while !ctrl.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let serial_path = dir.join("serial.sock");
        let _ = std::fs::remove_file(&serial_path);
        let started = Instant::now();
        let spawned = Command::new("ip")
            .args(["netns", "exec", ns, "qemu-system-x86_64"])
            .args(["-M", "q35", "-accel", "tcg", "-m", "512", "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                dir.join("OVMF_VARS.fd").display()
            ))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
            .args([
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-crb,tpmdev=tpm0",
            ])
            .arg("-drive")
            .arg(format!(
                "if=none,id=esp,format=raw,snapshot=on,file=fat:{}",
                dir.join("esp").display()
            ))
            .args(["-device", "ide-hd,drive=esp,bus=ide.0,bootindex=0"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=cfg,format=raw,readonly=on,file={}",
                config_disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=cfg"])
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .args(["-device", "virtio-rng-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser,path={},server=on,wait=on",
                serial_path.display()
            ))
            .args(["-serial", "chardev:ser"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("qemu.out")).map_err(io("qemu.out"))?)
            .stderr(std::fs::File::create(dir.join("qemu.err")).map_err(io("qemu.err"))?)
            .spawn();
        let mut qemu = match spawned {
            Ok(q) => q,
            Err(e) => {
                let _ = swtpm.kill();
                let _ = swtpm.wait();
                return Err(SealedError::Io("qemu-system-x86_64", e));
            }
        };
        let t = Instant::now();
        let serial = loop {
            match UnixStream::connect(&serial_path) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    for c in [&mut qemu, &mut swtpm] {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(SealedError::Io("serial socket", e));
                }
            }
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut reader = serial.try_clone().map_err(io("serial"))?;
        let sink = console.clone();
        let log_path = dir.join("console.log");
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = buf.get(..n).unwrap_or(&[]);
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(chunk);
                }
                if let Ok(mut c) = sink.lock() {
                    c.extend_from_slice(chunk);
                }
            }
        });
        tracing::info!(
            host = name,
            ns,
            tap,
            "sealed host powered on (QEMU TCG + OVMF + swtpm)"
        );
        Ok(SealedVm {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            swtpm,
            qemu,
            serial,
            console,
            started,
        })
    }

    pub fn console_text(&self) -> String {
        match self.console.lock() {
            Ok(c) => String::from_utf8_lossy(&c).into_owned(),
            Err(p) => String::from_utf8_lossy(&p.into_inner()).into_owned(),
        }
    }

    pub fn console_len(&self) -> usize {
        self.console.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Waits until the console shows `marker`; returns the time since power-on.
    pub fn wait_for(
        &mut self,
        marker: &'static str,
        timeout: Duration,
    ) -> Result<Duration, SealedError> {
        let t = Instant::now();
        loop {
            if self.console_text().contains(marker) {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(_)) = self.qemu.try_wait() {
                return Err(SealedError::Exited {
                    host: self.name.clone(),
                    marker,
                    dir: self.dir.clone(),
                });
            }
            if t.elapsed() >= timeout {
                return Err(SealedError::Timeout {
                    host: self.name.clone(),
                    marker,
                    secs: timeout.as_secs(),
                    dir: self.dir.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The attestation key the host's agent printed at start (`BULKHEAD-HOST-AK <hex>`).
    pub fn ak(&self) -> Result<String, SealedError> {
        self.console_text()
            .lines()
            .find_map(|l| l.trim().strip_prefix("BULKHEAD-HOST-AK "))
            .map(|a| a.trim().to_string())
            .ok_or_else(|| SealedError::NoAk(self.name.clone()))
    }

    pub fn type_on_console(&mut self, bytes: &[u8]) -> Result<(), SealedError> {
        self.serial
            .write_all(bytes)
            .map_err(|e| SealedError::Io("serial", e))
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(Some(_)))
    }
}

impl Drop for SealedVm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.swtpm.kill();
        let _ = self.swtpm.wait();
    }
}

/// TCP connect scan of every port of `ip` from the calling thread's network namespace:
/// (open ports, ports that never answered after `tries` rounds).
pub fn tcp_scan(ip: std::net::Ipv4Addr, tries: usize) -> (Vec<u16>, Vec<u16>) {
    let mut pending: Vec<u16> = (1..=u16::MAX).collect();
    let mut open = Vec::new();
    for _ in 0..tries {
        let chunks: Vec<Vec<u16>> = pending
            .chunks(pending.len().div_ceil(128).max(1))
            .map(<[u16]>::to_vec)
            .collect();
        let results: Vec<(Vec<u16>, Vec<u16>)> = std::thread::scope(|s| {
            let hs: Vec<_> = chunks
                .into_iter()
                .map(|ports| {
                    s.spawn(move || {
                        let (mut o, mut silent) = (Vec::new(), Vec::new());
                        for p in ports {
                            let a = std::net::SocketAddr::from((ip, p));
                            match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
                                Ok(_) => o.push(p),
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                                Err(_) => silent.push(p),
                            }
                        }
                        (o, silent)
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        pending = Vec::new();
        for (o, s) in results {
            open.extend(o);
            pending.extend(s);
        }
        if pending.is_empty() {
            break;
        }
    }
    open.sort_unstable();
    (open, pending)
}

/// UDP scan of every port: a datagram to each from a connected socket; a port is closed when
/// the host answers ICMP port-unreachable (the socket's next receive fails with
/// ECONNREFUSED). Each of 32 threads keeps a window of 16 probes in flight (a burst of
/// thousands overflows the tap queue); a probe unanswered for 2 s is retried, up to `tries`
/// times. Returns the ports that never answered (open or filtered) and those that answered
/// with data.
pub fn udp_scan(ip: std::net::Ipv4Addr, tries: usize) -> (Vec<u16>, Vec<u16>) {
    let ports: Vec<u16> = (1..=u16::MAX).collect();
    let chunks: Vec<Vec<u16>> = ports
        .chunks(ports.len().div_ceil(32))
        .map(<[u16]>::to_vec)
        .collect();
    let results: Vec<(Vec<u16>, Vec<u16>)> = std::thread::scope(|s| {
        let hs: Vec<_> = chunks
            .into_iter()
            .map(|ports| {
                s.spawn(move || {
                    let (mut silent, mut data) = (Vec::new(), Vec::new());
                    let mut queue: std::collections::VecDeque<(u16, usize)> =
                        ports.into_iter().map(|p| (p, 0)).collect();
                    let mut window: Vec<(u16, usize, std::net::UdpSocket, Instant)> = Vec::new();
                    while !queue.is_empty() || !window.is_empty() {
                        while window.len() < 16 {
                            let Some((p, n)) = queue.pop_front() else {
                                break;
                            };
                            let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
                                queue.push_back((p, n));
                                break;
                            };
                            if sock.connect((ip, p)).is_err() || sock.set_nonblocking(true).is_err()
                            {
                                queue.push_back((p, n));
                                continue;
                            }
                            let _ = sock.send(b"bulkhead-scan");
                            window.push((p, n, sock, Instant::now()));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                        let mut keep = Vec::with_capacity(window.len());
                        for (p, n, sock, sent) in window.drain(..) {
                            let mut b = [0u8; 64];
                            match sock.recv(&mut b) {
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                                Ok(_) => data.push(p),
                                Err(_) if sent.elapsed() < Duration::from_secs(2) => {
                                    keep.push((p, n, sock, sent))
                                }
                                Err(_) if n + 1 < tries => queue.push_back((p, n + 1)),
                                Err(_) => silent.push(p),
                            }
                        }
                        window = keep;
                    }
                    (silent, data)
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let (mut silent, mut data) = (Vec::new(), Vec::new());
    for (s, d) in results {
        silent.extend(s);
        data.extend(d);
    }
    silent.sort_unstable();
    data.sort_unstable();
    (silent, data)
}
