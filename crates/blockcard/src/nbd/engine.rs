//! The connection thread.
//!
//! - Submissions arrive on a queue (an eventfd wakes the thread); each gets a cookie, is written
//!   into the TLS session and kept in `inflight` with its payload until its reply.
//! - Replies are parsed from the decrypted stream with `SimpleReply::parse`. A reply with an
//!   error value fails that request (`Reply`). Anything that makes the stream unreadable — a bad
//!   magic, a cookie not in flight, a structured reply, TLS garbage — is a protocol violation:
//!   every request in flight fails with `Protocol` (no data is ever guessed), the connection is
//!   dropped, and the next request connects again.
//! - A lost connection (EOF, reset, TLS close, no reply for [`REPLY_TIMEOUT`]) is not a failure:
//!   the thread reconnects with backoff (100 ms doubling to 2 s) for up to [`RECONNECT_BUDGET`]
//!   and re-sends what was in flight (same cookies, same ciphertext). A request that was on
//!   [`MAX_SENDS`] connections that each died without answering it fails with `Dropped`; after
//!   the budget everything waiting fails with `Unavailable`.
//! - `NBD_REP_ERR_POLICY`/`UNKNOWN` at a reconnect's GO (the volume was fenced or attached
//!   elsewhere) is terminal: every request from then on fails with `Fenced`.

use super::handshake::{self, Session};
use super::replies::ReplyStream;
use super::{NbdClientError, Op, Target};
use crate::metrics::BlkMetrics;
use bulkhead_nbd::{Command, CommandFlags, Cookie, NbdError, OptionError, Request};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the card keeps trying to reach the storage node before failing waiting requests.
pub const RECONNECT_BUDGET: Duration = Duration::from_secs(300);
/// With requests in flight and nothing received for this long, the connection counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// A request sent on this many connections that all died unanswered fails.
pub const MAX_SENDS: u32 = 4;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// State shared by the submitting lanes and the connection thread.
pub(crate) struct Shared {
    queue: Mutex<Vec<Arc<Op>>>,
    wake: EventFd,
    metrics: Arc<BlkMetrics>,
}

impl Shared {
    pub(crate) fn new(metrics: Arc<BlkMetrics>) -> std::io::Result<Self> {
        Ok(Shared {
            queue: Mutex::new(Vec::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            metrics,
        })
    }

    /// Queues `op` and blocks until the connection thread completes it.
    pub(crate) fn submit(&self, op: Arc<Op>) -> Result<Vec<u8>, NbdClientError> {
        // The connection thread takes the whole queue each time it wakes, so only a push onto an
        // empty queue needs to wake it (one eventfd write per burst, not per request).
        let was_empty = {
            let mut q = lock(&self.queue);
            let e = q.is_empty();
            q.push(op.clone());
            e
        };
        if was_empty && self.wake.write(1).is_err() {
            return Err(NbdClientError::Stopped);
        }
        let mut done = lock(&op.done);
        loop {
            if let Some(r) = done.take() {
                return r;
            }
            done = match op.cv.wait(done) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }
}

/// Acknowledges what arrived at once instead of delaying the ACK: a server that writes a read's
/// reply header and payload as two TLS records without `TCP_NODELAY` (qemu's NBD server over
/// TLS) otherwise waits for that ACK (Nagle) and every small read costs the 40 ms delayed-ACK
/// timer. Linux clears the flag again by itself, so it is set after every read. Best effort.
fn quick_ack(sock: &std::net::TcpStream) {
    let one: libc::c_int = 1;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&one`, a live c_int; the fd is
    // the session's open socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            std::ptr::addr_of!(one).cast(),
            len,
        )
    };
}

fn complete(op: &Op, r: Result<Vec<u8>, NbdClientError>) {
    *lock(&op.done) = Some(r);
    op.cv.notify_all();
}

struct InFlight {
    op: Arc<Op>,
    sends: u32,
    /// When it was last sent: a request the server leaves unanswered for [`REPLY_TIMEOUT`]
    /// while it answers others ends the connection like silence does.
    sent: Instant,
}

/// Why the current connection ended.
enum Break {
    /// The transport went away: reconnect and re-send.
    Lost(&'static str),
    /// The server broke the protocol: fail what is in flight.
    Violation(NbdError),
}

pub(crate) struct Engine {
    shared: Arc<Shared>,
    target: Target,
    session: Option<Session>,
    inflight: BTreeMap<u64, InFlight>,
    next_cookie: u64,
    rx: ReplyStream,
    fenced: Option<OptionError>,
    size: u64,
    last_progress: Instant,
}

impl Engine {
    pub(crate) fn new(shared: Arc<Shared>, target: Target, first: Session) -> Self {
        Engine {
            shared,
            target,
            size: first.size,
            session: Some(first),
            inflight: BTreeMap::new(),
            next_cookie: 1,
            rx: ReplyStream::default(),
            fenced: None,
            last_progress: Instant::now(),
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            if let Some(e) = self.fenced {
                self.fail_queue(|| NbdClientError::Fenced(e));
                self.wait_wake();
                continue;
            }
            if self.session.is_none() {
                if self.inflight.is_empty() && lock(&self.shared.queue).is_empty() {
                    self.wait_wake();
                    continue;
                }
                self.reconnect();
                continue;
            }
            self.take_new();
            if let Err(b) = self.pump() {
                self.broken(b);
            }
        }
    }

    fn wait_wake(&self) {
        let mut fds = [libc::pollfd {
            fd: self.shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
        let _ = self.shared.wake.read();
    }

    fn fail_queue(&self, err: impl Fn() -> NbdClientError) {
        let queued: Vec<_> = std::mem::take(&mut *lock(&self.shared.queue));
        for op in queued {
            BlkMetrics::inc(&self.shared.metrics.nbd_failed_requests);
            complete(&op, Err(err()));
        }
    }

    fn fail_inflight(&mut self, err: impl Fn() -> NbdClientError) {
        for (_, f) in std::mem::take(&mut self.inflight) {
            BlkMetrics::inc(&self.shared.metrics.nbd_failed_requests);
            complete(&f.op, Err(err()));
        }
    }

    fn request_of(cookie: u64, op: &Op) -> Request {
        Request {
            flags: CommandFlags::default(),
            command: op.command,
            cookie: Cookie(cookie),
            offset: op.offset,
            length: op.length,
        }
    }

    fn send(session: &mut Session, cookie: u64, op: &Op) -> Result<(), Break> {
        let mut w = session.tls.writer();
        w.write_all(&Self::request_of(cookie, op).encode())
            .map_err(|_| Break::Lost("tls write"))?;
        if op.command == Command::Write {
            w.write_all(&op.payload)
                .map_err(|_| Break::Lost("tls write"))?;
        }
        Ok(())
    }

    fn take_new(&mut self) {
        let new: Vec<_> = std::mem::take(&mut *lock(&self.shared.queue));
        let Some(session) = self.session.as_mut() else {
            // Put them back for after the reconnect.
            lock(&self.shared.queue).extend(new);
            return;
        };
        if self.inflight.is_empty() {
            self.last_progress = Instant::now();
        }
        // Everything taken at once goes into rustls as one write, so a burst of requests becomes
        // a few full TLS records instead of one or two small records per request.
        let mut burst: Vec<u8> = Vec::new();
        for op in new {
            let cookie = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1);
            burst.extend_from_slice(&Self::request_of(cookie, &op).encode());
            if op.command == Command::Write {
                burst.extend_from_slice(&op.payload);
            }
            self.inflight.insert(
                cookie,
                InFlight {
                    op,
                    sends: 1,
                    sent: Instant::now(),
                },
            );
        }
        // A failed write into rustls' buffer only happens on a closed session; the pump notices
        // and the requests are re-sent with the rest.
        if !burst.is_empty() {
            let _ = session.tls.writer().write_all(&burst);
        }
        let n = u64::try_from(self.inflight.len()).unwrap_or(u64::MAX);
        self.shared
            .metrics
            .nbd_inflight_peak
            .fetch_max(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes what rustls holds, waits for the socket or a submission, reads and parses.
    fn pump(&mut self) -> Result<(), Break> {
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        while s.tls.wants_write() {
            match s.tls.write_tls(&mut s.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Break::Lost("socket write")),
            }
        }
        let mut events = libc::POLLIN;
        if s.tls.wants_write() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: s.sock.as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            return Ok(());
        }
        if fds[1].revents != 0 {
            let _ = self.shared.wake.read();
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_socket()?;
        }
        if !self.inflight.is_empty() && self.last_progress.elapsed() > REPLY_TIMEOUT {
            return Err(Break::Lost("reply timeout"));
        }
        if self
            .inflight
            .values()
            .any(|f| f.sent.elapsed() > REPLY_TIMEOUT)
        {
            return Err(Break::Lost("a request left unanswered"));
        }
        Ok(())
    }

    fn read_socket(&mut self) -> Result<(), Break> {
        loop {
            let Some(s) = self.session.as_mut() else {
                return Ok(());
            };
            match s.tls.read_tls(&mut s.sock) {
                Ok(0) => return Err(Break::Lost("eof")),
                Ok(_) => quick_ack(&s.sock),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(Break::Lost("socket read")),
            }
            if s.tls.process_new_packets().is_err() {
                return Err(Break::Lost("tls"));
            }
            let mut buf = [0u8; 64 * 1024];
            loop {
                let Some(s) = self.session.as_mut() else {
                    return Ok(());
                };
                match s.tls.reader().read(&mut buf) {
                    Ok(0) => return Err(Break::Lost("tls close")),
                    Ok(n) => {
                        self.rx
                            .push(buf.get(..n).unwrap_or(&[]))
                            .map_err(Break::Violation)?;
                        self.parse_replies()?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(Break::Lost("tls read")),
                }
            }
        }
    }

    fn parse_replies(&mut self) -> Result<(), Break> {
        loop {
            let inflight = &self.inflight;
            let next = self.rx.next(|c| {
                inflight.get(&c.0).map(|f| match f.op.command {
                    Command::Read => usize::try_from(f.op.length).unwrap_or(usize::MAX),
                    _ => 0,
                })
            });
            let Some(reply) = next.map_err(Break::Violation)? else {
                return Ok(());
            };
            self.last_progress = Instant::now();
            let Some(f) = self.inflight.remove(&reply.cookie.0) else {
                continue;
            };
            match reply.result {
                Ok(data) => complete(&f.op, Ok(data)),
                Err(errno) => {
                    BlkMetrics::inc(&self.shared.metrics.nbd_reply_errors);
                    BlkMetrics::inc(&self.shared.metrics.nbd_failed_requests);
                    warn!(
                        cookie = reply.cookie.0,
                        ?errno,
                        "storage node failed a request"
                    );
                    complete(&f.op, Err(NbdClientError::Reply(errno)));
                }
            }
        }
    }

    fn broken(&mut self, b: Break) {
        self.session = None;
        self.rx.clear();
        match b {
            Break::Violation(e) => {
                BlkMetrics::inc(&self.shared.metrics.nbd_protocol_errors);
                error!(error = %e, inflight = self.inflight.len(), "storage node broke the NBD protocol; failing the requests in flight and reconnecting");
                self.fail_inflight(|| NbdClientError::Protocol(e.clone()));
            }
            Break::Lost(why) => {
                BlkMetrics::inc(&self.shared.metrics.nbd_connection_losses);
                warn!(
                    why,
                    inflight = self.inflight.len(),
                    "connection to the storage node lost; I/O stalls until it is back"
                );
                let dead: Vec<u64> = self
                    .inflight
                    .iter()
                    .filter(|(_, f)| f.sends >= MAX_SENDS)
                    .map(|(c, _)| *c)
                    .collect();
                for c in dead {
                    if let Some(f) = self.inflight.remove(&c) {
                        BlkMetrics::inc(&self.shared.metrics.nbd_failed_requests);
                        complete(&f.op, Err(NbdClientError::Dropped(f.sends)));
                    }
                }
            }
        }
    }

    fn reconnect(&mut self) {
        let start = Instant::now();
        let mut delay = BACKOFF_START;
        let mut attempts = 0u32;
        loop {
            attempts = attempts.saturating_add(1);
            let res = handshake::connect(&self.target).and_then(|s| {
                if s.size == self.size {
                    Ok(s)
                } else {
                    Err(NbdClientError::ExportChanged {
                        was: self.size,
                        now: s.size,
                    })
                }
            });
            match res {
                Ok(mut s) => {
                    BlkMetrics::inc(&self.shared.metrics.nbd_reconnects);
                    let mut resent = 0u64;
                    for (c, f) in self.inflight.iter_mut() {
                        f.sends = f.sends.saturating_add(1);
                        f.sent = Instant::now();
                        let _ = Self::send(&mut s, *c, &f.op);
                        resent += 1;
                    }
                    BlkMetrics::add(&self.shared.metrics.nbd_resent, resent);
                    info!(
                        attempts,
                        resent,
                        stalled_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "reconnected to the storage node"
                    );
                    self.session = Some(s);
                    self.last_progress = Instant::now();
                    return;
                }
                Err(NbdClientError::Fenced(e)) => {
                    BlkMetrics::inc(&self.shared.metrics.nbd_fenced);
                    error!(
                        refusal = e.name(),
                        "the storage node refused the export: the volume is fenced; every request fails from now on"
                    );
                    self.fenced = Some(e);
                    self.fail_inflight(|| NbdClientError::Fenced(e));
                    self.fail_queue(|| NbdClientError::Fenced(e));
                    return;
                }
                Err(e) => {
                    if start.elapsed() > RECONNECT_BUDGET {
                        BlkMetrics::inc(&self.shared.metrics.nbd_unavailable);
                        error!(error = %e, attempts, "storage node unreachable past the reconnect budget; failing waiting requests");
                        self.fail_inflight(|| NbdClientError::Unavailable);
                        self.fail_queue(|| NbdClientError::Unavailable);
                        return;
                    }
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        warn!(error = %e, attempts, "reconnect to the storage node failed; retrying");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}
