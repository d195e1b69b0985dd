//! The card's transport-neutral data path, shared by TAP mode ([`crate::tap`]) and the
//! vhost-user-net backend ([`crate::vhost`]): one implementation of what happens to a frame,
//! whatever carries it to and from the guest.
//!
//! * Guest → peer ([`DataPath::from_guest`]): responder (ARP/DHCP answers back to the guest) and
//!   anti-spoofing, the security groups (egress tracked), the VPC routing table, sealing under
//!   the send epoch, one UDP datagram to the peer card's host address.
//! * Peer → guest ([`DataPath::from_peer`]): the pinned source and the encapsulation checks,
//!   opening, the inner source owned by the sender card, readdressing for the guest, the
//!   security groups (ingress rules or a tracked flow).
//! * The control socket ([`DataPath::control_loop`]): key `install`/`send`/`retire`,
//!   `counters`, `routes` (replace the table) and `rules` (replace the ingress rules).
//!
//! Start-up ([`open_card`]) is shared too: the host key, the first epoch, the sequence floor, the
//! UDP socket and the control socket are all set up before the mode opens its guest side and
//! the sandbox goes on.

use crate::control::{self, Effect};
use crate::encap::{CardId, EpochKey, KeyEpoch, PayloadKind, VpcId, MAX_DATAGRAM};
use crate::keyring::{KeyRing, Receiver, RxDrop, SeqSource, SEQ_BLOCK};
use crate::metrics::Counters;
use crate::responder::{from_guest, to_guest, GuestDrop, GuestVerdict, InterfaceConfig};
use crate::routes::RouteTable;
use crate::secgroup::{Firewall, IngressRule, Refusal};
use crate::{NetcardError, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Everything a card needs, whatever its guest side (TAP device or vhost-user socket).
#[derive(Debug, Clone)]
pub struct CardConfig {
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
    /// Unix socket for key install/switch/retire, routes, rules and counters.
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

/// The card's state shared by its threads: the data path proper.
pub struct DataPath {
    pub iface: InterfaceConfig,
    pub counters: Counters,
    /// The UDP socket to and from the peer cards.
    pub sock: UdpSocket,
    /// Set when the card stops; the loops poll it.
    pub stop: AtomicBool,
    firewall: Mutex<Firewall>,
    /// Lock order: `routes` before `ring`.
    routes: RwLock<RouteTable>,
    ring: RwLock<KeyRing>,
    host_key: Option<bulkhead_sealing::HostKey>,
    vpc: VpcId,
    local: CardId,
    kind: PayloadKind,
}

fn firewall_refused(c: &Counters, r: Refusal, inbound: bool) {
    let ctr = match (r, inbound) {
        (Refusal::TableFull, _) => &c.conntrack_full,
        (Refusal::NoRule, true) => &c.dropped_secgroup_in,
        (Refusal::NoRule, false) => &c.dropped_secgroup_out,
    };
    ctr.fetch_add(1, Ordering::Relaxed);
}

fn inc(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Longest control request accepted (a full routing table fits).
const MAX_REQUEST: usize = 256 * 1024;
/// Largest UDP datagram read.
pub const RECV_BUF: usize = 65536;

impl DataPath {
    /// One frame the guest sent. Returns a frame to hand back to the guest (an ARP or DHCP
    /// answer), if any; a forwarded frame is sealed into `out` and sent to the peer here.
    pub fn from_guest(
        &self,
        seq: &mut SeqSource,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Vec<u8>> {
        let c = &self.counters;
        match from_guest(&self.iface, frame) {
            GuestVerdict::Reply(r) => {
                let arp = r.get(12..14) == Some(&[0x08, 0x06][..]);
                inc(if arp { &c.arp_replies } else { &c.dhcp_replies });
                Some(r)
            }
            GuestVerdict::Forward(ip, t) => {
                let routes = match self.routes.read() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                let verdict = match self.firewall.lock() {
                    Ok(mut fw) => fw.outbound(&ip, &t, Instant::now()),
                    Err(_) => Err(Refusal::TableFull),
                };
                let Some(route) = routes.lookup(ip.dst) else {
                    inc(&c.unknown_destination);
                    return None;
                };
                if let Err(r) = verdict {
                    firewall_refused(c, r, false);
                    return None;
                }
                let sealed = match self.ring.read() {
                    Ok(ring) => ring.seal_to(seq, route.card, frame, out),
                    Err(_) => Err(NetcardError::NoKey),
                };
                drop(routes);
                match sealed {
                    Ok(()) => {}
                    Err(NetcardError::NoKey) => {
                        inc(&c.no_key);
                        return None;
                    }
                    Err(e) => {
                        warn!(error = %e, "sealing failed");
                        inc(&c.io_errors);
                        return None;
                    }
                }
                if self.sock.send_to(out, route.host).is_err() {
                    inc(&c.io_errors);
                    return None;
                }
                inc(&c.tx_packets);
                Counters::add(&c.tx_bytes, frame.len());
                None
            }
            GuestVerdict::Consumed => None,
            GuestVerdict::Drop(d) => {
                c.guest_drop(d);
                None
            }
        }
    }

    /// One datagram from `from`. Returns true when `frame` holds a frame for the guest (the
    /// caller delivers it and then calls [`DataPath::delivered`]).
    pub fn from_peer(
        &self,
        rx: &mut Receiver,
        from: SocketAddr,
        raw: &[u8],
        frame: &mut Vec<u8>,
    ) -> bool {
        let c = &self.counters;
        let routes = match self.routes.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let opened = match self.ring.read() {
            Ok(ring) => rx.open(&ring, &routes, from, raw, frame),
            Err(_) => Err(RxDrop::Encap(crate::encap::DropReason::UnknownEpoch)),
        };
        let sender = match opened {
            Ok(s) => s,
            Err(RxDrop::Encap(d)) => {
                c.tunnel_drop(d);
                return false;
            }
            Err(RxDrop::ForgedSource) => {
                inc(&c.forged_source);
                return false;
            }
        };
        let verdict = match to_guest(&self.iface, frame) {
            Ok((ip, _)) if !routes.owns(sender, ip.src) => {
                inc(&c.peer_spoofed);
                return false;
            }
            Ok((ip, t)) => match self.firewall.lock() {
                Ok(mut fw) => fw.inbound(&ip, &t, Instant::now()),
                Err(_) => Err(Refusal::TableFull),
            },
            Err(GuestDrop::NoRoute) => {
                inc(&c.misdelivered);
                return false;
            }
            Err(d) => {
                c.guest_drop(d);
                return false;
            }
        };
        if let Err(r) = verdict {
            firewall_refused(c, r, true);
            return false;
        }
        true
    }

    /// Counts a frame handed to the guest.
    pub fn delivered(&self, len: usize) {
        inc(&self.counters.rx_packets);
        Counters::add(&self.counters.rx_bytes, len);
    }

    /// Reads one datagram (non-blocking callers get `None` on EAGAIN) and runs it through
    /// [`DataPath::from_peer`]; `Some(true)` when `frame` holds a frame for the guest.
    pub fn recv_one(&self, rx: &mut Receiver, buf: &mut [u8], frame: &mut Vec<u8>) -> Option<bool> {
        match self.sock.recv_from(buf) {
            Ok((n, from)) => {
                let raw = buf.get(..n).unwrap_or_default();
                Some(self.from_peer(rx, from, raw, frame))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Some(false),
            Err(_) => {
                inc(&self.counters.io_errors);
                None
            }
        }
    }

    /// The counters as one JSON object, with `key_pages_wiped` spliced in when given.
    pub fn counters_line(&self, keys_wiped: Option<u64>) -> String {
        let mut line = self.counters.to_json();
        if let Some(w) = keys_wiped {
            line.pop();
            line.push_str(&format!(",\"key_pages_wiped\":{w}}}"));
        }
        line
    }

    /// Prints the counters on stdout (SIGUSR1 and exit).
    pub fn print_counters(&self, keys_wiped: Option<u64>) {
        let line = self.counters_line(keys_wiped);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Drops every live epoch (their key pages are zeroized and read back).
    pub fn wipe_keys(&self) {
        let mut ring = match self.ring.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        *ring = KeyRing::new(self.vpc, CardId(0), PayloadKind::Sealed);
    }

    /// `routes`: replaces the routing table; direction keys are derived for new peers in every
    /// live epoch and dropped (wiped) for removed ones. All or nothing.
    fn replace_routes(&self, req: &serde_json::Value) -> Result<usize> {
        let list = req
            .get("routes")
            .and_then(serde_json::Value::as_array)
            .ok_or(NetcardError::Control(
                "want \"routes\": [\"IP=CARD@HOST:PORT\", ...]".into(),
            ))?;
        let mut table = RouteTable::new();
        for r in list {
            let text = r
                .as_str()
                .ok_or(NetcardError::Control("a route is not a string".into()))?;
            table.add_text(self.local, text)?;
        }
        let mut routes = match self.routes.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if let Some(d) = routes.default_route() {
            table.set_default(self.local, d)?;
        }
        let peers: Vec<CardId> = table.peers().collect();
        let mut ring = match self.ring.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        ring.set_peers(&peers)?;
        *routes = table;
        Ok(list.len())
    }

    /// `rules`: replaces the ingress rules (tracked flows stay).
    fn replace_rules(&self, req: &serde_json::Value) -> Result<usize> {
        let list = req
            .get("allow")
            .and_then(serde_json::Value::as_array)
            .ok_or(NetcardError::Control(
                "want \"allow\": [\"tcp:PORT:CIDR\", ...]".into(),
            ))?;
        let rules = list
            .iter()
            .map(|r| {
                r.as_str()
                    .ok_or(NetcardError::Control("a rule is not a string".into()))
                    .and_then(IngressRule::parse_text)
            })
            .collect::<Result<Vec<_>>>()?;
        let n = rules.len();
        match self.firewall.lock() {
            Ok(mut fw) => fw.set_rules(rules),
            Err(p) => p.into_inner().set_rules(rules),
        }
        Ok(n)
    }

    fn key_request(&self, v: &serde_json::Value) -> serde_json::Value {
        let c = &self.counters;
        let routes = match self.routes.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut ring = match self.ring.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let r = control::apply(v, &mut ring, self.host_key.as_ref(), self.vpc, &routes);
        let (live, send) = (ring.live_epochs(), ring.send_epoch().map(|e| e.0));
        match r {
            Ok(effect) => {
                inc(match effect {
                    Effect::Installed => &c.key_installs,
                    Effect::Retired => &c.key_retires,
                    Effect::Other => &c.key_switches,
                });
                info!(op = ?v.get("op"), epoch = ?v.get("epoch"), ?live, ?send, "key request");
                serde_json::json!({"ok": true, "live": live, "send": send,
                    "key_pages_wiped": crate::encap::key_pages_wiped()})
            }
            Err(e) => {
                warn!(error = %e, "key request refused");
                serde_json::json!({"ok": false, "error": e.to_string(), "live": live, "send": send})
            }
        }
    }

    /// Answers one control request line.
    pub fn control_request(&self, line: &[u8]) -> serde_json::Value {
        let c = &self.counters;
        let v = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) => v,
            Err(_) => {
                return serde_json::json!({"ok": false, "error": "want one JSON object per line"})
            }
        };
        let answer = |what: &str, r: Result<usize>, ctr: &std::sync::atomic::AtomicU64| match r {
            Ok(n) => {
                inc(ctr);
                info!(entries = n, "{what} replaced");
                serde_json::json!({"ok": true, "op": what, "entries": n})
            }
            Err(e) => {
                warn!(error = %e, "{what} update refused");
                serde_json::json!({"ok": false, "error": e.to_string()})
            }
        };
        match v.get("op").and_then(serde_json::Value::as_str) {
            Some("counters") => {
                let line = self.counters_line(Some(crate::encap::key_pages_wiped()));
                serde_json::from_str(&line).unwrap_or_default()
            }
            Some("routes") => answer("routes", self.replace_routes(&v), &c.route_updates),
            Some("rules") => answer("rules", self.replace_rules(&v), &c.rule_updates),
            _ => self.key_request(&v),
        }
    }

    /// Reads one request line (bounded in size and time) and answers it.
    fn serve_control(&self, mut conn: UnixStream) {
        let mut req = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut chunk = [0u8; 4096];
        while !req.contains(&b'\n') && req.len() <= MAX_REQUEST && Instant::now() < deadline {
            if !readable(conn.as_raw_fd(), 100) {
                continue;
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
        }
        let reply = if req.len() > MAX_REQUEST {
            serde_json::json!({"ok": false, "error": "request too long"})
        } else {
            self.control_request(req.split(|b| *b == b'\n').next().unwrap_or_default())
        };
        let _ = conn.write_all(format!("{reply}\n").as_bytes());
    }

    /// Serves the control socket until the card stops (one request per connection).
    pub fn control_loop(&self, listener: UnixListener) {
        while !self.stop.load(Ordering::Relaxed) {
            if !readable(listener.as_raw_fd(), 200) {
                continue;
            }
            if let Ok((conn, _)) = listener.accept() {
                self.serve_control(conn);
            }
        }
    }

    pub fn vpc(&self) -> VpcId {
        self.vpc
    }

    pub fn local(&self) -> CardId {
        self.local
    }

    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    /// The send epoch (for the start-up log).
    pub fn send_epoch(&self) -> Option<KeyEpoch> {
        self.ring.read().ok().and_then(|r| r.send_epoch())
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// What [`open_card`] sets up before the sandbox.
pub struct OpenCard {
    pub dp: DataPath,
    pub seq: SeqSource,
    pub control: Option<UnixListener>,
    /// SIGUSR1/SIGTERM/SIGINT/SIGHUP, blocked in every thread; [`wait_for_stop`] takes them.
    pub signals: libc::sigset_t,
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

/// The privileged start-up both modes share: signals blocked (before any thread exists), the
/// host key, the first epoch, the sequence floor, the UDP socket and the control socket.
pub fn open_card(cfg: CardConfig) -> Result<OpenCard> {
    cfg.iface.check()?;
    // An empty routing table is allowed: the first interface of a VPC has no peer yet, and the
    // control plane pushes routes over the control socket as peers appear (`routes`).
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
    let sock = UdpSocket::bind(cfg.listen).map_err(|source| NetcardError::Io {
        op: "bind UDP",
        source,
    })?;
    let control = match &cfg.control {
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
    let dp = DataPath {
        iface: cfg.iface,
        counters: Counters::default(),
        sock,
        stop: AtomicBool::new(false),
        firewall: Mutex::new(Firewall::new(cfg.rules, cfg.max_flows, cfg.flow_idle)),
        routes: RwLock::new(cfg.routes),
        ring: RwLock::new(ring),
        host_key,
        vpc: cfg.vpc,
        local: cfg.local,
        kind: cfg.kind,
    };
    Ok(OpenCard {
        dp,
        seq,
        control,
        signals: set,
    })
}

/// Waits for SIGTERM/SIGINT/SIGHUP (printing the counters on each SIGUSR1), then sets `stop`.
pub fn wait_for_stop(dp: &DataPath, set: &libc::sigset_t) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            dp.print_counters(None);
            continue;
        }
        info!(signal = sig, "stopping");
        break;
    }
    dp.stop.store(true, Ordering::Relaxed);
}

/// Spawns a named thread.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| NetcardError::Io {
            op: "spawn",
            source,
        })
}

/// A buffer the size of the largest datagram.
pub fn datagram_buf() -> Vec<u8> {
    Vec::with_capacity(MAX_DATAGRAM)
}
