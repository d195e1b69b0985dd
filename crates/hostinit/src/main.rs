//! `bulkhead-init`: PID 1 of the sealed host image.
//!
//! As PID 1 it (in this order): points stdin at `/dev/null` and turns the serial console's
//! receiver off (`CREAD` cleared: every byte typed on it is discarded by the UART driver, so
//! nothing can be read, echoed or executed), mounts `/proc`, `/sys`, `/dev` and `/run`, sets
//! and reads back the hardening sysctls, reads the configuration disk (`/dev/vda`, raw),
//! measures it into PCR 23, writes the controller's files to `/run/bulkhead`, configures `lo`
//! and `eth0`, then starts the attestation agent (`bulkhead-host-agent`) and
//! `bulkhead-controller` and restarts them whenever they exit, reaping every child. Any failure before the controller starts powers the host off: a host that is
//! not what it should be serves nothing. It logs to the serial console and never reads it.
//!
//! Not as PID 1 it is a tool: `bulkhead-init config-disk IN.json OUT.img` writes a
//! configuration disk from a JSON [`HostConfig`].

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use bulkhead_hostinit::config::{self, HostConfig};
use bulkhead_hostinit::sysctl::{Need, HARDENING};
use bulkhead_hostinit::tpm;

/// The controller binary inside the image.
const CONTROLLER: &str = "/usr/bin/bulkhead-controller";
/// The attestation agent inside the image.
const AGENT: &str = "/usr/bin/bulkhead-host-agent";
/// The configuration disk: the first virtio-blk device.
const CONFIG_DISK: &str = "/dev/vda";
/// Where the controller's files are written (tmpfs).
const RUN: &str = "/run/bulkhead";
/// The controller's mTLS port on every sealed host.
const LISTEN_PORT: u16 = 8443;
/// Interfaces a sealed host must not have: raw memory and ports, modules, kexec, debugfs,
/// perf, BPF, pseudo-terminals.
const SEALED_ABSENT: &[&str] = &[
    "/dev/mem",
    "/dev/kmem",
    "/dev/port",
    "/proc/kcore",
    "/proc/modules",
    "/sys/module/kexec",
    "/proc/sys/kernel/kexec_load_disabled",
    "/sys/kernel/debug/tracing",
    "/proc/sys/kernel/unprivileged_bpf_disabled",
    "/dev/ptmx",
    "/dev/tty0",
];
/// The TPM (resource manager).
const TPM_DEV: &str = "/dev/tpmrm0";

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("mount {0}: {1}")]
    Mount(&'static str, std::io::Error),
    #[error("sysctl {0}: {1}")]
    Sysctl(&'static str, std::io::Error),
    #[error("sysctl {0} reads back {1:?}")]
    SysctlReadBack(&'static str, String),
    #[error("configuration disk {CONFIG_DISK}: {0}")]
    DiskRead(std::io::Error),
    #[error("configuration disk: {0}")]
    Config(#[from] config::ConfigError),
    #[error("TPM {TPM_DEV}: {0}")]
    TpmIo(std::io::Error),
    #[error("TPM: {0}")]
    Tpm(#[from] tpm::TpmError),
    #[error("writing {0}: {1}")]
    Write(String, std::io::Error),
    #[error("network {0}: {1}")]
    Net(&'static str, std::io::Error),
    #[error("console: {0}")]
    Console(std::io::Error),
}

fn main() -> ExitCode {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        return tool();
    }
    // The console is write-only from here on: fds 1 and 2, never 0.
    let console_ok = console_write_only();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    if let Err(e) = console_ok {
        halt(&InitError::Console(e));
    }
    say("BULKHEAD-HOST-INIT pid 1 up; console input disabled");
    match setup() {
        Ok(cfg) => supervise(&cfg),
        Err(e) => halt(&e),
    }
}

/// One line on the console (markers the tests and operators look for), in one write(2) so
/// that the agent's and the controller's output cannot split it.
fn say(line: &str) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

fn halt(e: &InitError) -> ! {
    tracing::error!(error = %e, "sealed host cannot start: powering off");
    say(&format!("BULKHEAD-HOST-HALT {e}"));
    // SAFETY: sync and reboot take no pointers; PID 1 may power the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// fd 0 = /dev/null; fds 1 and 2 = the console, opened write-only; the UART's receiver off.
fn console_write_only() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).open("/dev/null");
    // Before /dev is mounted the initramfs's own /dev/console and /dev/null nodes serve.
    let console = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")?;
    let cfd = console.as_raw_fd();
    if let Ok(n) = &null {
        // SAFETY: dup2 onto fd 0 of descriptors we own.
        unsafe { libc::dup2(n.as_raw_fd(), 0) };
    } else {
        // SAFETY: closing stdin; nothing in this process reads it.
        unsafe { libc::close(0) };
    }
    // SAFETY: dup2 of an open descriptor onto 1 and 2.
    unsafe {
        libc::dup2(cfd, 1);
        libc::dup2(cfd, 2);
    }
    // SAFETY: termios is plain data; tcgetattr fills it from an open tty descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: cfd is open; t is a valid termios.
    if unsafe { libc::tcgetattr(cfd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    t.c_cflag &= !libc::CREAD;
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_iflag &= !(libc::IXON | libc::ICRNL | libc::BRKINT);
    t.c_iflag |= libc::IGNBRK;
    // SAFETY: cfd is open; t is a valid termios.
    if unsafe { libc::tcsetattr(cfd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: discards anything already received; cfd is open.
    unsafe { libc::tcflush(cfd, libc::TCIFLUSH) };
    // fds 1 and 2 keep the console open.
    drop(console);
    Ok(())
}

fn mount(
    src: &str,
    target: &'static str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| {
        CString::new(s)
            .map_err(|_| InitError::Mount(target, std::io::ErrorKind::InvalidInput.into()))
    };
    let (src_c, target_c, fs_c, data_c) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fs_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(InitError::Mount(target, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn setup() -> Result<HostConfig, InitError> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        "proc",
        "/proc",
        "proc",
        nosuid_nodev_noexec,
        "hidepid=invisible",
    )?;
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "")?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0755",
    )?;
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev_noexec, "mode=0755")?;
    mount(
        "securityfs",
        "/sys/kernel/security",
        "securityfs",
        nosuid_nodev_noexec,
        "",
    )?;
    // Re-open the console from the mounted /dev; the receiver stays off (it is one tty).
    console_write_only().map_err(InitError::Console)?;

    for s in HARDENING {
        let path = format!("/proc/sys/{}", s.path);
        if s.need == Need::IfBuilt && !Path::new(&path).exists() {
            tracing::info!(sysctl = s.path, why = s.why, "not in this kernel");
            continue;
        }
        std::fs::write(&path, s.value).map_err(|e| InitError::Sysctl(s.path, e))?;
        let back = std::fs::read_to_string(&path).map_err(|e| InitError::Sysctl(s.path, e))?;
        if back.trim() != s.value {
            return Err(InitError::SysctlReadBack(s.path, back.trim().to_string()));
        }
    }
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    say(&format!(
        "BULKHEAD-HOST-SYSCTL {} settings read back; lockdown: {}",
        HARDENING.len(),
        lockdown.trim()
    ));
    // What the kernel was built without, as seen from inside (the test checks this line).
    let absent: Vec<&str> = SEALED_ABSENT
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    let present: Vec<&str> = SEALED_ABSENT
        .iter()
        .copied()
        .filter(|p| Path::new(p).exists())
        .collect();
    say(&format!(
        "BULKHEAD-HOST-SEALED absent: {}; present: [{}]",
        absent.join(" "),
        present.join(" ")
    ));

    let mut raw = Vec::new();
    std::fs::File::open(CONFIG_DISK)
        .and_then(|f| {
            f.take(u64::try_from(config::HEADER_LEN + config::MAX_BODY).unwrap_or(u64::MAX))
                .read_to_end(&mut raw)
        })
        .map_err(InitError::DiskRead)?;
    let parsed = config::parse_disk(&raw)?;
    raw.iter_mut().for_each(|b| *b = 0);
    measure_config(&parsed.measured)?;
    let cfg = parsed.config;
    say(&format!(
        "BULKHEAD-HOST-CONFIG host_id={} address={}/{} sha256={} measured into PCR {}",
        cfg.host_id,
        cfg.address,
        cfg.prefix,
        hex::encode(parsed.measured),
        tpm::CONFIG_PCR
    ));
    write_files(&cfg)?;
    net_up(&cfg)?;
    say(&format!(
        "BULKHEAD-HOST-NET eth0 {}/{} up",
        cfg.address, cfg.prefix
    ));
    Ok(cfg)
}

fn measure_config(digest: &[u8; 32]) -> Result<(), InitError> {
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TPM_DEV)
        .map_err(InitError::TpmIo)?;
    dev.write_all(&tpm::pcr_extend_command(tpm::CONFIG_PCR, digest))
        .map_err(InitError::TpmIo)?;
    let mut resp = vec![0u8; 4096];
    let n = dev.read(&mut resp).map_err(InitError::TpmIo)?;
    tpm::check_response(resp.get(..n).unwrap_or(&[]))?;
    Ok(())
}

fn write_file(name: &str, body: &str, mode: u32) -> Result<(), InitError> {
    let path = format!("{RUN}/{name}");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| InitError::Write(path.clone(), e))?;
    f.write_all(body.as_bytes())
        .map_err(|e| InitError::Write(path.clone(), e))
}

fn write_files(c: &HostConfig) -> Result<(), InitError> {
    std::fs::create_dir_all(format!("{RUN}/state"))
        .map_err(|e| InitError::Write(RUN.to_string(), e))?;
    let _ = std::fs::set_permissions(RUN, std::fs::Permissions::from_mode(0o700));
    write_file("ca.pem", &c.ca_cert, 0o644)?;
    write_file("host.pem", &c.host_cert, 0o644)?;
    write_file("host.key", &c.host_key, 0o600)?;
    write_file("token.pub", &c.token_public_key, 0o644)?;
    write_file("rights.toml", &c.rights, 0o644)?;
    write_file("revoked.txt", &c.revocations, 0o644)?;
    // host_id is checked to be [a-z0-9-], so it needs no TOML escaping.
    let toml = format!(
        "host_id = \"{host}\"\nlisten = \"0.0.0.0:{LISTEN_PORT}\"\nca_cert = \"{RUN}/ca.pem\"\n\
         host_cert = \"{RUN}/host.pem\"\nhost_key = \"{RUN}/host.key\"\n\
         token_public_key = \"{RUN}/token.pub\"\nrights = \"{RUN}/rights.toml\"\n\
         revocations = \"{RUN}/revoked.txt\"\naudit_log = \"{RUN}/state/audit.log\"\n\
         run_dir = \"{RUN}/state/run\"\nattest_socket = \"{RUN}/attest.sock\"\n",
        host = c.host_id
    );
    write_file("controller.toml", &toml, 0o644)
}

fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    r
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    fd: i32,
    req: libc::Ioctl,
    arg: *mut libc::c_void,
    what: &'static str,
) -> Result<(), InitError> {
    // SAFETY: fd is an open socket; arg points to the structure this request takes.
    if unsafe { libc::ioctl(fd, req, arg) } != 0 {
        return Err(InitError::Net(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn link_up(fd: i32, name: &str) -> Result<(), InitError> {
    let mut r = ifreq_named(name);
    ioctl(fd, libc::SIOCGIFFLAGS, (&raw mut r).cast(), "get flags")?;
    // SAFETY: the kernel filled ifru_flags for SIOCGIFFLAGS.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    ioctl(fd, libc::SIOCSIFFLAGS, (&raw mut r).cast(), "set up")
}

/// `lo` and `eth0` up, the address and netmask from the configuration, the default route.
fn net_up(c: &HostConfig) -> Result<(), InitError> {
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(InitError::Net("socket", std::io::Error::last_os_error()));
    }
    let result = (|| {
        link_up(fd, "lo")?;
        let mut r = ifreq_named("eth0");
        r.ifr_ifru.ifru_addr = sockaddr_in(c.address);
        ioctl(fd, libc::SIOCSIFADDR, (&raw mut r).cast(), "set address")?;
        let mut r = ifreq_named("eth0");
        r.ifr_ifru.ifru_netmask = sockaddr_in(c.netmask());
        ioctl(fd, libc::SIOCSIFNETMASK, (&raw mut r).cast(), "set netmask")?;
        link_up(fd, "eth0")?;
        if let Some(gw) = c.gateway {
            // SAFETY: rtentry is plain data; all-zero is a valid value.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr_in(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            ioctl(fd, libc::SIOCADDRT, (&raw mut rt).cast(), "default route")?;
        }
        Ok(())
    })();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    result
}

fn start_controller() -> std::io::Result<u32> {
    let child = Command::new(CONTROLLER)
        .args([
            "--config",
            &format!("{RUN}/controller.toml"),
            "--backend",
            "detached",
        ])
        .env_clear()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .spawn()?;
    Ok(child.id())
}

/// Starts the agent and waits (up to 30 s) for its socket, which the controller connects to
/// once at start.
fn start_agent(cfg: &HostConfig) -> std::io::Result<u32> {
    let socket = format!("{RUN}/attest.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(AGENT)
        .args(["--socket", &socket, "--host", &cfg.host_id])
        .env_clear()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .spawn()?;
    let t = std::time::Instant::now();
    while !Path::new(&socket).exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child.id())
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    }
}

/// Starts the agent, then the controller; restarts whichever exits (1 s, doubling to 30 s
/// while they keep failing within a minute; a restarted agent also restarts the controller,
/// whose one link to it broke), and reaps every other child. Never returns.
fn supervise(cfg: &HostConfig) -> ! {
    let mut backoff = Duration::from_secs(1);
    let mut agent: Option<i32> = None;
    let mut controller: Option<(i32, std::time::Instant)> = None;
    loop {
        if agent.is_none() {
            match start_agent(cfg) {
                Ok(pid) => {
                    say(&format!("BULKHEAD-HOST-AGENT started pid {pid}"));
                    agent = i32::try_from(pid).ok();
                    if let Some((cpid, _)) = controller {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(cpid, libc::SIGTERM) };
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the attestation agent");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        if controller.is_none() {
            match start_controller() {
                Ok(pid) => {
                    say(&format!(
                        "BULKHEAD-HOST-CONTROLLER started pid {pid} host {} port {LISTEN_PORT}",
                        cfg.host_id
                    ));
                    controller =
                        Some((i32::try_from(pid).unwrap_or(-1), std::time::Instant::now()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the controller");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        let mut status = 0;
        // SAFETY: waitpid on any child; status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if agent == Some(pid) {
            say(&format!(
                "BULKHEAD-HOST-AGENT pid {pid} ended ({}); restarting",
                describe(status)
            ));
            agent = None;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        match controller {
            Some((cpid, started)) if cpid == pid => {
                say(&format!(
                    "BULKHEAD-HOST-CONTROLLER pid {pid} ended ({}); restarting",
                    describe(status)
                ));
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                controller = None;
            }
            _ => tracing::info!(pid, "reaped"),
        }
    }
}

fn tool() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1..).unwrap_or(&[]) {
        [cmd, input, output] if cmd == "config-disk" => {
            let out = std::fs::read(input)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<HostConfig>(&b).map_err(|e| e.to_string()))
                .and_then(|c| config::encode_disk(&c).map_err(|e| e.to_string()))
                .and_then(|d| std::fs::write(output, d).map_err(|e| e.to_string()));
            match out {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bulkhead-init config-disk: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("bulkhead-init runs as PID 1 of the sealed host image.\nusage: bulkhead-init config-disk IN.json OUT.img");
            ExitCode::from(2)
        }
    }
}
