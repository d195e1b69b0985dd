//! TAP mode: a TAP device stands in for the guest's virtio-net queues until the vhost-user-net
//! backend exists. Frames the kernel sends out of the TAP are the "guest's"; the card answers
//! ARP/DHCP, drops spoofed frames, applies the security groups and seals the rest to the peer
//! over UDP; what it opens from the peer passes the security groups and is written to the TAP.

use crate::encap::{EpochKey, Opener, Sealer, TunnelKeys, TunnelParams, MAX_DATAGRAM};
use crate::metrics::Counters;
use crate::responder::{from_guest, to_guest, GuestDrop, GuestVerdict, InterfaceConfig};
use crate::sandbox;
use crate::secgroup::{Firewall, IngressRule, Refusal};
use crate::{NetcardError, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Everything TAP mode needs.
#[derive(Debug, Clone)]
pub struct TapConfig {
    pub tap: String,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key_file: PathBuf,
    pub params: TunnelParams,
    pub iface: InterfaceConfig,
    pub rules: Vec<IngressRule>,
    pub max_flows: usize,
    pub flow_idle: Duration,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
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
    peer: SocketAddr,
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
fn guest_to_peer(sh: &Shared, mut sealer: Sealer) {
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
                if let Err(r) = verdict {
                    firewall_refused(c, r, false);
                    continue;
                }
                if sealer.seal_frame(frame, &mut out).is_err()
                    || sh.sock.send_to(&out, sh.peer).is_err()
                {
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
fn peer_to_guest(sh: &Shared, mut opener: Opener) {
    let mut buf = vec![0u8; 65536];
    let mut frame = Vec::with_capacity(MAX_DATAGRAM);
    let c = &sh.counters;
    while !sh.stop.load(Ordering::Relaxed) {
        if !readable(sh.sock.as_raw_fd(), 200) {
            continue;
        }
        let n = match sh.sock.recv_from(&mut buf) {
            Ok((n, _from)) => n,
            Err(_) => {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if let Err(d) = opener.open_datagram(buf.get(..n).unwrap_or_default(), &mut frame) {
            c.tunnel_drop(d);
            continue;
        }
        let verdict = match to_guest(&sh.iface, &mut frame) {
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

fn print_counters(c: &Counters, keys_wiped: Option<u64>) {
    let mut line = c.to_json();
    if let Some(w) = keys_wiped {
        // Splice one more field into the object.
        line.pop();
        line.push_str(&format!(",\"key_pages_wiped\":{w}}}"));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs TAP mode until SIGTERM/SIGINT/SIGHUP. Prints the counters as one JSON line on stdout
/// on SIGUSR1 and at exit.
pub fn run(cfg: TapConfig) -> Result<()> {
    cfg.iface.check()?;
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
    let keys = {
        let epoch_key = EpochKey::from_file(&cfg.key_file)?;
        Arc::new(TunnelKeys::new(&epoch_key, &cfg.params)?)
        // The epoch key's page is wiped here; only the two direction keys stay.
    };
    let tap = open_tap(&cfg.tap)?;
    let sock = UdpSocket::bind(cfg.listen).map_err(|source| NetcardError::Io {
        op: "bind UDP",
        source,
    })?;
    sandbox::drop_privileges(cfg.uid, cfg.gid)?;
    sandbox::install_seccomp()?;
    info!(
        tap = %cfg.tap, listen = %cfg.listen, peer = %cfg.peer, vpc = cfg.params.vpc.0,
        epoch = cfg.params.epoch.0, local = cfg.params.local.0, peer_card = cfg.params.peer.0,
        mode = ?cfg.params.kind, ip = %cfg.iface.ip, mac = %cfg.iface.mac,
        "net card running (TAP mode, sandboxed)"
    );
    let shared = Arc::new(Shared {
        iface: cfg.iface,
        counters: Counters::default(),
        firewall: Mutex::new(Firewall::new(cfg.rules, cfg.max_flows, cfg.flow_idle)),
        stop: AtomicBool::new(false),
        tap,
        sock,
        peer: cfg.peer,
    });
    let sealer = Sealer::new(Arc::clone(&keys), cfg.params);
    let opener = Opener::new(Arc::clone(&keys), cfg.params);
    let tx = {
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("guest-to-peer".into())
            .spawn(move || guest_to_peer(&sh, sealer))
            .map_err(|source| NetcardError::Io {
                op: "spawn",
                source,
            })?
    };
    let rx = {
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("peer-to-guest".into())
            .spawn(move || peer_to_guest(&sh, opener))
            .map_err(|source| NetcardError::Io {
                op: "spawn",
                source,
            })?
    };
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
    if tx.join().is_err() || rx.join().is_err() {
        warn!("a data-path thread panicked");
    }
    // Both workers are gone: this is the last reference, so the key page is wiped now.
    drop(keys);
    print_counters(&shared.counters, Some(crate::encap::key_pages_wiped()));
    Ok(())
}
