//! TAP mode: a TAP device stands in for the guest's virtio-net queues until the vhost-user-net
//! backend exists. Frames the kernel sends out of the TAP are the "guest's"; the card answers
//! ARP/DHCP, drops spoofed frames, applies the security groups and seals the rest to the peer
//! to the peer card the VPC routing table names for the destination, over UDP; what it opens
//! from a peer (pinned to the host address the table names for that card) passes the security
//! groups and is written to the TAP. A control socket installs, switches and retires key epochs
//! (keys HPKE-sealed to the host key, see [`crate::control`]).

use crate::control::{self, Effect};
use crate::encap::{CardId, EpochKey, KeyEpoch, PayloadKind, VpcId, MAX_DATAGRAM};
use crate::keyring::{KeyRing, Receiver, RxDrop, SeqSource, SEQ_BLOCK};
use crate::metrics::Counters;
use crate::responder::{from_guest, to_guest, GuestDrop, GuestVerdict, InterfaceConfig};
use crate::routes::RouteTable;
use crate::sandbox;
use crate::secgroup::{Firewall, IngressRule, Refusal};
use crate::{NetcardError, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Everything TAP mode needs.
#[derive(Debug, Clone)]
pub struct TapConfig {
    pub tap: String,
    pub listen: SocketAddr,
    pub routes: RouteTable,
    pub vpc: VpcId,
    pub local: CardId,
    pub kind: PayloadKind,
    /// The first epoch and where its key comes from.
    pub epoch: KeyEpoch,
    pub key: KeySource,
    /// The host key that opens sealed epoch keys (read before the sandbox, kept locked).
    pub host_key: Option<PathBuf>,
    /// Unix socket for key install/switch/retire and counters.
    pub control: Option<PathBuf>,
    /// The sequence-floor file (see [`crate::keyring`]).
    pub seq_state: Option<PathBuf>,
    pub iface: InterfaceConfig,
    pub rules: Vec<IngressRule>,
    pub max_flows: usize,
    pub flow_idle: Duration,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Where the first epoch key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A `bulkhead-sealing` blob sealed to the host key (ciphertext on disk, never the key).
    Sealed(PathBuf),
    /// DEV ONLY (benchmarks): 32 raw key bytes in a file.
    DevRawFile(PathBuf),
    /// Wait for an `install` on the control socket; frames are dropped (`no_key`) until then.
    Control,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to (or creates) TAP device `name`, without packet-information headers.
pub fn open_tap(name: &str) -> Result<File> {
    let io = |op, source| NetcardError::Io { op, source };
    if name.is_empty() || name.len() >= 16 || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(NetcardError::Config {
            what: "TAP name",
            value: name.to_owned(),
            why: "1 to 15 bytes, no NUL or /",
        });
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io("open /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name
        .get_mut(..name.len())
        .ok_or(NetcardError::Config {
            what: "TAP name",
            value: name.to_owned(),
            why: "too long",
        })?
        .copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, layout as `IfReq`) at
    // the pointer, which is valid for the call; the fd is an open /dev/net/tun.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(io("TUNSETIFF", std::io::Error::last_os_error()));
    }
    Ok(f)
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid argument for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is initialised; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

struct Shared {
    iface: InterfaceConfig,
    counters: Counters,
    firewall: Mutex<Firewall>,
    stop: AtomicBool,
    tap: File,
    sock: UdpSocket,
    routes: RouteTable,
    ring: RwLock<KeyRing>,
    host_key: Option<bulkhead_sealing::HostKey>,
    vpc: VpcId,
}

fn firewall_refused(c: &Counters, r: Refusal, inbound: bool) {
    let ctr = match (r, inbound) {
        (Refusal::TableFull, _) => &c.conntrack_full,
        (Refusal::NoRule, true) => &c.dropped_secgroup_in,
        (Refusal::NoRule, false) => &c.dropped_secgroup_out,
    };
    ctr.fetch_add(1, Ordering::Relaxed);
}

/// Guest → peer.
fn guest_to_peer(sh: &Shared, mut seq: SeqSource) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    let c = &sh.counters;
    while !sh.stop.load(Ordering::Relaxed) {
        if !readable(sh.tap.as_raw_fd(), 200) {
            continue;
        }
        let n = match (&sh.tap).read(&mut buf) {
            Ok(n) => n,
            Err(_) => {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let frame = buf.get(..n).unwrap_or_default();
        match from_guest(&sh.iface, frame) {
            GuestVerdict::Reply(r) => {
                let arp = r.get(12..14) == Some(&[0x08, 0x06][..]);
                let ctr = if arp { &c.arp_replies } else { &c.dhcp_replies };
                ctr.fetch_add(1, Ordering::Relaxed);
                if (&sh.tap).write_all(&r).is_err() {
                    c.io_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            GuestVerdict::Forward(ip, t) => {
                let verdict = match sh.firewall.lock() {
                    Ok(mut fw) => fw.outbound(&ip, &t, Instant::now()),
                    Err(_) => Err(Refusal::TableFull),
                };
                let Some(route) = sh.routes.lookup(ip.dst) else {
                    c.unknown_destination.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if let Err(r) = verdict {
                    firewall_refused(c, r, false);
                    continue;
                }
                let sealed = match sh.ring.read() {
                    Ok(ring) => ring.seal_to(&mut seq, route.card, frame, &mut out),
                    Err(_) => Err(NetcardError::NoKey),
                };
                match sealed {
                    Ok(()) => {}
                    Err(NetcardError::NoKey) => {
                        c.no_key.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "sealing failed");
                        c.io_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                if sh.sock.send_to(&out, route.host).is_err() {
                    c.io_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                c.tx_packets.fetch_add(1, Ordering::Relaxed);
                Counters::add(&c.tx_bytes, n);
            }
            GuestVerdict::Consumed => {}
            GuestVerdict::Drop(d) => c.guest_drop(d),
        }
    }
}

/// Peer → guest.
fn peer_to_guest(sh: &Shared) {
    let mut rx = Receiver::new();
    let mut buf = vec![0u8; 65536];
    let mut frame = Vec::with_capacity(MAX_DATAGRAM);
    let c = &sh.counters;
    while !sh.stop.load(Ordering::Relaxed) {
        if !readable(sh.sock.as_raw_fd(), 200) {
            continue;
        }
        let (n, from) = match sh.sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let raw = buf.get(..n).unwrap_or_default();
        let opened = match sh.ring.read() {
            Ok(ring) => rx.open(&ring, &sh.routes, from, raw, &mut frame),
            Err(_) => Err(RxDrop::Encap(crate::encap::DropReason::UnknownEpoch)),
        };
        let sender = match opened {
            Ok(s) => s,
            Err(RxDrop::Encap(d)) => {
                c.tunnel_drop(d);
                continue;
            }
            Err(RxDrop::ForgedSource) => {
                c.forged_source.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let verdict = match to_guest(&sh.iface, &mut frame) {
            Ok((ip, _)) if !sh.routes.owns(sender, ip.src) => {
                c.peer_spoofed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok((ip, t)) => match sh.firewall.lock() {
                Ok(mut fw) => fw.inbound(&ip, &t, Instant::now()),
                Err(_) => Err(Refusal::TableFull),
            },
            Err(GuestDrop::NoRoute) => {
                c.misdelivered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(d) => {
                c.guest_drop(d);
                continue;
            }
        };
        if let Err(r) = verdict {
            firewall_refused(c, r, true);
            continue;
        }
        if (&sh.tap).write_all(&frame).is_err() {
            c.io_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        c.rx_packets.fetch_add(1, Ordering::Relaxed);
        Counters::add(&c.rx_bytes, frame.len());
    }
}

fn counters_line(c: &Counters, keys_wiped: Option<u64>) -> String {
    let mut line = c.to_json();
    if let Some(w) = keys_wiped {
        // Splice one more field into the object.
        line.pop();
        line.push_str(&format!(",\"key_pages_wiped\":{w}}}"));
    }
    line
}

fn print_counters(c: &Counters, keys_wiped: Option<u64>) {
    let line = counters_line(c, keys_wiped);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Longest control request accepted.
const MAX_REQUEST: usize = 4096;

/// Reads one request line (bounded in size and time) and answers it.
fn serve_control(sh: &Shared, mut conn: UnixStream) {
    let mut req = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut chunk = [0u8; 512];
    while !req.contains(&b'\n') && req.len() <= MAX_REQUEST && Instant::now() < deadline {
        if !readable(conn.as_raw_fd(), 100) {
            continue;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let c = &sh.counters;
    let reply = match serde_json::from_slice::<serde_json::Value>(
        req.split(|b| *b == b'\n').next().unwrap_or_default(),
    ) {
        Err(_) => serde_json::json!({"ok": false, "error": "want one JSON object per line"}),
        Ok(v) if v.get("op").and_then(serde_json::Value::as_str) == Some("counters") => {
            let line = counters_line(c, Some(crate::encap::key_pages_wiped()));
            serde_json::from_str(&line).unwrap_or_default()
        }
        Ok(v) => {
            let res = match sh.ring.write() {
                Ok(mut ring) => {
                    let r = control::apply(&v, &mut ring, sh.host_key.as_ref(), sh.vpc, &sh.routes);
                    (r, ring.live_epochs(), ring.send_epoch().map(|e| e.0))
                }
                Err(_) => (
                    Err(NetcardError::Control("key ring poisoned".into())),
                    Vec::new(),
                    None,
                ),
            };
            match res {
                (Ok(effect), live, send) => {
                    match effect {
                        Effect::Installed => &c.key_installs,
                        Effect::Retired => &c.key_retires,
                        Effect::Other => &c.key_switches,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    info!(op = ?v.get("op"), epoch = ?v.get("epoch"), ?live, ?send, "key request");
                    serde_json::json!({"ok": true, "live": live, "send": send,
                        "key_pages_wiped": crate::encap::key_pages_wiped()})
                }
                (Err(e), live, send) => {
                    warn!(error = %e, "key request refused");
                    serde_json::json!({"ok": false, "error": e.to_string(), "live": live, "send": send})
                }
            }
        }
    };
    let _ = conn.write_all(format!("{reply}\n").as_bytes());
}

fn control_loop(sh: &Shared, listener: UnixListener) {
    while !sh.stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), 200) {
            continue;
        }
        if let Ok((conn, _)) = listener.accept() {
            serve_control(sh, conn);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| NetcardError::Io {
            op: "spawn",
            source,
        })
}

/// Runs TAP mode until SIGTERM/SIGINT/SIGHUP. Prints the counters as one JSON line on stdout
/// on SIGUSR1 and at exit.
pub fn run(cfg: TapConfig) -> Result<()> {
    cfg.iface.check()?;
    if cfg.routes.is_empty() {
        return Err(NetcardError::Config {
            what: "--route",
            value: String::new(),
            why: "a card needs at least one peer",
        });
    }
    // Signals go to the main thread's sigtimedwait only: block them before any thread exists.
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(NetcardError::Io {
            op: "pthread_sigmask",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    let host_key = match &cfg.host_key {
        Some(p) => Some(bulkhead_sealing::HostKey::read_file(p)?),
        None => None,
    };
    let mut ring = KeyRing::new(cfg.vpc, cfg.local, cfg.kind);
    {
        let first = match &cfg.key {
            KeySource::Sealed(path) => {
                let host = host_key.as_ref().ok_or(NetcardError::Config {
                    what: "--sealed-key",
                    value: path.display().to_string(),
                    why: "needs --host-key",
                })?;
                let blob = std::fs::read(path).map_err(|source| NetcardError::KeyFile {
                    path: path.display().to_string(),
                    source,
                })?;
                Some(control::open_epoch_key(host, cfg.vpc, cfg.epoch, &blob)?)
            }
            KeySource::DevRawFile(path) => {
                warn!("--key-file: raw key on disk, for development and benchmarks only");
                Some(EpochKey::from_file(path)?)
            }
            KeySource::Control => None,
        };
        if let Some(k) = first {
            ring.install(cfg.epoch, &k, cfg.routes.peers())?;
        }
        // The epoch key's page is wiped here; only the direction keys stay.
    }
    let seq_file = match &cfg.seq_state {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|source| NetcardError::Io {
                    op: "open --seq-state",
                    source,
                })?,
        ),
        None => {
            warn!("no --seq-state: only the clock orders sequence numbers across restarts");
            None
        }
    };
    let seq = SeqSource::open(seq_file, SEQ_BLOCK)?;
    let tap = open_tap(&cfg.tap)?;
    let sock = UdpSocket::bind(cfg.listen).map_err(|source| NetcardError::Io {
        op: "bind UDP",
        source,
    })?;
    let listener = match &cfg.control {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|source| NetcardError::Io {
                op: "bind control socket",
                source,
            })?;
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|source| NetcardError::Io {
                    op: "chmod control socket",
                    source,
                })?;
            Some(l)
        }
        None => None,
    };
    sandbox::drop_privileges(cfg.uid, cfg.gid)?;
    sandbox::install_seccomp()?;
    info!(
        tap = %cfg.tap, listen = %cfg.listen, vpc = cfg.vpc.0, epoch = ?ring.send_epoch(),
        local = cfg.local.0, mode = ?cfg.kind, ip = %cfg.iface.ip, mac = %cfg.iface.mac,
        control = ?cfg.control, "net card running (TAP mode, sandboxed)"
    );
    let shared = Arc::new(Shared {
        iface: cfg.iface,
        counters: Counters::default(),
        firewall: Mutex::new(Firewall::new(cfg.rules, cfg.max_flows, cfg.flow_idle)),
        stop: AtomicBool::new(false),
        tap,
        sock,
        routes: cfg.routes,
        ring: RwLock::new(ring),
        host_key,
        vpc: cfg.vpc,
    });
    let mut workers = Vec::new();
    {
        let sh = Arc::clone(&shared);
        workers.push(spawn("guest-to-peer", move || guest_to_peer(&sh, seq))?);
    }
    {
        let sh = Arc::clone(&shared);
        workers.push(spawn("peer-to-guest", move || peer_to_guest(&sh))?);
    }
    if let Some(l) = listener {
        let sh = Arc::clone(&shared);
        workers.push(spawn("control", move || control_loop(&sh, l))?);
    }
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            print_counters(&shared.counters, None);
            continue;
        }
        info!(signal = sig, "stopping");
        break;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        if w.join().is_err() {
            warn!("a card thread panicked");
        }
    }
    // Every worker is gone: wipe every live epoch's key pages now.
    if let Ok(mut ring) = shared.ring.write() {
        *ring = KeyRing::new(shared.vpc, CardId(0), PayloadKind::Sealed);
    }
    // Pages wiped over the card's life (retired epochs and the ones wiped just now).
    print_counters(&shared.counters, Some(crate::encap::key_pages_wiped()));
    Ok(())
}
