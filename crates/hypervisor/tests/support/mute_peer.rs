//! A test-only vhost-user-net backend that stops answering: the card that hangs. Written on
//! raw vhost-user messages (no backend crate), so exactly when it goes silent is chosen by the
//! test:
//!
//! * [`Mute::FromStart`]: it accepts the connection and never answers anything (the
//!   hypervisor's handshake must give up);
//! * [`Mute::AtRingStop`]: it answers the handshake and GET_CONFIG like a card with a fixed MAC
//!   and MTU (offering offloads and multi-queue the frontend must hide), takes every
//!   no-reply request (features, memory table, rings), and goes silent at the first
//!   GET_VRING_BASE, which the frontend sends when the guest resets the device.
//!
//! Either way it then only waits for the connection to end and records whether it did (the
//! hypervisor shuts a silent card's connection down).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_CONFIG: u32 = 24;
/// Version 1, reply.
const REPLY_FLAGS: u32 = 0x1 | 0x4;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;

/// When the peer goes silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mute {
    FromStart,
    AtRingStop,
}

#[derive(Default)]
struct State {
    acked: AtomicU64,
    muted: AtomicBool,
    cut: AtomicBool,
}

pub struct MutePeer {
    pub sock: PathBuf,
    state: Arc<State>,
}

impl MutePeer {
    pub fn start(dir: &Path, name: &str, mac: [u8; 6], features: u64, mute: Mute) -> MutePeer {
        let sock = dir.join(name);
        let listener = UnixListener::bind(&sock).expect("mute peer socket");
        let state = Arc::new(State::default());
        let theirs = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let st = theirs.clone();
                std::thread::spawn(move || serve(conn, mac, features, mute, &st));
            }
        });
        MutePeer { sock, state }
    }

    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.sock).expect("connect to the mute peer")
    }

    /// The feature bits the frontend set.
    pub fn acked_features(&self) -> u64 {
        self.state.acked.load(Ordering::SeqCst)
    }

    /// Whether the peer has gone silent.
    pub fn muted(&self) -> bool {
        self.state.muted.load(Ordering::SeqCst)
    }

    /// Whether, once silent, it saw its connection end.
    pub fn cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }
}

/// Waits (reading and dropping whatever comes) until the frontend ends the connection.
fn silent(mut s: UnixStream, st: &State) {
    st.muted.store(true, Ordering::SeqCst);
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    st.cut.store(true, Ordering::SeqCst);
}

fn reply(s: &mut UnixStream, request: u32, body: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(12 + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&REPLY_FLAGS.to_le_bytes());
    m.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m)
}

fn serve(mut s: UnixStream, mac: [u8; 6], features: u64, mute: Mute, st: &State) {
    if mute == Mute::FromStart {
        silent(s, st);
        return;
    }
    let mut config = mac.to_vec();
    config.extend_from_slice(&1u16.to_le_bytes()); // LINK_UP
    config.extend_from_slice(&4u16.to_le_bytes()); // 4 pairs: the frontend shows 1
    config.extend_from_slice(&1400u16.to_le_bytes());
    loop {
        // The header; any descriptors ride on its first byte (one kept, the rest dropped).
        let mut hdr = [0u8; 12];
        let Ok((n, _fd)) = s.recv_with_fd(&mut hdr) else {
            return;
        };
        if n == 0 || (n < 12 && s.read_exact(&mut hdr[n..]).is_err()) {
            return;
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, size) = (word(0), word(8));
        let mut body = vec![0u8; usize::try_from(size).unwrap_or(0).min(4096)];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        let r = match request {
            GET_FEATURES => reply(
                &mut s,
                request,
                &(features | PROTOCOL_FEATURES).to_le_bytes(),
            ),
            GET_PROTOCOL_FEATURES => reply(&mut s, request, &PROTOCOL_F_CONFIG.to_le_bytes()),
            SET_FEATURES => {
                let mut f = [0u8; 8];
                f.copy_from_slice(body.get(..8).unwrap_or(&[0; 8]));
                st.acked.store(u64::from_le_bytes(f), Ordering::SeqCst);
                Ok(())
            }
            GET_CONFIG => {
                // offset, size, flags, then the bytes asked for.
                let off = body
                    .get(..4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                let len = body
                    .get(4..8)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                let mut out = body.get(..12).unwrap_or(&[0; 12]).to_vec();
                for i in 0..len {
                    out.push(config.get((off + i) as usize).copied().unwrap_or(0));
                }
                reply(&mut s, request, &out)
            }
            GET_VRING_BASE => {
                silent(s, st);
                return;
            }
            _ => Ok(()),
        };
        if r.is_err() {
            return;
        }
    }
}
