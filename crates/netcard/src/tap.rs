//! TAP mode: a TAP device stands in for the guest's virtio-net queues (the benchmarks and the
//! netns tests use it; instances get the vhost-user-net backend, [`crate::vhost`]). Frames the
//! kernel sends out of the TAP are the "guest's"; what happens to them, and to the peers'
//! datagrams, is the shared data path ([`crate::datapath`]). Three threads: guest → peer,
//! peer → guest, control.

use crate::datapath::{self, datagram_buf, readable, CardConfig, DataPath, RECV_BUF};
use crate::keyring::{Receiver, SeqSource};
use crate::sandbox;
use crate::{NetcardError, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{info, warn};

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

/// Guest → peer.
fn guest_to_peer(dp: &DataPath, tap: &File, mut seq: SeqSource) {
    let mut buf = vec![0u8; 65536];
    let mut out = datagram_buf();
    while !dp.stop.load(Ordering::Relaxed) {
        if !readable(tap.as_raw_fd(), 200) {
            continue;
        }
        let n = match (&*tap).read(&mut buf) {
            Ok(n) => n,
            Err(_) => {
                dp.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let frame = buf.get(..n).unwrap_or_default();
        if let Some(reply) = dp.from_guest(&mut seq, frame, &mut out) {
            if (&*tap).write_all(&reply).is_err() {
                dp.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Peer → guest.
fn peer_to_guest(dp: &DataPath, tap: &File) {
    let mut rx = Receiver::new();
    let mut buf = vec![0u8; RECV_BUF];
    let mut frame = datagram_buf();
    while !dp.stop.load(Ordering::Relaxed) {
        if !readable(dp.sock.as_raw_fd(), 200) {
            continue;
        }
        if dp.recv_one(&mut rx, &mut buf, &mut frame) != Some(true) {
            continue;
        }
        if (&*tap).write_all(&frame).is_err() {
            dp.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        dp.delivered(frame.len());
    }
}

/// Runs TAP mode until SIGTERM/SIGINT/SIGHUP. Prints the counters as one JSON line on stdout
/// on SIGUSR1 and at exit.
pub fn run(cfg: CardConfig, tap_name: &str) -> Result<()> {
    let (uid, gid, control_path, listen) = (cfg.uid, cfg.gid, cfg.control.clone(), cfg.listen);
    let card = datapath::open_card(cfg)?;
    let tap = Arc::new(open_tap(tap_name)?);
    bulkhead_harden::drop_privileges_if_given(uid, gid)?;
    sandbox::install_seccomp()?;
    let dp = Arc::new(card.dp);
    info!(
        tap = %tap_name, listen = %listen, vpc = dp.vpc().0,
        epoch = ?dp.send_epoch(), local = dp.local().0, mode = ?dp.kind(), ip = %dp.iface.ip,
        mac = %dp.iface.mac, control = ?control_path, "net card running (TAP mode, sandboxed)"
    );
    let mut workers = Vec::new();
    {
        let (dp, tap, seq) = (Arc::clone(&dp), Arc::clone(&tap), card.seq);
        workers.push(datapath::spawn("guest-to-peer", move || {
            guest_to_peer(&dp, &tap, seq)
        })?);
    }
    {
        let (dp, tap) = (Arc::clone(&dp), Arc::clone(&tap));
        workers.push(datapath::spawn("peer-to-guest", move || {
            peer_to_guest(&dp, &tap)
        })?);
    }
    if let Some(l) = card.control {
        let dp = Arc::clone(&dp);
        workers.push(datapath::spawn("control", move || dp.control_loop(l))?);
    }
    datapath::wait_for_stop(&dp, &card.signals);
    for w in workers {
        if w.join().is_err() {
            warn!("a card thread panicked");
        }
    }
    // Every worker is gone: wipe every live epoch's key pages now.
    dp.wipe_keys();
    // Pages wiped over the card's life (retired epochs and the ones wiped just now).
    dp.print_counters(Some(crate::encap::key_pages_wiped()));
    Ok(())
}
