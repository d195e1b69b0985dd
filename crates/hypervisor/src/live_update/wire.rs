//! The hand-over protocol between the old and the new hypervisor process, on one
//! `SOCK_STREAM` unix socketpair made by their parent (the old end rides on the `LiveUpdate`
//! command, the new end is inherited by `bulkhead-hypervisor incoming`).
//!
//! ```text
//! old                                        new
//!  ── Hello {shape} + memfd (SCM_RIGHTS) ──►   builds its VM around the memfd: memslots,
//!                                              irqchip, PIT, vCPUs with CPUID (guest runs on)
//!  ◄───────────────────────────── Ready ──
//!  pauses the vCPUs, reads the state
//!  ── State {blob} ──────────────────────►   parses it
//!  ── CardFds {n} + n fds (SCM_RIGHTS) ───►   one per card of the state, in its order: the
//!                                              vhost-user connection, kicks, calls
//!                                              restores the state into its own KVM VM
//!  ◄──────────── Restored | Refused{why} ──
//!  ── Go ─────────────────────────────────►   starts its vCPUs (the old never runs again)
//!  ◄──────────────── Running {started_at} ──
//!  replies Updated to its parent, exits         serves its own channel
//! ```
//!
//! Until the old process sends `Go`, the new one has not run the guest, so any failure before
//! it (a refusal, the new process dying, a timeout) leaves the guest to the old one, which
//! resumes it. Frames are `tag: u8, len: u32 LE, payload`, `len` capped at [`MAX_MESSAGE`]
//! before anything is buffered; every wait has a deadline.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use bulkhead_channel::StateRefusal;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::{HEADER_LEN, MAX_STATE};

/// Version of this hand-over protocol (the state blob has its own).
pub const HANDOVER_VERSION: u16 = 1;
/// Largest payload: a state blob.
pub const MAX_MESSAGE: usize = HEADER_LEN + MAX_STATE;
/// Most pinned host CPUs a hello may list.
const MAX_PIN: usize = 1024;
/// Most file descriptors one `CardFds` carries: a card's connection and a kick and a call per
/// queue (at most 64 queues); below the kernel's SCM_MAX_FD (253).
pub const MAX_CARD_FDS: usize = 1 + 2 * 64;

/// The VM's shape, sent first with the memfd: what the new process builds before the pause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub threads_per_core: u8,
    pub pin: Vec<u32>,
}

/// One hand-over message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    Ready,
    State(Vec<u8>),
    Restored,
    Go,
    /// CLOCK_MONOTONIC when the new process started its vCPUs.
    Running {
        started_at_ns: u64,
    },
    Refused(StateRefusal),
    /// A card's file descriptors follow on this message's first byte (`count` of them).
    CardFds {
        count: u16,
    },
}

/// Why a hand-over exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the hand-over socket")]
    Gone,
    #[error("the peer did not answer in time")]
    Timeout,
    #[error("not a hand-over message: {0}")]
    Protocol(&'static str),
    #[error("hand-over socket: {0}")]
    Io(std::io::Error),
}

fn refusal_code(r: StateRefusal) -> u8 {
    match r {
        StateRefusal::Truncated => 1,
        StateRefusal::Corrupted => 2,
        StateRefusal::UnknownVersion => 3,
        StateRefusal::Malformed => 4,
        StateRefusal::Mismatch => 5,
        StateRefusal::Restore => 6,
        StateRefusal::Build => 7,
    }
}

fn refusal_of(code: u8) -> Option<StateRefusal> {
    Some(match code {
        1 => StateRefusal::Truncated,
        2 => StateRefusal::Corrupted,
        3 => StateRefusal::UnknownVersion,
        4 => StateRefusal::Malformed,
        5 => StateRefusal::Mismatch,
        6 => StateRefusal::Restore,
        7 => StateRefusal::Build,
        _ => return None,
    })
}

impl Msg {
    fn tag(&self) -> u8 {
        match self {
            Msg::Hello(_) => 1,
            Msg::Ready => 2,
            Msg::State(_) => 3,
            Msg::Restored => 4,
            Msg::Go => 5,
            Msg::Running { .. } => 6,
            Msg::Refused(_) => 7,
            Msg::CardFds { .. } => 8,
        }
    }

    /// The frame: tag, length, payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Msg::Hello(h) => {
                p.extend_from_slice(&h.version.to_le_bytes());
                p.extend_from_slice(&h.memory_mib.to_le_bytes());
                p.push(h.vcpus);
                p.push(h.threads_per_core);
                p.extend_from_slice(&u16::try_from(h.pin.len()).unwrap_or(0).to_le_bytes());
                for c in &h.pin {
                    p.extend_from_slice(&c.to_le_bytes());
                }
            }
            Msg::State(b) => p.extend_from_slice(b),
            Msg::Running { started_at_ns } => p.extend_from_slice(&started_at_ns.to_le_bytes()),
            Msg::Refused(r) => p.push(refusal_code(*r)),
            Msg::CardFds { count } => p.extend_from_slice(&count.to_le_bytes()),
            Msg::Ready | Msg::Restored | Msg::Go => {}
        }
        let mut out = Vec::with_capacity(5 + p.len());
        out.push(self.tag());
        out.extend_from_slice(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// The one parser for a hand-over message: a tag and its whole payload.
    pub fn parse(tag: u8, p: &[u8]) -> Result<Msg, WireError> {
        let exact = |n: usize, what| {
            if p.len() == n {
                Ok(())
            } else {
                Err(WireError::Protocol(what))
            }
        };
        Ok(match tag {
            1 => {
                let bad = || WireError::Protocol("hello");
                let fixed: &[u8; 14] = p
                    .get(..14)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(bad)?;
                let n = usize::from(u16::from_le_bytes([fixed[12], fixed[13]]));
                if n > MAX_PIN || p.len() != 14 + 4 * n {
                    return Err(bad());
                }
                let pin = p[14..]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mut mib = [0u8; 8];
                mib.copy_from_slice(&fixed[2..10]);
                Msg::Hello(Hello {
                    version: u16::from_le_bytes([fixed[0], fixed[1]]),
                    memory_mib: u64::from_le_bytes(mib),
                    vcpus: fixed[10],
                    threads_per_core: fixed[11],
                    pin,
                })
            }
            2 => exact(0, "ready").map(|_| Msg::Ready)?,
            3 => Msg::State(p.to_vec()),
            4 => exact(0, "restored").map(|_| Msg::Restored)?,
            5 => exact(0, "go").map(|_| Msg::Go)?,
            6 => {
                let b: [u8; 8] = p.try_into().map_err(|_| WireError::Protocol("running"))?;
                Msg::Running {
                    started_at_ns: u64::from_le_bytes(b),
                }
            }
            7 => {
                exact(1, "refused")?;
                Msg::Refused(refusal_of(p[0]).ok_or(WireError::Protocol("refusal code"))?)
            }
            8 => {
                let b: [u8; 2] = p.try_into().map_err(|_| WireError::Protocol("card fds"))?;
                let count = u16::from_le_bytes(b);
                if usize::from(count) > MAX_CARD_FDS {
                    return Err(WireError::Protocol("card fd count"));
                }
                Msg::CardFds { count }
            }
            _ => return Err(WireError::Protocol("unknown tag")),
        })
    }
}

fn io_err(e: std::io::Error) -> WireError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::UnexpectedEof => WireError::Gone,
        _ => WireError::Io(e),
    }
}

/// Sends `msg`, with `fd` riding on its first byte.
pub fn send(sock: &UnixStream, msg: &Msg, fd: Option<RawFd>) -> Result<(), WireError> {
    let frame = msg.encode();
    let mut sent = 0;
    if let Some(fd) = fd {
        sent = sock
            .send_with_fd(&frame[..], fd)
            .map_err(|e| io_err(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    (&*sock)
        .write_all(frame.get(sent..).unwrap_or(&[]))
        .map_err(io_err)
}

/// Sends `msg` with every fd of `fds` riding on its first byte (at most [`MAX_CARD_FDS`]).
pub fn send_fds(sock: &UnixStream, msg: &Msg, fds: &[RawFd]) -> Result<(), WireError> {
    if fds.len() > MAX_CARD_FDS {
        return Err(WireError::Protocol("too many fds"));
    }
    let frame = msg.encode();
    let sent = sock
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|e| io_err(std::io::Error::from_raw_os_error(e.errno())))?;
    (&*sock)
        .write_all(frame.get(sent..).unwrap_or(&[]))
        .map_err(io_err)
}

/// Receives one `CardFds` message and the fds that rode on it, before `deadline`. Anything
/// else, or a count that does not match the fds received, is a protocol error (the fds that
/// did arrive are closed).
pub fn recv_card_fds(sock: &UnixStream, deadline: Instant) -> Result<Vec<File>, WireError> {
    use std::os::fd::FromRawFd;
    let mut head = [0u8; 5];
    let mut raw = [-1 as RawFd; MAX_CARD_FDS];
    wait_readable(sock, deadline)?;
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    }];
    // SAFETY: the one iovec points at `head`, a buffer we own and may be written with any
    // bytes; `raw` has room for MAX_CARD_FDS descriptors.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io_err(std::io::Error::from_raw_os_error(e.errno())))?;
    let files: Vec<File> = raw
        .get(..nfds.min(MAX_CARD_FDS))
        .unwrap_or(&[])
        .iter()
        // SAFETY: the first `nfds` entries are descriptors the kernel just installed for us;
        // nothing else owns them.
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return Err(WireError::Gone);
    }
    read_exact(sock, &mut head[n..], deadline)?;
    let len = usize::try_from(u32::from_le_bytes([head[1], head[2], head[3], head[4]]))
        .map_err(|_| WireError::Protocol("length"))?;
    if len != 2 {
        return Err(WireError::Protocol("card fds"));
    }
    let mut payload = [0u8; 2];
    read_exact(sock, &mut payload, deadline)?;
    match Msg::parse(head[0], &payload)? {
        Msg::CardFds { count } if usize::from(count) == files.len() => Ok(files),
        _ => Err(WireError::Protocol("card fds")),
    }
}

/// Waits until `sock` is readable or `deadline` passes.
fn wait_readable(sock: &UnixStream, deadline: Instant) -> Result<(), WireError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::Timeout);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(WireError::Io(e));
            }
        }
    }
}

/// Fills `buf` from `sock` before `deadline`.
fn read_exact(sock: &UnixStream, mut buf: &mut [u8], deadline: Instant) -> Result<(), WireError> {
    while !buf.is_empty() {
        wait_readable(sock, deadline)?;
        match (&*sock).read(buf) {
            Ok(0) => return Err(WireError::Gone),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

/// Receives one message (and the fd that rode on it, if any) before `deadline`.
pub fn recv(sock: &UnixStream, deadline: Instant) -> Result<(Msg, Option<File>), WireError> {
    let mut head = [0u8; 5];
    wait_readable(sock, deadline)?;
    let (n, file) = sock
        .recv_with_fd(&mut head)
        .map_err(|e| io_err(std::io::Error::from_raw_os_error(e.errno())))?;
    if n == 0 {
        return Err(WireError::Gone);
    }
    read_exact(sock, &mut head[n..], deadline)?;
    let len = usize::try_from(u32::from_le_bytes([head[1], head[2], head[3], head[4]]))
        .map_err(|_| WireError::Protocol("length"))?;
    if len > MAX_MESSAGE {
        return Err(WireError::Protocol("message too large"));
    }
    let mut payload = vec![0u8; len];
    read_exact(sock, &mut payload, deadline)?;
    Ok((Msg::parse(head[0], &payload)?, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn messages_round_trip_over_a_socketpair_with_an_fd() {
        let (a, b) = UnixStream::pair().expect("pair");
        let hello = Msg::Hello(Hello {
            version: HANDOVER_VERSION,
            memory_mib: 128,
            vcpus: 2,
            threads_per_core: 1,
            pin: vec![2, 3],
        });
        let soon = || Instant::now() + Duration::from_secs(5);
        send(&a, &hello, Some(a.as_raw_fd())).expect("send");
        let (m, fd) = recv(&b, soon()).expect("recv");
        assert_eq!(m, hello);
        assert!(fd.is_some());
        // That fd is a duplicate of `a`: the peer is only gone once it is closed too.
        drop(fd);
        let big = Msg::State(vec![7u8; 300_000]);
        let t = std::thread::spawn(move || {
            for m in [
                big,
                Msg::Refused(StateRefusal::UnknownVersion),
                Msg::Running { started_at_ns: 9 },
            ] {
                send(&a, &m, None).expect("send");
            }
        });
        assert_eq!(
            recv(&b, soon()).expect("recv").0,
            Msg::State(vec![7u8; 300_000])
        );
        assert_eq!(
            recv(&b, soon()).expect("recv").0,
            Msg::Refused(StateRefusal::UnknownVersion)
        );
        assert_eq!(
            recv(&b, soon()).expect("recv").0,
            Msg::Running { started_at_ns: 9 }
        );
        t.join().expect("sender");
        assert!(matches!(recv(&b, soon()), Err(WireError::Gone)));
    }

    #[test]
    fn card_fds_ride_together_and_a_wrong_count_is_refused() {
        let (a, b) = UnixStream::pair().expect("pair");
        let soon = || Instant::now() + Duration::from_secs(5);
        let fds = [a.as_raw_fd(), b.as_raw_fd(), a.as_raw_fd()];
        send_fds(&a, &Msg::CardFds { count: 3 }, &fds).expect("send");
        assert_eq!(recv_card_fds(&b, soon()).expect("recv").len(), 3);
        send_fds(&a, &Msg::CardFds { count: 2 }, &fds).expect("send");
        assert!(matches!(
            recv_card_fds(&b, soon()),
            Err(WireError::Protocol(_))
        ));
        send(&a, &Msg::Go, None).expect("send");
        assert!(recv_card_fds(&b, soon()).is_err());
        let m = Msg::CardFds { count: 129 };
        assert_eq!(Msg::parse(8, &m.encode()[5..]).expect("parses"), m);
    }

    #[test]
    fn bad_frames_are_refused_and_silence_times_out() {
        assert!(Msg::parse(99, &[]).is_err());
        assert!(Msg::parse(2, &[0]).is_err());
        assert!(Msg::parse(7, &[200]).is_err());
        assert!(Msg::parse(1, &[0; 13]).is_err());
        assert!(Msg::parse(8, &[0]).is_err());
        assert!(Msg::parse(8, &[0xff, 0xff]).is_err());
        let (a, b) = UnixStream::pair().expect("pair");
        let r = recv(&b, Instant::now() + Duration::from_millis(50));
        assert!(matches!(r, Err(WireError::Timeout)));
        (&a).write_all(&[3, 0xff, 0xff, 0xff, 0xff]).expect("write");
        let r = recv(&b, Instant::now() + Duration::from_secs(1));
        assert!(matches!(r, Err(WireError::Protocol(_))));
    }
}
