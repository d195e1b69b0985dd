//! A vhost-user message relay between QEMU 7.2 and the card, for the QEMU test only.
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` whenever the device's features are set (at
//! machine reset and at the guest driver's FEATURES_OK) — before it ever sends `SET_FEATURES`
//! to the backend. The vhost-user spec allows that message only once
//! `VHOST_USER_F_PROTOCOL_FEATURES` has been acked, and the `vhost` crate enforces it: the card
//! drops such a connection. This relay forwards every message (with its fds) unchanged, except
//! that a `SET_VRING_ENABLE` before the first `SET_FEATURES` is answered here (an ack when one
//! is asked for) and held back: the last state asked for each ring is sent right after
//! `SET_FEATURES`, when the backend accepts it (QEMU itself does not repeat it). Bulkhead's own hypervisor sends the messages
//! in the spec's order and needs no relay.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 1 << 3;
const REPLY: u32 = 1 << 2;
const VERSION: u32 = 1;

/// Relays `listen` (QEMU's side) to `backend` (the card's vhost-user socket), connection by
/// connection, in background threads.
pub fn start(listen: &Path, backend: PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen)?;
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(front) = conn else { break };
            let Ok(back) = UnixStream::connect(&backend) else {
                continue;
            };
            relay(front, back);
        }
    });
    Ok(())
}

fn relay(front: UnixStream, back: UnixStream) {
    let (Ok(front_w), Ok(back_r)) = (front.try_clone(), back.try_clone()) else {
        return;
    };
    let front_w = Arc::new(Mutex::new(front_w));
    let fw = Arc::clone(&front_w);
    // Backend → frontend: replies (no fds), copied as bytes.
    std::thread::spawn(move || {
        let mut back_r = back_r;
        let mut buf = [0u8; 4096];
        loop {
            match back_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut w = fw.lock().expect("lock");
                    if w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        if let Ok(w) = fw.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    });
    std::thread::spawn(move || {
        let mut features_seen = false;
        // SET_VRING_ENABLE states asked for before SET_FEATURES: (queue, state).
        let mut pending: Vec<(u32, u32)> = Vec::new();
        loop {
            let mut hdr = [0u8; 12];
            let mut fds = [0 as RawFd; 32];
            let mut iov = [libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            }];
            // SAFETY: the iovec points at `hdr`, which is writable for its length.
            let r = unsafe { front.recv_with_fds(&mut iov, &mut fds) };
            let Ok((n, nfds)) = r else { break };
            // SAFETY: the first `nfds` entries are fds we now own.
            let owned: Vec<OwnedFd> = fds[..nfds]
                .iter()
                .map(|fd| {
                    // SAFETY: the first `nfds` entries are descriptors this recvmsg just
                    // received (SCM_RIGHTS); nothing else owns them.
                    unsafe { OwnedFd::from_raw_fd(*fd) }
                })
                .collect();
            if n == 0 {
                break;
            }
            if n < 12 && (&front).read_exact(&mut hdr[n..]).is_err() {
                break;
            }
            let req = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
            let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4"));
            let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4")) as usize;
            let mut body = vec![0u8; size];
            if (&front).read_exact(&mut body).is_err() {
                break;
            }
            if std::env::var_os("BULKHEAD_VU_TRACE").is_some() {
                eprintln!(
                    "vu-proxy: req {req} flags {flags:#x} size {size} fds {nfds} body {:02x?}",
                    &body[..body.len().min(16)]
                );
            }
            if req == SET_FEATURES {
                features_seen = true;
            }
            if req == SET_VRING_ENABLE && !features_seen && body.len() == 8 {
                let q = u32::from_le_bytes(body[0..4].try_into().expect("4"));
                let on = u32::from_le_bytes(body[4..8].try_into().expect("4"));
                pending.retain(|(p, _)| *p != q);
                pending.push((q, on));
                if flags & NEED_REPLY != 0 {
                    let mut reply = Vec::new();
                    reply.extend_from_slice(&req.to_le_bytes());
                    reply.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
                    reply.extend_from_slice(&8u32.to_le_bytes());
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    let mut w = front_w.lock().expect("lock");
                    if w.write_all(&reply).is_err() {
                        break;
                    }
                }
                continue;
            }
            let mut msg = hdr.to_vec();
            msg.extend_from_slice(&body);
            let raw: Vec<RawFd> = owned.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            if back.send_with_fds(&[&msg[..]], &raw).is_err() {
                break;
            }
            drop(owned);
            if req == SET_FEATURES {
                // Now the backend accepts them: apply the states QEMU asked for earlier.
                for (q, on) in pending.drain(..) {
                    let mut m = Vec::new();
                    m.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                    m.extend_from_slice(&VERSION.to_le_bytes());
                    m.extend_from_slice(&8u32.to_le_bytes());
                    m.extend_from_slice(&q.to_le_bytes());
                    m.extend_from_slice(&on.to_le_bytes());
                    if (&back).write_all(&m).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = back.shutdown(std::net::Shutdown::Both);
    });
}
