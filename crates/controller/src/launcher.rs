//! The launcher: the only part of the controller that may start processes or connect to a
//! socket.
//!
//! The controller's own seccomp filter traps `execve`/`execveat` and every `connect` (see
//! [`crate::sandbox`]). It still has to start one `bulkhead-hypervisor` per instance and one
//! `bulkhead-blockcard` per attached volume, and reach the cards' unix sockets. So at start-up,
//! *before* the filter is installed and before any thread, key or socket exists, the controller
//! re-executes itself as a small launcher process (`bulkhead-controller --launcher-fd N`) that
//! keeps one end of a `SOCK_SEQPACKET` socketpair. From then on the controller asks it, in typed
//! messages, for exactly four things:
//!
//! | request | what the launcher does | fd returned |
//! |---|---|---|
//! | `SpawnVm` | starts the configured hypervisor binary with `serve` (through `bulkhead-hypervisor-client`) | our end of the VM's private channel |
//! | `SpawnCard` | starts the configured block-card binary (or an installed release's, `v<N>/bulkhead-blockcard`) for one backing file under the volume dir, waits for its control socket and connects to it | the control connection |
//! | `ConnectVhost` | connects to the vhost-user socket of a card it started | the vhost-user connection |
//! | `Reap` | waits for a child it started to exit (SIGKILL after a grace period) | none |
//! | `SpawnNetCard` | starts the configured net-card binary, or installed release `release`'s (`vhost` mode) for one instance interface: writes the sealed epoch key to a 0600 file in its run directory (removed once the card has read it), keeps the interface's sequence-floor file there across restarts, waits for the card's control socket | none |
//! | `ConnectNetControl` | connects to the control socket of a net card it started (one request per connection) | the control connection |
//! | `Exited` | lists children that exited on their own since the last ask (a net card killed -9 is restarted by the controller) | none |
//! | `Children` | (keeper) every child it holds: pid, kind, running, committed | none |
//! | `TakeChannel` | (keeper) a dup of hypervisor `pid`'s channel, for a controller that adopts it | the channel |
//! | `ConnectCardControl` | connects to the control socket of a block card it started | the control connection |
//! | `Commit` | (keeper) these children are in the controller's durable record: they outlive it | none |
//! | `SelfTest` | runs `bulkhead-hypervisor self-test` of an installed release (bounded) | none |
//! | `SpawnIncoming` | starts the hypervisor of an installed release (or the configured one) with `incoming`, the new side of a live update; keeps its channel like a `SpawnVm`'s and holds its hand-over end | our end of the new process's channel |
//! | `TakeHandover` | the hand-over end of an `incoming` process it started (once), for the old hypervisor | the hand-over socket |
//!
//! The launcher runs the binaries fixed when it starts (never named in a request) and, for a
//! release the controller installed, `release_dir/v<N>/bulkhead-{hypervisor,blockcard,netcard}`
//! (the request names only the version N; the path is the launcher's). It trusts nothing the
//! controller says about a release: it re-verifies `v<N>/release.json` 2-of-3 against the trust
//! root it read when it started ([`LauncherConfig::release_root`], the controller's pinned root;
//! never sent per request), the environment and the directory's version, hashes the binary
//! through an `O_NOFOLLOW` descriptor against the manifest's SHA-384
//! ([`bulkhead_rot::supervise::verify_release_artefact`]) and executes that descriptor
//! (`/proc/self/fd/N`), not the path; a binary that does not verify is refused
//! (`release_binary_unverified`) and nothing starts. Kernel
//! and initrd paths must lie in the configured guest directory and backing files in the volume
//! directory; sockets are created under its own run directory with names it chooses. It has no
//! network: its own seccomp filter kills it on `socket()` of any family but `AF_UNIX`, so its
//! `connect` can only ever reach a unix socket. It holds no TLS key, token key or audit log (it
//! was exec'd before the controller read any).
//!
//! It is also the host's **keeper**: it outlives the controller. It keeps a dup of each
//! hypervisor's channel (never read), so a hypervisor never sees its channel close while the
//! keeper lives, and listens on `run_dir/keeper.sock` (0600, peer uid checked). When the
//! controller goes away, children it never committed to its host record (`Commit`) are killed
//! (their operation was never acknowledged) and the rest keep running; a restarted controller
//! connects to the keeper socket and adopts them (`Children`, `TakeChannel`,
//! `ConnectCardControl`). With no child left the keeper exits. See ARCHITECTURE.md, "Controller
//! restart".

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulkhead_rot::release::PinnedTrust;
use bulkhead_rot::supervise::{verify_release_artefact, ArtefactPolicy};
use serde::{Deserialize, Serialize};

/// Most request queues a card is started with.
pub const MAX_CARD_QUEUES: u16 = 16;

fn one_queue() -> u16 {
    1
}

/// Largest launcher message (either direction): a net card's spawn request carries its routes.
pub const MAX_MESSAGE: usize = 96 * 1024;
/// How long the launcher waits for a card's control socket to come up.
const CARD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Fixed at launcher start; never changed by a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherConfig {
    pub hypervisor_bin: PathBuf,
    pub blockcard_bin: PathBuf,
    /// The host cores' CPUs (see [`crate::cores`]): the launcher confines itself to them at
    /// start, so every hypervisor and card it starts inherits them, and it refuses a `SpawnVm`
    /// whose `pin` names one of them. Empty: cores are shared (nothing confined or checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_cpus: Vec<usize>,
    /// Kernels and initrds must be inside this directory.
    pub guest_dir: PathBuf,
    /// Backing files must be inside this directory.
    pub volume_dir: PathBuf,
    /// Card sockets are created here.
    pub run_dir: PathBuf,
    /// Host key file handed to every card (`--host-key`); never read by the launcher.
    pub host_key: Option<PathBuf>,
    /// `bulkhead-netcard` binary. Without it no net card is started.
    #[serde(default)]
    pub netcard_bin: Option<PathBuf>,
    /// The host's TLS identity handed to block cards of network volumes (they present it to
    /// the storage node); the launcher passes the paths, never reads the key. Unset: this host
    /// serves no network volume.
    #[serde(default)]
    pub card_tls: Option<CardTls>,
    /// Installed releases (`v<N>/` per version, written by the controller's DeployRelease
    /// after the release's signatures and digests are checked). Unset: no release runs here.
    #[serde(default)]
    pub release_dir: Option<PathBuf>,
    /// The release trust root pinned at provisioning (the controller's `release_root`), read
    /// once when the launcher starts: every release binary it starts is re-verified against it
    /// (2-of-3 signatures, environment, the file's SHA-384 through the descriptor it then
    /// executes). Unset or unreadable: no release binary is started.
    #[serde(default)]
    pub release_root: Option<PathBuf>,
    /// The environment releases must name (the controller's `release_environment`, default
    /// `dev`).
    #[serde(default)]
    pub release_environment: Option<String>,
}

/// The hypervisor binary's file name inside a release directory.
pub const RELEASE_HYPERVISOR: &str = "bulkhead-hypervisor";
/// The block-card binary's file name inside a release directory.
pub const RELEASE_BLOCKCARD: &str = "bulkhead-blockcard";
/// The net-card binary's file name inside a release directory.
pub const RELEASE_NETCARD: &str = "bulkhead-netcard";
/// Longest a release's hypervisor self-test may run.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of installed release `version` under `release_dir`.
pub fn release_path(release_dir: &Path, version: u64) -> PathBuf {
    release_dir.join(format!("v{version}"))
}

/// The CA and the host's certificate and key files a network volume's card reads at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One instance interface's net card, as the launcher starts it (`bulkhead-netcard vhost`).
/// Every socket and file path is the launcher's choice, derived from `interface` under its run
/// directory; the request names none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetCardLaunch {
    /// The interface's name (the instance id): names its files in the run directory. Its
    /// sequence-floor file `net-<interface>.seq` is kept across card restarts.
    pub interface: String,
    /// `HOSTIP:PORT` the card receives its VPC peers' datagrams on.
    pub listen: std::net::SocketAddr,
    pub vpc: u32,
    pub card_id: u32,
    pub epoch: u32,
    /// The sealed epoch key (hex of the `bulkhead-sealing` blob). Written to a 0600 file the
    /// card reads before its sandbox; the launcher removes it once the card is up.
    pub sealed_key: String,
    pub mac: String,
    /// `A.B.C.D/P`.
    pub ip: String,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u16,
    pub routes: Vec<String>,
    pub allow: Vec<String>,
}

/// Controller → launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum LaunchRequest {
    SpawnVm {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        memory_mib: u64,
        vcpus: u8,
        /// Host CPUs of the instance's whole cores: vCPU `i` is pinned to entry `i mod n`
        /// (`bulkhead-hypervisor --pin`). Empty: not pinned.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pin: Vec<usize>,
        run_as: Option<(u32, u32)>,
        /// Start the hypervisor of this installed release (`None`: the configured binary).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<u64>,
    },
    /// Run the self-test of installed release `release`'s hypervisor.
    SelfTest {
        release: u64,
    },
    /// Start the new side of a live update: the hypervisor of installed release `release`
    /// (`None`: the configured binary) with `incoming`.
    SpawnIncoming {
        release: Option<u64>,
        run_as: Option<(u32, u32)>,
    },
    /// The hand-over end of `incoming` process `pid` (given out once).
    TakeHandover {
        pid: u32,
    },
    SpawnCard {
        /// A file in the volume directory; `None` with `network` set.
        backing: Option<PathBuf>,
        /// A network volume: the card is the storage node's NBD client.
        #[serde(default)]
        network: Option<crate::api::NetworkVolume>,
        read_only: bool,
        /// Request queues the card serves (one per guest vCPU), 1..=MAX_CARD_QUEUES.
        #[serde(default = "one_queue")]
        queues: u16,
        run_as: Option<(u32, u32)>,
        /// Start the block card of this installed release (`None`: the configured binary).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<u64>,
    },
    ConnectVhost {
        pid: u32,
    },
    SpawnNetCard {
        card: NetCardLaunch,
        run_as: Option<(u32, u32)>,
        /// Start the net card of this installed release (`None`: the configured binary).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<u64>,
    },
    ConnectNetControl {
        pid: u32,
    },
    /// Children that exited on their own since the last ask.
    Exited,
    Reap {
        pid: u32,
        grace_ms: u64,
    },
    /// Children the sandbox killed (died of SIGSYS) since the last ask.
    SandboxKills,
    /// Keeper: every child it holds (a new controller's first question).
    Children,
    /// Keeper: a dup of the channel of hypervisor `pid` (the keeper holds one so the hypervisor
    /// never sees its channel close while no controller runs; it never reads it).
    TakeChannel {
        pid: u32,
    },
    /// A new connection to the control socket of block card `pid`.
    ConnectCardControl {
        pid: u32,
    },
    /// Keeper: these children are in the controller's durable host record. A child not yet
    /// committed is killed if the controller goes away (its operation was never acknowledged).
    Commit {
        pids: Vec<u32>,
    },
}

/// What kind of process a child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildKind {
    Hypervisor,
    Card,
    NetCard,
}

/// One child the keeper holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildInfo {
    pub pid: u32,
    pub kind: ChildKind,
    /// Still running (not exited).
    pub running: bool,
    /// Named in the controller's durable record (see `Commit`).
    pub committed: bool,
}

/// A child that died of SIGSYS: its seccomp filter killed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxKill {
    pub pid: u32,
    /// `card` or `hypervisor`.
    pub process: String,
}

/// Launcher → controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum LaunchReply {
    /// A child was started; an fd rides with this reply.
    Spawned {
        pid: u32,
    },
    /// A connection was made; an fd rides with this reply.
    Connected,
    /// The child is gone; `killed` if it had to be killed.
    Reaped {
        killed: bool,
    },
    Refused {
        code: LaunchRefusal,
    },
    SandboxKills {
        kills: Vec<SandboxKill>,
    },
    Exited {
        pids: Vec<u32>,
    },
    Children {
        children: Vec<ChildInfo>,
    },
    Committed,
    /// A release's hypervisor self-test ran: `ok` if it exited 0 in time.
    SelfTested {
        ok: bool,
    },
}

/// Why the launcher refused (stable codes; details go to its log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum LaunchRefusal {
    #[error("malformed launcher request")]
    Malformed,
    #[error("path outside the launcher's allowed directories")]
    PathNotAllowed,
    #[error("starting the process failed")]
    SpawnFailed,
    #[error("the block card did not come up")]
    CardNotReady,
    #[error("connecting to the card's socket failed")]
    ConnectFailed,
    #[error("no such child")]
    NoSuchChild,
    #[error("vCPU pinning names a host core's CPU or an impossible CPU")]
    PinNotAllowed,
    #[error("no such installed release")]
    NoSuchRelease,
    #[error("the release's binary does not verify against the host's trust root")]
    ReleaseBinaryUnverified,
}

/// Errors of the controller's side of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("starting the launcher: {0}")]
    Start(std::io::Error),
    #[error("launcher channel I/O: {0}")]
    Io(std::io::Error),
    #[error("launcher closed its channel")]
    Closed,
    #[error("launcher sent a malformed reply")]
    BadReply,
    #[error("launcher refused: {0}")]
    Refused(LaunchRefusal),
    #[error("launcher reply carried no fd")]
    MissingFd,
    #[error("the host's keeper is held by another running controller")]
    KeeperBusy,
}

/// The keeper's socket in its run directory (0600, `SOCK_SEQPACKET`): a restarted controller
/// connects here to adopt the running children.
pub const KEEPER_SOCKET: &str = "keeper.sock";
/// The keeper's pid, written next to its socket (for operators and test harnesses).
pub const KEEPER_PID_FILE: &str = "keeper.pid";

/// A `sockaddr_un` for `path`, or `None` if it does not fit.
fn unix_addr(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).ok()?;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*b]);
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, libc::socklen_t::try_from(len).ok()?))
}

fn seqpacket_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects a `SOCK_SEQPACKET` socket to `path`.
fn seqpacket_connect(path: &Path) -> std::io::Result<OwnedFd> {
    let (addr, len) =
        unix_addr(path).ok_or_else(|| std::io::Error::other("socket path too long"))?;
    let fd = seqpacket_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Binds and listens on a 0600 `SOCK_SEQPACKET` socket at `path` (a stale file is replaced).
fn seqpacket_listen(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let (addr, len) =
        unix_addr(path).ok_or_else(|| std::io::Error::other("socket path too long"))?;
    let fd = seqpacket_socket()?;
    let _ = std::fs::remove_file(path);
    // SAFETY: umask only changes this (single-threaded) process's file creation mask; the
    // socket file is created 0600 from the start and the old mask is restored right after.
    let old = unsafe { libc::umask(0o177) };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    let bind_err = std::io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::umask(old) };
    if rc != 0 {
        return Err(bind_err);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: plain listen(2) on our own bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// The uid and pid of the process at the other end of a unix socket.
fn peer_cred(fd: RawFd) -> std::io::Result<(u32, u32)> {
    // SAFETY: ucred is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: `cred` is a writable ucred and `len` holds its size, as SO_PEERCRED expects.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, u32::try_from(cred.pid).unwrap_or(0)))
}

/// The one SCM_RIGHTS sender (the hypervisor channel's).
pub(crate) use bulkhead_hypervisor_client::send_packet;
use bulkhead_hypervisor_client::seqpacket_pair;

/// Receives one packet of at most [`MAX_MESSAGE`] bytes and at most one fd. Returns `None` on
/// end of stream. Extra fds (which a well-behaved peer never sends) are closed.
fn recv_packet(sock: RawFd) -> std::io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cbuf = [0u64; 16];
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // SAFETY: msghdr is plain data; all-zero is a valid initial value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: `msg` points at `iov` (one slice over `buf`) and `cbuf`, both valid and
        // writable for their stated lengths for the duration of the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut got: Vec<OwnedFd> = Vec::new();
        // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of cmsgs; we walk
        // them only with the CMSG macros and read each fd with an unaligned read inside the
        // cmsg's data area, whose length we check against `cmsg_len`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let header = usize::try_from(libc::CMSG_LEN(0)).unwrap_or(usize::MAX);
                    let bytes = (*cmsg).cmsg_len.saturating_sub(header);
                    let count = bytes / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        if fd >= 0 {
                            got.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 && got.is_empty() {
            return Ok(None);
        }
        if n > MAX_MESSAGE || msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(std::io::Error::other("oversized launcher message"));
        }
        buf.truncate(n);
        let fd = if got.len() == 1 { got.pop() } else { None };
        return Ok(Some((buf, fd)));
    }
}

/// The controller's handle on its launcher.
pub struct Launcher {
    sock: Mutex<UnixStream>,
    pid: u32,
    /// Reached through the keeper socket: a launcher a previous controller started.
    adopted: bool,
}

impl Launcher {
    /// Re-executes the current binary as the launcher. Call before the sandbox is installed
    /// and before any other thread or secret exists.
    pub fn start(cfg: &LauncherConfig) -> Result<Launcher, LauncherError> {
        let (ours, theirs) = seqpacket_pair().map_err(LauncherError::Start)?;
        let child_fd = theirs.as_raw_fd();
        let json = serde_json::to_string(cfg)
            .map_err(|e| LauncherError::Start(std::io::Error::other(e)))?;
        let mut cmd = Proc::new("/proc/self/exe");
        cmd.arg0("bulkhead-controller-launcher")
            .arg("--launcher-fd")
            .arg(child_fd.to_string())
            .arg("--launcher-config")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure only calls fcntl (async-signal-safe) to clear CLOEXEC on the one
        // fd the launcher must inherit.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(LauncherError::Start)?;
        drop(theirs);
        let sock = UnixStream::from(ours);
        // Spawning a card waits up to CARD_READY_TIMEOUT for it; allow that plus slack.
        sock.set_read_timeout(Some(CARD_READY_TIMEOUT + Duration::from_secs(30)))
            .map_err(LauncherError::Start)?;
        tracing::info!(pid = child.id(), "launcher started");
        Ok(Launcher {
            sock: Mutex::new(sock),
            pid: child.id(),
            adopted: false,
        })
    }

    /// Connects to the keeper a previous controller left running in `run_dir` (its children
    /// kept running when that controller went away). `Ok(None)`: no keeper runs there (no
    /// socket, or a stale one, which is removed). Call before the sandbox (it connects).
    pub fn connect_keeper(run_dir: &Path) -> Result<Option<Launcher>, LauncherError> {
        let path = run_dir.join(KEEPER_SOCKET);
        let fd = match seqpacket_connect(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!(socket = %path.display(), "stale keeper socket removed");
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
            Err(e) => return Err(LauncherError::Start(e)),
        };
        let l = Self::adopted_from(fd)?;
        // A keeper that already serves a controller closes a second connection at once.
        match l.call(&LaunchRequest::Children) {
            Ok(_) => {}
            Err(LauncherError::Closed) | Err(LauncherError::Io(_)) => {
                return Err(LauncherError::KeeperBusy)
            }
            Err(e) => return Err(e),
        }
        tracing::info!(pid = l.pid, "keeper found: adopting its children");
        Ok(Some(l))
    }

    /// A connection to a keeper that already runs (its pid from the socket's peer
    /// credentials), with the controller's read timeout.
    fn adopted_from(fd: OwnedFd) -> Result<Launcher, LauncherError> {
        let (_, pid) = peer_cred(fd.as_raw_fd()).map_err(LauncherError::Start)?;
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(CARD_READY_TIMEOUT + Duration::from_secs(30)))
            .map_err(LauncherError::Start)?;
        Ok(Launcher {
            sock: Mutex::new(sock),
            pid,
            adopted: true,
        })
    }

    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether this launcher was started by a previous controller (found as a keeper).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Every child the keeper holds.
    pub fn children(&self) -> Result<Vec<ChildInfo>, LauncherError> {
        match self.call(&LaunchRequest::Children)? {
            (LaunchReply::Children { children }, _) => Ok(children),
            _ => Err(LauncherError::BadReply),
        }
    }

    /// Marks children as recorded (see [`LaunchRequest::Commit`]).
    pub fn commit(&self, pids: &[u32]) -> Result<(), LauncherError> {
        if pids.is_empty() {
            return Ok(());
        }
        self.call(&LaunchRequest::Commit {
            pids: pids.to_vec(),
        })
        .map(|_| ())
    }

    /// One request, one reply (and the fd that rides with it, if any).
    pub fn call(
        &self,
        req: &LaunchRequest,
    ) -> Result<(LaunchReply, Option<OwnedFd>), LauncherError> {
        let body = serde_json::to_vec(req).map_err(|_| LauncherError::BadReply)?;
        let sock = match self.sock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        send_packet(sock.as_raw_fd(), &body, None).map_err(LauncherError::Io)?;
        let (bytes, fd) = recv_packet(sock.as_raw_fd())
            .map_err(LauncherError::Io)?
            .ok_or(LauncherError::Closed)?;
        let reply: LaunchReply =
            serde_json::from_slice(&bytes).map_err(|_| LauncherError::BadReply)?;
        if let LaunchReply::Refused { code } = reply {
            return Err(LauncherError::Refused(code));
        }
        Ok((reply, fd))
    }

    /// A call whose reply must carry an fd.
    pub fn call_fd(&self, req: &LaunchRequest) -> Result<(LaunchReply, OwnedFd), LauncherError> {
        let (r, fd) = self.call(req)?;
        Ok((r, fd.ok_or(LauncherError::MissingFd)?))
    }
}

// ---------------------------------------------------------------------------------------------
// The launcher process.

/// `path` has no `..`, is absolute, and lies inside `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        && path.starts_with(dir)
}

struct CardChild {
    vhost: PathBuf,
    control: PathBuf,
    /// Net cards: connections to `control` are one request each.
    net: bool,
}

struct LauncherState {
    cfg: LauncherConfig,
    children: BTreeMap<u32, Child>,
    cards: BTreeMap<u32, CardChild>,
    seq: u64,
    /// Children whose exit was already looked at.
    exited: std::collections::BTreeSet<u32>,
    /// Exits not yet reported by `Exited`.
    unreported: Vec<u32>,
    sandbox_kills: Vec<SandboxKill>,
    /// A dup of each hypervisor's channel (never read: it only keeps the channel open).
    channels: BTreeMap<u32, OwnedFd>,
    /// Children started but not yet in the controller's durable record.
    uncommitted: std::collections::BTreeSet<u32>,
    /// Hand-over ends of `incoming` hypervisors not yet taken.
    handovers: BTreeMap<u32, UnixStream>,
    /// The trust root and environment release binaries are verified against (read at start).
    trust: Option<PinnedTrust>,
}

/// The binaries a release may replace, each standing in for one the launcher is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinaryRole {
    Hypervisor,
    BlockCard,
    NetCard,
}

impl BinaryRole {
    /// The artefact name a release carries this binary under.
    fn release_name(self) -> &'static str {
        match self {
            BinaryRole::Hypervisor => RELEASE_HYPERVISOR,
            BinaryRole::BlockCard => RELEASE_BLOCKCARD,
            BinaryRole::NetCard => RELEASE_NETCARD,
        }
    }
}

/// A binary the launcher is about to execute: the path to exec (for a release's binary,
/// `/proc/self/fd/N` of the descriptor its digest was checked through, kept open until the
/// child has exec'd it) and the path it was found at (for logs).
struct Exe {
    run: PathBuf,
    shown: PathBuf,
    _fd: Option<std::fs::File>,
}

impl Exe {
    fn configured(path: &Path) -> Exe {
        Exe {
            run: path.to_path_buf(),
            shown: path.to_path_buf(),
            _fd: None,
        }
    }
}

/// The trust root and environment `cfg` names, read now; `None` (logged) when unset or bad.
fn load_trust(cfg: &LauncherConfig) -> Option<PinnedTrust> {
    let path = cfg.release_root.as_ref()?;
    match PinnedTrust::load(path, cfg.release_environment.as_deref()) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(root = %path.display(), error = %e, "launcher: release trust root or environment unusable: no release binary will start");
            None
        }
    }
}

/// Every address family but `AF_UNIX` (1) and `AF_INET` (2), up to past the kernel's
/// `AF_MAX` (46).
const DENIED_FAMILIES: &[u64] = &[
    0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
    28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
];

/// The launcher's filter: `socket()` of any family but `AF_UNIX` and `AF_INET` kills it;
/// everything else runs (it must exec the hypervisor and card binaries and connect to the
/// cards' sockets). `AF_INET` is there only because a filter is inherited across `exec`: the
/// net cards it starts must bind their UDP socket before their own, tighter filter. The launcher
/// itself opens none (it holds no secret, and its only peer is the controller's socketpair).
/// TODO(issue 13): hand net cards a UDP socket bound by a separate spawner instead, so the
/// launcher can be back to `AF_UNIX` only.
const LAUNCHER_DENY: &[bulkhead_harden::Rule] = &[bulkhead_harden::Rule::arg_one_of(
    libc::SYS_socket,
    0,
    DENIED_FAMILIES,
)];

/// The launcher's seccomp filter, as data.
pub(crate) static LAUNCHER_FILTER: bulkhead_harden::Filter = bulkhead_harden::Filter {
    name: "controller-launcher",
    tables: &[LAUNCHER_DENY],
    listed: bulkhead_harden::Action::KillProcess,
    otherwise: bulkhead_harden::Action::Allow,
};

/// Runs the launcher loop on the inherited fd, then, as the host's keeper, for as long as it
/// holds children: when the controller goes away, children it never committed are killed and
/// the rest keep running; a restarted controller connects to the keeper socket and takes over.
/// Returns when the controller is gone and no child is left.
pub fn run_launcher(fd: RawFd, cfg: LauncherConfig) -> Result<(), LauncherError> {
    let hardening =
        |e: bulkhead_harden::HardenError| LauncherError::Start(std::io::Error::other(e));
    // On the host cores before anything else: every child inherits them (a hypervisor moves
    // only its vCPU threads to the instance's cores).
    if !cfg.host_cpus.is_empty() {
        crate::cores::confine_process(&cfg.host_cpus)
            .map_err(|e| LauncherError::Start(std::io::Error::other(e)))?;
    }
    // Nothing else in this fresh, single-threaded process refers to the fds closed here.
    bulkhead_harden::close_other_fds(&[fd]).map_err(hardening)?;
    // SAFETY: `fd` was inherited from the controller for exactly this purpose and nothing else
    // in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: re-set CLOEXEC on our own fd so no child inherits the controller's channel.
    unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    bulkhead_harden::no_new_privs().map_err(hardening)?;
    bulkhead_harden::set_non_dumpable().map_err(hardening)?;
    LAUNCHER_FILTER.install().map_err(hardening)?;
    std::fs::create_dir_all(&cfg.run_dir).map_err(LauncherError::Start)?;
    let keeper_path = cfg.run_dir.join(KEEPER_SOCKET);
    let pid_path = cfg.run_dir.join(KEEPER_PID_FILE);
    let listener = seqpacket_listen(&keeper_path).map_err(LauncherError::Start)?;
    let _ = std::fs::write(&pid_path, format!("{}\n", std::process::id()));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let my_uid = unsafe { libc::geteuid() };
    let mut st = LauncherState::new(cfg);
    let mut ctl: Option<OwnedFd> = Some(sock);
    loop {
        let ctl_fd = ctl.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let mut fds = [
            libc::pollfd {
                fd: ctl_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call
        // (a negative fd is ignored by poll).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if ctl.is_none() {
            st.reap_exited();
        }
        // A controller that died and the next one connecting can show up in the same poll:
        // the dead one's hang-up is handled first (below), the new connection waits in the
        // backlog for the next round instead of being refused as a second controller.
        let old_gone = ctl.is_some() && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if fds[1].revents & libc::POLLIN != 0 && !old_gone {
            // SAFETY: accept4 on our listening socket; the result is checked before use.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c >= 0 {
                // SAFETY: `c` was just returned by accept4 and is owned by nobody else.
                let conn = unsafe { OwnedFd::from_raw_fd(c) };
                let uid = peer_cred(conn.as_raw_fd()).ok().map(|(u, _)| u);
                if ctl.is_some() {
                    tracing::warn!("keeper: a second controller connected while one runs; closed");
                } else if uid != Some(my_uid) {
                    tracing::warn!(?uid, "keeper: connection from another user refused");
                } else {
                    tracing::info!("keeper: a new controller connected; it adopts the children");
                    ctl = Some(conn);
                }
            }
        }
        let Some(sock) = ctl.as_ref() else {
            continue;
        };
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            continue;
        }
        let packet = match recv_packet(sock.as_raw_fd()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "launcher: bad packet");
                let reply = LaunchReply::Refused {
                    code: LaunchRefusal::Malformed,
                };
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if send_packet(sock.as_raw_fd(), &body, None).is_err() {
                    ctl = None;
                    if st.controller_gone() {
                        break;
                    }
                }
                continue;
            }
        };
        let Some((bytes, _ignored_fd)) = packet else {
            ctl = None;
            if st.controller_gone() {
                break;
            }
            continue;
        };
        let (reply, fd) = match serde_json::from_slice::<LaunchRequest>(&bytes) {
            Ok(req) => st.handle(req),
            Err(_) => (
                LaunchReply::Refused {
                    code: LaunchRefusal::Malformed,
                },
                None,
            ),
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        if send_packet(sock.as_raw_fd(), &body, fd.as_ref().map(AsRawFd::as_raw_fd)).is_err() {
            ctl = None;
            if st.controller_gone() {
                break;
            }
            continue;
        }
        st.reap_exited();
    }
    st.kill_all();
    let _ = std::fs::remove_file(&keeper_path);
    let _ = std::fs::remove_file(&pid_path);
    Ok(())
}

impl LauncherState {
    /// A launcher holding no child yet; the release trust root is read now.
    fn new(cfg: LauncherConfig) -> LauncherState {
        LauncherState {
            trust: load_trust(&cfg),
            cfg,
            children: BTreeMap::new(),
            cards: BTreeMap::new(),
            seq: 0,
            exited: std::collections::BTreeSet::new(),
            unreported: Vec::new(),
            sandbox_kills: Vec::new(),
            channels: BTreeMap::new(),
            uncommitted: std::collections::BTreeSet::new(),
            handovers: BTreeMap::new(),
        }
    }

    fn refuse(code: LaunchRefusal) -> (LaunchReply, Option<OwnedFd>) {
        (LaunchReply::Refused { code }, None)
    }

    fn handle(&mut self, req: LaunchRequest) -> (LaunchReply, Option<OwnedFd>) {
        match req {
            LaunchRequest::SpawnVm {
                kernel,
                initrd,
                cmdline,
                memory_mib,
                vcpus,
                pin,
                run_as,
                release,
            } => {
                let binary = match self.binary(BinaryRole::Hypervisor, release) {
                    Ok(b) => b,
                    Err(code) => return Self::refuse(code),
                };
                let dir = &self.cfg.guest_dir;
                if !inside(&kernel, dir) || initrd.as_ref().is_some_and(|i| !inside(i, dir)) {
                    return Self::refuse(LaunchRefusal::PathNotAllowed);
                }
                // An instance's vCPUs never run on the host cores the cards and the controller
                // use (the controller allocates, the launcher checks).
                if pin.len() > crate::cores::MAX_CPU + 1
                    || pin
                        .iter()
                        .any(|c| *c > crate::cores::MAX_CPU || self.cfg.host_cpus.contains(c))
                {
                    return Self::refuse(LaunchRefusal::PinNotAllowed);
                }
                let spec = bulkhead_hypervisor_client::VmSpec {
                    binary: binary.run.clone(),
                    kernel,
                    initrd,
                    cmdline,
                    memory_mib,
                    vcpus,
                    pin,
                    run_as,
                };
                match bulkhead_hypervisor_client::spawn_process(&spec) {
                    Ok((child, chan)) => {
                        let pid = child.id();
                        tracing::info!(pid, binary = %binary.shown.display(), "launcher: hypervisor started");
                        self.children.insert(pid, child);
                        self.uncommitted.insert(pid);
                        match chan.try_clone() {
                            Ok(keep) => {
                                self.channels.insert(pid, keep);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, pid, "keeper: cannot keep the channel; the VM will not outlive its controller");
                            }
                        }
                        (LaunchReply::Spawned { pid }, Some(chan))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "launcher: hypervisor spawn failed");
                        Self::refuse(LaunchRefusal::SpawnFailed)
                    }
                }
            }
            LaunchRequest::SelfTest { release } => {
                match self.binary(BinaryRole::Hypervisor, Some(release)) {
                    Ok(binary) => (
                        LaunchReply::SelfTested {
                            ok: run_self_test(&binary.run),
                        },
                        None,
                    ),
                    Err(code) => Self::refuse(code),
                }
            }
            LaunchRequest::SpawnIncoming { release, run_as } => {
                let binary = match self.binary(BinaryRole::Hypervisor, release) {
                    Ok(b) => b,
                    Err(code) => return Self::refuse(code),
                };
                match bulkhead_hypervisor_client::spawn_incoming(&binary.run, run_as) {
                    Ok((child, chan, handover)) => {
                        let pid = child.id();
                        tracing::info!(pid, binary = %binary.shown.display(), "launcher: incoming hypervisor started (live update)");
                        self.children.insert(pid, child);
                        self.uncommitted.insert(pid);
                        self.handovers.insert(pid, handover);
                        match chan.try_clone() {
                            Ok(keep) => {
                                self.channels.insert(pid, keep);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, pid, "keeper: cannot keep the channel; the VM will not outlive its controller");
                            }
                        }
                        (LaunchReply::Spawned { pid }, Some(chan))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "launcher: incoming hypervisor spawn failed");
                        Self::refuse(LaunchRefusal::SpawnFailed)
                    }
                }
            }
            LaunchRequest::TakeHandover { pid } => match self.handovers.remove(&pid) {
                Some(s) => (LaunchReply::Connected, Some(OwnedFd::from(s))),
                None => Self::refuse(LaunchRefusal::NoSuchChild),
            },
            LaunchRequest::SpawnCard {
                backing,
                network,
                read_only,
                queues,
                run_as,
                release,
            } => match self.binary(BinaryRole::BlockCard, release) {
                Ok(bin) => self.spawn_card(&bin, backing, network, read_only, queues, run_as),
                Err(code) => Self::refuse(code),
            },
            LaunchRequest::SpawnNetCard {
                card,
                run_as,
                release,
            } => self.spawn_net_card(&card, run_as, release),
            LaunchRequest::ConnectNetControl { pid } => {
                let Some(card) = self.cards.get(&pid).filter(|c| c.net) else {
                    return Self::refuse(LaunchRefusal::NoSuchChild);
                };
                match UnixStream::connect(&card.control) {
                    Ok(s) => (LaunchReply::Connected, Some(OwnedFd::from(s))),
                    Err(e) => {
                        tracing::warn!(error = %e, pid, "launcher: net card control connect failed");
                        Self::refuse(LaunchRefusal::ConnectFailed)
                    }
                }
            }
            LaunchRequest::Exited => {
                self.reap_exited();
                let pids = std::mem::take(&mut self.unreported);
                (LaunchReply::Exited { pids }, None)
            }
            LaunchRequest::ConnectVhost { pid } => {
                let Some(card) = self.cards.get(&pid) else {
                    return Self::refuse(LaunchRefusal::NoSuchChild);
                };
                match UnixStream::connect(&card.vhost) {
                    Ok(s) => (LaunchReply::Connected, Some(OwnedFd::from(s))),
                    Err(e) => {
                        tracing::warn!(error = %e, pid, "launcher: vhost connect failed");
                        Self::refuse(LaunchRefusal::ConnectFailed)
                    }
                }
            }
            LaunchRequest::Reap { pid, grace_ms } => {
                let Some(mut child) = self.children.remove(&pid) else {
                    return Self::refuse(LaunchRefusal::NoSuchChild);
                };
                if self.cards.get(&pid).is_some_and(|c| c.net) && grace_ms > 0 {
                    // A net card exits on SIGTERM after wiping its key pages.
                    if let Ok(p) = libc::pid_t::try_from(pid) {
                        // SAFETY: `pid` is our own unreaped child (still in `children` until
                        // just now, not yet waited for), so the pid cannot have been reused.
                        unsafe { libc::kill(p, libc::SIGTERM) };
                    }
                }
                let deadline = Instant::now() + Duration::from_millis(grace_ms.min(60_000));
                let mut killed = false;
                loop {
                    match child.try_wait() {
                        Ok(Some(st)) => {
                            self.note_exit(pid, &st);
                            break;
                        }
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            killed = true;
                            break;
                        }
                    }
                }
                if let Some(card) = self.cards.remove(&pid) {
                    let _ = std::fs::remove_file(&card.vhost);
                    let _ = std::fs::remove_file(&card.control);
                }
                self.channels.remove(&pid);
                self.handovers.remove(&pid);
                self.uncommitted.remove(&pid);
                (LaunchReply::Reaped { killed }, None)
            }
            LaunchRequest::SandboxKills => {
                self.reap_exited();
                let kills = std::mem::take(&mut self.sandbox_kills);
                (LaunchReply::SandboxKills { kills }, None)
            }
            LaunchRequest::Children => {
                self.reap_exited();
                let children = self
                    .children
                    .keys()
                    .map(|pid| ChildInfo {
                        pid: *pid,
                        kind: self.kind(*pid),
                        running: !self.exited.contains(pid),
                        committed: !self.uncommitted.contains(pid),
                    })
                    .collect();
                (LaunchReply::Children { children }, None)
            }
            LaunchRequest::TakeChannel { pid } => match self.channels.get(&pid) {
                Some(fd) => match fd.try_clone() {
                    Ok(dup) => (LaunchReply::Connected, Some(dup)),
                    Err(e) => {
                        tracing::warn!(error = %e, pid, "keeper: dup of a channel failed");
                        Self::refuse(LaunchRefusal::ConnectFailed)
                    }
                },
                None => Self::refuse(LaunchRefusal::NoSuchChild),
            },
            LaunchRequest::ConnectCardControl { pid } => {
                let Some(card) = self.cards.get(&pid).filter(|c| !c.net) else {
                    return Self::refuse(LaunchRefusal::NoSuchChild);
                };
                match UnixStream::connect(&card.control) {
                    Ok(s) => (LaunchReply::Connected, Some(OwnedFd::from(s))),
                    Err(e) => {
                        tracing::warn!(error = %e, pid, "launcher: card control connect failed");
                        Self::refuse(LaunchRefusal::ConnectFailed)
                    }
                }
            }
            LaunchRequest::Commit { pids } => {
                for pid in pids {
                    self.uncommitted.remove(&pid);
                }
                (LaunchReply::Committed, None)
            }
        }
    }

    /// Records a child's exit once; a death by SIGSYS is a sandbox kill.
    fn note_exit(&mut self, pid: u32, st: &std::process::ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        if !self.exited.insert(pid) {
            return;
        }
        self.unreported.push(pid);
        if st.signal() != Some(libc::SIGSYS) {
            return;
        }
        let process = if self.cards.get(&pid).is_some_and(|c| c.net) {
            "netcard"
        } else if self.cards.contains_key(&pid) {
            "card"
        } else {
            "hypervisor"
        };
        tracing::error!(
            pid,
            process,
            "launcher: child killed by its sandbox (SIGSYS)"
        );
        self.sandbox_kills.push(SandboxKill {
            pid,
            process: process.into(),
        });
    }

    fn spawn_card(
        &mut self,
        binary: &Exe,
        backing: Option<PathBuf>,
        network: Option<crate::api::NetworkVolume>,
        read_only: bool,
        queues: u16,
        run_as: Option<(u32, u32)>,
    ) -> (LaunchReply, Option<OwnedFd>) {
        let queues = queues.clamp(1, MAX_CARD_QUEUES);
        // Exactly one store: a file inside the volume directory, or a network volume on a host
        // that has a TLS identity for its cards.
        let store: Vec<std::ffi::OsString> = match (backing, network, &self.cfg.card_tls) {
            (Some(b), None, _) if inside(&b, &self.cfg.volume_dir) => {
                vec!["--backing".into(), b.into_os_string()]
            }
            (None, Some(n), Some(tls))
                if bulkhead_tokens::pki::valid_name(&n.node)
                    && crate::api::ResourceId::parse(&n.export).is_ok() =>
            {
                vec![
                    "--nbd".into(),
                    n.addr.to_string().into(),
                    "--nbd-export".into(),
                    n.export.into(),
                    "--nbd-server-name".into(),
                    n.node.into(),
                    "--tls-ca".into(),
                    tls.ca.clone().into_os_string(),
                    "--tls-cert".into(),
                    tls.cert.clone().into_os_string(),
                    "--tls-key".into(),
                    tls.key.clone().into_os_string(),
                ]
            }
            _ => return Self::refuse(LaunchRefusal::PathNotAllowed),
        };
        self.seq = self.seq.wrapping_add(1);
        let control = self.cfg.run_dir.join(format!("card{}.ctl", self.seq));
        let vhost = self.cfg.run_dir.join(format!("card{}.vhost", self.seq));
        if vhost.as_os_str().len() > MAX_SOCKET_PATH || control.as_os_str().len() > MAX_SOCKET_PATH
        {
            return Self::refuse(LaunchRefusal::PathNotAllowed);
        }
        let mut cmd = Proc::new(&binary.run);
        cmd.arg0(&binary.shown)
            .arg("--control-socket")
            .arg(&control)
            .arg("--vhost-socket")
            .arg(&vhost)
            .args(&store)
            .arg("--queues")
            .arg(queues.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if read_only {
            cmd.arg("--read-only");
        }
        if let Some(k) = &self.cfg.host_key {
            cmd.arg("--host-key").arg(k);
        }
        if let Some((u, g)) = run_as {
            cmd.arg("--uid")
                .arg(u.to_string())
                .arg("--gid")
                .arg(g.to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "launcher: card spawn failed");
                return Self::refuse(LaunchRefusal::SpawnFailed);
            }
        };
        let pid = child.id();
        let deadline = Instant::now() + CARD_READY_TIMEOUT;
        let conn = loop {
            if let Ok(s) = UnixStream::connect(&control) {
                break Some(s);
            }
            if !matches!(child.try_wait(), Ok(None)) || Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(conn) = conn else {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&control);
            let _ = std::fs::remove_file(&vhost);
            tracing::warn!(pid, "launcher: card never opened its control socket");
            return Self::refuse(LaunchRefusal::CardNotReady);
        };
        tracing::info!(pid, "launcher: block card started");
        self.children.insert(pid, child);
        self.uncommitted.insert(pid);
        self.cards.insert(
            pid,
            CardChild {
                vhost,
                control,
                net: false,
            },
        );
        (LaunchReply::Spawned { pid }, Some(OwnedFd::from(conn)))
    }

    /// Starts one interface's net card. Its arguments are re-checked here with the card's own
    /// parsers and passed as `--flag=value`, so no value can read as another option.
    fn spawn_net_card(
        &mut self,
        card: &NetCardLaunch,
        run_as: Option<(u32, u32)>,
        release: Option<u64>,
    ) -> (LaunchReply, Option<OwnedFd>) {
        let bin = match self.binary(BinaryRole::NetCard, release) {
            Ok(b) => b,
            Err(r) => return Self::refuse(r),
        };
        let Some(host_key) = self.cfg.host_key.clone() else {
            return Self::refuse(LaunchRefusal::SpawnFailed);
        };
        if let Err(why) = check_net_card(card) {
            tracing::warn!(why, "launcher: net card request refused");
            return Self::refuse(LaunchRefusal::Malformed);
        }
        let base = self.cfg.run_dir.join(format!("net-{}", card.interface));
        let file = |ext: &str| {
            let mut p = base.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let (vhost, control, sealed, seq) =
            (file(".vhost"), file(".ctl"), file(".sealed"), file(".seq"));
        if !inside(&vhost, &self.cfg.run_dir)
            || vhost.parent() != Some(self.cfg.run_dir.as_path())
            || vhost.as_os_str().len() > MAX_SOCKET_PATH
            || control.as_os_str().len() > MAX_SOCKET_PATH
        {
            return Self::refuse(LaunchRefusal::PathNotAllowed);
        }
        if self.cards.values().any(|c| c.net && c.control == control) {
            // One card per interface at a time.
            return Self::refuse(LaunchRefusal::SpawnFailed);
        }
        let Ok(blob) = hex::decode(&card.sealed_key) else {
            return Self::refuse(LaunchRefusal::Malformed);
        };
        if let Err(e) = write_private(&sealed, &blob) {
            tracing::warn!(error = %e, "launcher: sealed key file");
            return Self::refuse(LaunchRefusal::SpawnFailed);
        }
        let _ = std::fs::remove_file(&vhost);
        let _ = std::fs::remove_file(&control);
        let mut cmd = Proc::new(&bin.run);
        cmd.arg0(&bin.shown);
        let arg = |k: &str, v: &dyn std::fmt::Display| format!("--{k}={v}");
        cmd.arg("vhost")
            .arg(arg("vhost-socket", &vhost.display()))
            .arg(arg("control", &control.display()))
            .arg(arg("listen", &card.listen))
            .arg(arg("vpc", &card.vpc))
            .arg(arg("card-id", &card.card_id))
            .arg(arg("epoch", &card.epoch))
            .arg(arg("host-key", &host_key.display()))
            .arg(arg("sealed-key", &sealed.display()))
            .arg(arg("seq-state", &seq.display()))
            .arg(arg("mac", &card.mac))
            .arg(arg("ip", &card.ip))
            .arg(arg("gateway", &card.gateway))
            .arg(arg("mtu", &card.mtu))
            .args(card.routes.iter().map(|r| arg("route", r)))
            .args(card.allow.iter().map(|r| arg("allow", r)))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some((u, g)) = run_as {
            cmd.arg(arg("uid", &u)).arg(arg("gid", &g));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&sealed);
                tracing::warn!(error = %e, "launcher: net card spawn failed");
                return Self::refuse(LaunchRefusal::SpawnFailed);
            }
        };
        let pid = child.id();
        let deadline = Instant::now() + CARD_READY_TIMEOUT;
        let ready = loop {
            if UnixStream::connect(&control).is_ok() {
                break true;
            }
            if !matches!(child.try_wait(), Ok(None)) || Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The card read the sealed key before opening its control socket (or never will).
        let _ = std::fs::remove_file(&sealed);
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&control);
            let _ = std::fs::remove_file(&vhost);
            tracing::warn!(pid, "launcher: net card never opened its control socket");
            return Self::refuse(LaunchRefusal::CardNotReady);
        }
        tracing::info!(pid, interface = %card.interface, "launcher: net card started");
        self.children.insert(pid, child);
        self.uncommitted.insert(pid);
        self.cards.insert(
            pid,
            CardChild {
                vhost,
                control,
                net: true,
            },
        );
        (LaunchReply::Spawned { pid }, None)
    }

    /// Reaps children that exited on their own, so none stays a zombie. They stay listed (with
    /// their cached exit status) until the controller's `Reap`.
    fn reap_exited(&mut self) {
        let mut done = Vec::new();
        for (pid, c) in self.children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                done.push((*pid, st));
            }
        }
        for (pid, st) in done {
            self.note_exit(pid, &st);
        }
    }

    /// The `role` binary of installed release `release` (verified, [`Self::release_binary`]),
    /// or with no release the configured one (none configured: refused).
    fn binary(&self, role: BinaryRole, release: Option<u64>) -> Result<Exe, LaunchRefusal> {
        if release.is_some() {
            return self.release_binary(role.release_name(), release);
        }
        let configured = match role {
            BinaryRole::Hypervisor => Some(&self.cfg.hypervisor_bin),
            BinaryRole::BlockCard => Some(&self.cfg.blockcard_bin),
            BinaryRole::NetCard => self.cfg.netcard_bin.as_ref(),
        };
        configured
            .map(|b| Exe::configured(b))
            .ok_or(LaunchRefusal::SpawnFailed)
    }

    /// Binary `name` of installed release `release` (`None` or not installed: refused), verified
    /// here against the trust root the launcher read at start — never what the controller says
    /// about it: the signed release 2-of-3, the environment, the directory's version, and the
    /// binary's SHA-384 through an `O_NOFOLLOW` descriptor, which is what gets executed.
    fn release_binary(&self, name: &str, release: Option<u64>) -> Result<Exe, LaunchRefusal> {
        let v = release.ok_or(LaunchRefusal::NoSuchRelease)?;
        let dir = self
            .cfg
            .release_dir
            .as_ref()
            .ok_or(LaunchRefusal::NoSuchRelease)?;
        if !release_path(dir, v).is_dir() {
            return Err(LaunchRefusal::NoSuchRelease);
        }
        let Some(PinnedTrust { root, environment }) = &self.trust else {
            tracing::error!(
                release = v,
                name,
                "launcher: no trust root: release binary refused"
            );
            return Err(LaunchRefusal::ReleaseBinaryUnverified);
        };
        let policy = ArtefactPolicy {
            root,
            environment,
            floor: 0,
        };
        match verify_release_artefact(dir, v, name, &policy) {
            Ok(a) => Ok(Exe {
                run: PathBuf::from(format!("/proc/self/fd/{}", a.file.as_raw_fd())),
                shown: a.path,
                _fd: Some(a.file),
            }),
            Err(e) => {
                tracing::error!(release = v, name, error = %e, code = e.code(), "launcher: release binary does not verify: not started");
                Err(LaunchRefusal::ReleaseBinaryUnverified)
            }
        }
    }

    fn kind(&self, pid: u32) -> ChildKind {
        match self.cards.get(&pid) {
            Some(c) if c.net => ChildKind::NetCard,
            Some(_) => ChildKind::Card,
            None => ChildKind::Hypervisor,
        }
    }

    /// The controller went away. Children it never committed to its record belong to an
    /// operation it never acknowledged: they are killed (a card that was being keyed takes its
    /// key with it). The rest keep running for the next controller. Returns whether nothing is
    /// left to keep (the keeper then exits).
    fn controller_gone(&mut self) -> bool {
        for pid in std::mem::take(&mut self.uncommitted) {
            if let Some(mut c) = self.children.remove(&pid) {
                tracing::info!(
                    pid,
                    "keeper: controller gone; killing a child it never recorded"
                );
                let _ = c.kill();
                if let Ok(st) = c.wait() {
                    self.note_exit(pid, &st);
                }
            }
            if let Some(card) = self.cards.remove(&pid) {
                let _ = std::fs::remove_file(&card.vhost);
                let _ = std::fs::remove_file(&card.control);
            }
            self.channels.remove(&pid);
        }
        self.reap_exited();
        let running = self
            .children
            .keys()
            .filter(|p| !self.exited.contains(p))
            .count();
        tracing::info!(
            running,
            "keeper: controller gone; children keep running until a new controller adopts them"
        );
        running == 0
    }

    fn kill_all(&mut self) {
        for (pid, mut c) in std::mem::take(&mut self.children) {
            tracing::info!(pid, "keeper: exiting; killing child");
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, card) in std::mem::take(&mut self.cards) {
            let _ = std::fs::remove_file(&card.vhost);
            let _ = std::fs::remove_file(&card.control);
        }
    }
}

/// Runs `binary self-test` (stdin/stdout closed, bounded by [`SELF_TEST_TIMEOUT`]); whether it
/// exited 0 in time.
fn run_self_test(binary: &Path) -> bool {
    let child = Proc::new(binary)
        .arg("self-test")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, binary = %binary.display(), "launcher: self-test did not start");
            return false;
        }
    };
    let until = Instant::now() + SELF_TEST_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                tracing::info!(binary = %binary.display(), status = %st, "launcher: release self-test ran");
                return st.success();
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                tracing::warn!(binary = %binary.display(), "launcher: self-test timed out; killed");
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Writes `data` to a new file readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// What a net card request must be before anything is written or started.
fn check_net_card(c: &NetCardLaunch) -> Result<(), &'static str> {
    use bulkhead_netcard::{frame::MacAddr, secgroup::IngressRule};
    if !bulkhead_tokens::ops::valid_resource_id(&c.interface) {
        return Err("interface");
    }
    if c.sealed_key.len() != 2 * bulkhead_sealing::SEALED_BLOB_LEN
        || !c.sealed_key.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err("sealed key");
    }
    if MacAddr::parse_text(&c.mac).is_err() {
        return Err("mac");
    }
    if bulkhead_netcard::secgroup::Cidr::parse_text(&c.ip).is_err() {
        return Err("ip");
    }
    if c.allow.iter().any(|r| IngressRule::parse_text(r).is_err()) {
        return Err("allow");
    }
    crate::api::check_routes(&c.routes, c.card_id).map_err(|_| "route")?;
    Ok(())
}

#[cfg(test)]
mod release_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net_card() -> NetCardLaunch {
        NetCardLaunch {
            interface: "i-1".into(),
            listen: "127.0.0.1:40000".parse().unwrap(),
            vpc: 7,
            card_id: 1,
            epoch: 1,
            sealed_key: "ab".repeat(bulkhead_sealing::SEALED_BLOB_LEN),
            mac: "02:00:00:00:00:10".into(),
            ip: "10.0.1.5/24".into(),
            gateway: "10.0.1.1".parse().unwrap(),
            mtu: 1400,
            routes: vec!["10.0.1.6=2@127.0.0.1:40001".into()],
            allow: vec!["tcp:7000:10.0.0.0/16".into()],
        }
    }

    /// A net card request names no path and no binary; its interface name cannot leave the
    /// run directory; its values cannot smuggle another option onto the card's command line.
    #[test]
    fn net_card_requests_are_confined() {
        assert_eq!(check_net_card(&net_card()), Ok(()));
        for bad in ["../x", "a/b", "", ".."] {
            let c = NetCardLaunch {
                interface: bad.into(),
                ..net_card()
            };
            // `..` is a valid id, but `net-..` stays a file name in the run directory.
            if bad == ".." {
                assert_eq!(check_net_card(&c), Ok(()));
                continue;
            }
            assert_eq!(check_net_card(&c), Err("interface"), "{bad}");
        }
        let c = NetCardLaunch {
            allow: vec!["--uid=0".into()],
            ..net_card()
        };
        assert_eq!(check_net_card(&c), Err("allow"));
        let c = NetCardLaunch {
            routes: vec!["--host-key=/etc/shadow".into()],
            ..net_card()
        };
        assert_eq!(check_net_card(&c), Err("route"));
        let c = NetCardLaunch {
            sealed_key: "zz".repeat(bulkhead_sealing::SEALED_BLOB_LEN),
            ..net_card()
        };
        assert_eq!(check_net_card(&c), Err("sealed key"));
        let c = NetCardLaunch {
            mac: "--vpc=1".into(),
            ..net_card()
        };
        assert_eq!(check_net_card(&c), Err("mac"));
        // Unknown fields (a binary, a socket path) are refused by the request parser.
        let mut v = serde_json::to_value(LaunchRequest::SpawnNetCard {
            card: net_card(),
            run_as: None,
            release: None,
        })
        .unwrap();
        v["spawn_net_card"]["card"]["control"] = serde_json::json!("/tmp/evil.sock");
        assert!(serde_json::from_value::<LaunchRequest>(v).is_err());
    }

    #[test]
    fn launcher_filter_denies_every_family_but_unix_and_inet() {
        for f in [libc::AF_UNIX, libc::AF_INET] {
            assert!(!DENIED_FAMILIES.contains(&u64::try_from(f).unwrap()));
        }
        for f in [
            libc::AF_INET6,
            libc::AF_NETLINK,
            libc::AF_PACKET,
            libc::AF_UNSPEC,
            libc::AF_VSOCK,
        ] {
            assert!(DENIED_FAMILIES.contains(&u64::try_from(f).unwrap()), "{f}");
        }
    }

    #[test]
    fn paths_must_stay_inside() {
        let d = Path::new("/srv/guest");
        assert!(inside(Path::new("/srv/guest/vmlinux"), d));
        assert!(!inside(Path::new("/srv/guest/../etc/passwd"), d));
        assert!(!inside(Path::new("/srv/guestx/vmlinux"), d));
        assert!(!inside(Path::new("guest/vmlinux"), d));
    }

    #[test]
    fn requests_are_strict() {
        let ok = br#"{"reap":{"pid":5,"grace_ms":10}}"#;
        assert_eq!(
            serde_json::from_slice::<LaunchRequest>(ok).unwrap(),
            LaunchRequest::Reap {
                pid: 5,
                grace_ms: 10
            }
        );
        // A request cannot name a binary.
        let bad = br#"{"spawn_card":{"backing":"/v/a.img","read_only":false,"run_as":null,"binary":"/bin/sh"}}"#;
        assert!(serde_json::from_slice::<LaunchRequest>(bad).is_err());
    }

    #[test]
    fn packets_carry_one_fd() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        send_packet(a.as_raw_fd(), b"hello", Some(x.as_raw_fd())).unwrap();
        let (data, fd) = recv_packet(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(data, b"hello");
        assert!(fd.is_some());
        drop(a);
        assert!(recv_packet(b.as_raw_fd()).unwrap().is_none());
    }
}
