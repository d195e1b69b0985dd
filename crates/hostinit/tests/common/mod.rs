//! Boots the sealed host image the way a fleet would run it here: QEMU q35 under TCG, OVMF
//! (code + a fresh copy of the variables), a per-host swtpm (tpm-crb), the UKI on a read-only
//! ESP, the configuration disk on virtio-blk, and one virtio-net NIC on a tap device inside a
//! network namespace of its own. Everything started is stopped on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const MTLS_PORT: u16 = 8443;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Everything a boot needs, or the reason it cannot run here.
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
    let mut cmd = Command::new(repo().join("scripts/build-host-image.sh"));
    cmd.arg(out)
        .env("BULKHEAD_HOST_NO_CARGO", "1")
        .env("BULKHEAD_HOST_REQUIRE_CACHE", "1");
    if let Some(c) = cmdline {
        cmd.env("BULKHEAD_HOST_CMDLINE", c);
    }
    let o = cmd
        .output()
        .map_err(|e| format!("build-host-image.sh: {e}"))?;
    if o.status.code() == Some(3) {
        return Err("the host kernel is not built: run `make host-image`".into());
    }
    assert!(
        o.status.success(),
        "build-host-image.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
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

/// A running sealed host: swtpm + QEMU, and the serial console's bytes as they arrive.
pub struct SealedHost {
    pub dir: PathBuf,
    swtpm: Child,
    qemu: Child,
    serial: UnixStream,
    pub console: Arc<Mutex<Vec<u8>>>,
    pub started: Instant,
}

impl SealedHost {
    /// Boots `uki` with `config_disk` on `net`. `dir` is this host's scratch directory.
    pub fn boot(dir: &Path, uki: &Path, config_disk: &Path, net: &HostNet) -> SealedHost {
        std::fs::create_dir_all(dir.join("esp/EFI/BOOT")).expect("esp dir");
        std::fs::copy(uki, dir.join("esp/EFI/BOOT/BOOTX64.EFI")).expect("copy UKI");
        std::fs::copy(OVMF_VARS, dir.join("OVMF_VARS.fd")).expect("vars copy");
        let tpm_dir = dir.join("tpm");
        std::fs::create_dir_all(&tpm_dir).expect("tpm dir");
        let ctrl = tpm_dir.join("ctrl.sock");
        let swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate"])
            .arg("--tpmstate")
            .arg(format!("dir={}", tpm_dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--log")
            .arg(format!("file={}", tpm_dir.join("swtpm.log").display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start swtpm");
        let t = Instant::now();
        while !ctrl.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let serial_path = dir.join("serial.sock");
        let started = Instant::now();
        let qemu = Command::new("ip")
            .args(["netns", "exec", &net.ns, "qemu-system-x86_64"])
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
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                net.tap
            ))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .args(["-device", "virtio-rng-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser,path={},server=on,wait=on",
                serial_path.display()
            ))
            .args(["-serial", "chardev:ser"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("qemu.out")).expect("qemu.out"))
            .stderr(std::fs::File::create(dir.join("qemu.err")).expect("qemu.err"))
            .spawn()
            .expect("start qemu");
        let t = Instant::now();
        let serial = loop {
            match UnixStream::connect(&serial_path) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!(
                    "serial socket: {e}; {}",
                    std::fs::read_to_string(dir.join("qemu.err")).unwrap_or_default()
                ),
            }
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut reader = serial.try_clone().expect("clone serial");
        let sink = console.clone();
        let log_path = dir.join("console.log");
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&buf[..n]);
                }
                if let Ok(mut c) = sink.lock() {
                    c.extend_from_slice(&buf[..n]);
                }
            }
        });
        SealedHost {
            dir: dir.to_path_buf(),
            swtpm,
            qemu,
            serial,
            console,
            started,
        }
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().expect("console lock")).into_owned()
    }

    pub fn console_len(&self) -> usize {
        self.console.lock().expect("console lock").len()
    }

    /// Waits until the console shows `marker`; returns the time since QEMU started.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(marker) {
                return self.started.elapsed();
            }
            if let Ok(Some(st)) = self.qemu.try_wait() {
                panic!(
                    "QEMU exited ({st}) before {marker:?}; console:\n{text}\nqemu: {}",
                    std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < timeout,
                "no {marker:?} within {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn type_on_console(&mut self, bytes: &[u8]) {
        self.serial.write_all(bytes).expect("write serial");
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(Some(_)))
    }
}

impl Drop for SealedHost {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.swtpm.kill();
        let _ = self.swtpm.wait();
    }
}

/// TCP connect scan of every port of `ip`, from the current thread's network namespace:
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
            hs.into_iter()
                .map(|h| h.join().expect("scan thread"))
                .collect()
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
        hs.into_iter()
            .map(|h| h.join().expect("scan thread"))
            .collect()
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
