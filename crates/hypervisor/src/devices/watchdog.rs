//! Deadlines for every wait on a vhost-user backend.
//!
//! A card that stops answering must not freeze the hypervisor. Its replies are awaited on the
//! command loop (the handshake of an attach) and on vCPU threads (activation and reset, when
//! the guest's driver writes the device status), inside the `vhost` crate. A socket timeout
//! (`SO_RCVTIMEO`/`SO_SNDTIMEO`) does not bound those waits: that crate retries a timed-out
//! `recvmsg`/`sendmsg` (`EAGAIN`) forever, and the reads happen inside it, so no `poll()` can
//! go before them either. Instead each sequence of requests runs under a [`Guard`]: if it is
//! still armed at its deadline, the watchdog thread shuts the connection down
//! (`shutdown(SHUT_RDWR)` on a duplicate of the backend's socket), which ends the blocked read
//! or write with end-of-file, the request fails, and the caller treats the backend as dead.
//!
//! The watchdog is one thread, started on the main thread by the first connection, with its
//! own seccomp filter ([`crate::sandbox::ThreadRole::BackendWatchdog`]: it can only shut
//! sockets down). Arming and disarming take a mutex and a condvar, nothing more, so vCPU
//! threads may do it under their own filter.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::lock;

/// One armed deadline.
struct Armed {
    id: u64,
    deadline: Instant,
    sock: Arc<UnixStream>,
    fired: Arc<AtomicBool>,
}

struct Inner {
    armed: Mutex<Vec<Armed>>,
    cv: Condvar,
    next_id: AtomicU64,
}

/// The process's backend watchdog.
pub struct Watchdog {
    inner: Arc<Inner>,
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();

/// The watchdog, started on first use. Must first be called on the main thread (vCPU threads
/// may not create threads): every backend connection is made there.
pub fn get() -> std::io::Result<&'static Watchdog> {
    if let Some(w) = WATCHDOG.get() {
        return Ok(w);
    }
    let inner = Arc::new(Inner {
        armed: Mutex::new(Vec::new()),
        cv: Condvar::new(),
        next_id: AtomicU64::new(1),
    });
    let (tx, rx) = std::sync::mpsc::sync_channel::<bool>(1);
    let theirs = inner.clone();
    std::thread::Builder::new()
        .name("backend-watchdog".into())
        .spawn(move || {
            let sandboxed =
                crate::sandbox::apply_thread_filter(crate::sandbox::ThreadRole::BackendWatchdog);
            if let Err(e) = &sandboxed {
                tracing::error!(error = %e, "cannot install the backend watchdog's seccomp filter");
            }
            let _ = tx.send(sandboxed.is_ok());
            if sandboxed.is_ok() {
                run(&theirs);
            }
        })?;
    if !rx.recv().unwrap_or(false) {
        return Err(std::io::Error::other(
            "the backend watchdog could not sandbox itself",
        ));
    }
    // Only the main thread gets here, so nobody raced us to it.
    let _ = WATCHDOG.set(Watchdog { inner });
    WATCHDOG
        .get()
        .ok_or_else(|| std::io::Error::other("backend watchdog missing"))
}

impl Watchdog {
    /// Arms a deadline of `timeout` from now for the connection whose socket `sock`
    /// duplicates. Disarmed when the guard is dropped.
    pub fn arm(&'static self, sock: &Arc<UnixStream>, timeout: Duration) -> Guard {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let fired = Arc::new(AtomicBool::new(false));
        lock(&self.inner.armed).push(Armed {
            id,
            deadline: Instant::now() + timeout,
            sock: sock.clone(),
            fired: fired.clone(),
        });
        self.inner.cv.notify_all();
        Guard {
            watchdog: self,
            id,
            fired,
        }
    }
}

/// An armed deadline; dropping it disarms it.
pub struct Guard {
    watchdog: &'static Watchdog,
    id: u64,
    fired: Arc<AtomicBool>,
}

impl Guard {
    /// Whether the deadline passed and the connection was shut down.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.watchdog.inner.armed).retain(|a| a.id != self.id);
    }
}

fn run(inner: &Inner) {
    let mut armed = lock(&inner.armed);
    loop {
        let now = Instant::now();
        armed.retain(|a| {
            if a.deadline > now {
                return true;
            }
            tracing::warn!("a vhost-user backend did not answer in time: connection shut down");
            a.fired.store(true, Ordering::SeqCst);
            let _ = a.sock.shutdown(Shutdown::Both);
            false
        });
        armed = match armed.iter().map(|a| a.deadline).min() {
            None => inner.cv.wait(armed).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                inner
                    .cv
                    .wait_timeout(armed, d.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_wait_past_its_deadline_ends_and_an_answered_one_is_left_alone() {
        let w = get().expect("watchdog");
        // Nobody answers: the blocked read ends with end-of-file at the deadline.
        let (mut ours, _theirs) = UnixStream::pair().expect("pair");
        let dup = Arc::new(ours.try_clone().expect("dup"));
        let t = Instant::now();
        let g = w.arm(&dup, Duration::from_millis(200));
        let mut b = [0u8; 1];
        assert_eq!(ours.read(&mut b).expect("read"), 0);
        assert!(g.fired());
        assert!(t.elapsed() < Duration::from_secs(5));
        // An answer before the deadline: the guard is dropped and nothing fires.
        let (mut ours, mut theirs) = UnixStream::pair().expect("pair");
        let dup = Arc::new(ours.try_clone().expect("dup"));
        {
            let g = w.arm(&dup, Duration::from_millis(300));
            std::io::Write::write_all(&mut theirs, b"x").expect("write");
            assert_eq!(ours.read(&mut b).expect("read"), 1);
            assert!(!g.fired());
        }
        std::thread::sleep(Duration::from_millis(500));
        std::io::Write::write_all(&mut theirs, b"y").expect("still open");
        assert_eq!(ours.read(&mut b).expect("read"), 1);
    }
}
