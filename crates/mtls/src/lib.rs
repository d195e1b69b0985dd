//! `bulkhead-mtls`: the one TLS 1.3 server loop of every Bulkhead daemon (controller, KMS,
//! token service, control plane customer and operator listeners).
//!
//! What it guarantees, whatever the daemon behind it:
//! - **Two budgets.** Connections still in the TLS handshake draw on their own large budget
//!   ([`Limits::max_handshaking`]) and get [`Limits::handshake_timeout`]; established
//!   connections draw on another ([`Limits::max_established`]). Idle TCP sockets cannot take
//!   the slots of authenticated callers.
//! - **A cap per client identity.** After the handshake each connection is charged to its client
//!   certificate's SHA-256 (or `anonymous:<ip>` where the listener takes no client
//!   certificates); one identity holds at most [`Limits::per_identity`] connections, so a
//!   tokenless certificate holder cannot starve operators or the control plane.
//! - **Idle limits.** A connection must deliver a complete request head within
//!   [`Limits::header_read_timeout`], both at the start and between keep-alive requests.
//! - **Every refusal reaches the daemon's audit sink** ([`RefusalSink`]): refused handshakes,
//!   cap hits and HTTP parse errors with stable codes ([`codes`]), rate-summarised
//!   ([`Summariser`]) so a flood cannot fill the disk.
//!
//! Beside the loop: the TLS 1.3 configurations of both ends and the HTTP client every service
//! calls another with ([`client`]: [`HttpsClient`], pinned to the server's identity), and a
//! service daemon's start-up ([`run_daemon`]).

pub mod client;
mod daemon;
mod refusal;

pub use client::{
    client_config, pinned_client_config, server_config, HttpResponse, HttpsClient,
    PinnedServerVerifier, TlsError, MAX_RESPONSE_BYTES,
};
pub use daemon::run_daemon;

pub use refusal::{
    codes, route_label, Refusal, RefusalSink, Refusals, Stage, Summariser, Summary,
    DEFAULT_PER_SECOND, DEFAULT_SUMMARY_INTERVAL, MAX_ROUTE_LABEL,
};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bulkhead_tokens::pki::{cert_sha256, identity_from_der};
use bulkhead_tokens::Identity;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// The verified client certificate identity (if any), inserted into every request's
/// extensions. Where one is present, the bare `Arc<Identity>` is inserted too.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<Arc<Identity>>);

/// Connection limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections in the handshake at once; beyond it new sockets are closed at once.
    pub max_handshaking: usize,
    /// Established (post-handshake) connections at once.
    pub max_established: usize,
    /// Established connections one client identity may hold.
    pub per_identity: usize,
    /// … and the control plane's identity, the one caller that legitimately fans out (every
    /// customer call becomes KMS, token-service and host calls). Still bounded by
    /// `max_established`, and every request it sends is token-checked and audited as before.
    pub per_control_plane: usize,
    /// Time allowed for a complete request head, at the start and between keep-alive
    /// requests (the idle limit).
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers) buffered.
    pub max_buf_size: usize,
    /// Refuse a connection whose certificate names no Bulkhead identity (controller).
    pub require_identity: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_handshaking: 2048,
            max_established: 1024,
            per_identity: 64,
            per_control_plane: 512,
            header_read_timeout: Duration::from_secs(10),
            max_buf_size: 64 * 1024,
            require_identity: false,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (once per process), so that thousands of
/// sockets fit. Returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit struct for the duration of the call.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        if got != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "getrlimit(NOFILE) failed");
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: `want` is a valid rlimit struct; raising the soft limit up to the hard
            // limit needs no privilege.
            let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) };
            if set != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "setrlimit(NOFILE) failed");
            }
        }
    });
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

/// Connections held per key (a client identity, a source address): a counter per key with a
/// cap, released when the [`KeyedSlot`] drops. Used for per-identity budgets here and in the
/// other listeners that speak TLS (the storage node's NBD listener).
#[derive(Default)]
pub struct KeyedSlots {
    held: Mutex<HashMap<String, usize>>,
}

/// One connection counted against its key; released on drop.
pub struct KeyedSlot {
    slots: Arc<KeyedSlots>,
    key: String,
}

impl std::fmt::Debug for KeyedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedSlot").field("key", &self.key).finish()
    }
}

impl KeyedSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Counts one more connection for `key`, or `None` when it already holds `cap`.
    pub fn take(self: &Arc<Self>, key: String, cap: usize) -> Option<KeyedSlot> {
        let mut m = self.lock();
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(KeyedSlot {
            slots: Arc::clone(self),
            key,
        })
    }
}

impl Drop for KeyedSlot {
    fn drop(&mut self) {
        let mut m = self.slots.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn classify_handshake(e: &std::io::Error) -> Option<&'static str> {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => Some(codes::TLS_NO_CLIENT_CERT),
        Some(rustls::Error::InvalidCertificate(_)) => Some(codes::TLS_BAD_CLIENT_CERT),
        Some(_) => Some(codes::TLS_HANDSHAKE_FAILED),
        // A TCP connect that closed without sending anything is not a handshake attempt.
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
        None => Some(codes::TLS_HANDSHAKE_FAILED),
    }
}

/// The stable code of an HTTP-level error, or `None` for what is not a refusal (the peer
/// closing an idle keep-alive connection, a reset after a served request).
fn classify_http(e: &hyper::Error, served: u64) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some(codes::HTTP_HEADER_TOO_LARGE)
    } else if e.is_parse_version_h2() {
        Some(codes::HTTP2_PREFACE)
    } else if e.is_parse() {
        Some(codes::HTTP_MALFORMED)
    } else if e.is_timeout() {
        // A connection that never sent a request was held open for nothing; one that was
        // served and then went quiet is closed as idle.
        (served == 0).then_some(codes::HTTP_TIMEOUT)
    } else if e.is_incomplete_message() {
        Some(codes::HTTP_INCOMPLETE)
    } else {
        None
    }
}

/// Serves `app` behind TLS on `listener` until the process ends. `tls` must be a TLS 1.3
/// configuration (see the daemons' `server_config`); client certificates are whatever it
/// demands. Starts the refusal summariser's flusher.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
    limits: Limits,
    refusals: Arc<Refusals>,
) -> std::io::Result<()> {
    let nofile = raise_nofile_limit();
    tracing::debug!(nofile, "open-file limit");
    refusals.spawn_flusher();
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let handshaking = Arc::new(Semaphore::new(limits.max_handshaking));
    let established = Arc::new(Semaphore::new(limits.max_established));
    let per_identity = Arc::new(KeyedSlots::default());
    let limits = Arc::new(limits);
    loop {
        let (tcp, addr): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(hs_permit) = Arc::clone(&handshaking).try_acquire_owned() else {
            drop(tcp);
            refusals.refuse(Refusal::new(Stage::Admission, codes::TOO_MANY_HANDSHAKES));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            acceptor: acceptor.clone(),
            app: app.clone(),
            limits: Arc::clone(&limits),
            refusals: Arc::clone(&refusals),
            established: Arc::clone(&established),
            per_identity: Arc::clone(&per_identity),
        };
        tokio::spawn(async move { conn.run(tcp, addr, hs_permit).await });
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    app: axum::Router,
    limits: Arc<Limits>,
    refusals: Arc<Refusals>,
    established: Arc<Semaphore>,
    per_identity: Arc<KeyedSlots>,
}

impl Connection {
    async fn run(
        self,
        tcp: tokio::net::TcpStream,
        addr: SocketAddr,
        hs_permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let stream =
            match tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    if let Some(code) = classify_handshake(&e) {
                        tracing::debug!(peer = %addr, error = %e, "TLS handshake refused");
                        self.refusals.refuse(Refusal::new(Stage::Handshake, code));
                    }
                    return;
                }
                Err(_) => {
                    self.refusals
                        .refuse(Refusal::new(Stage::Handshake, codes::TLS_HANDSHAKE_TIMEOUT));
                    return;
                }
            };
        drop(hs_permit);
        let der = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let cert = der.as_deref().map(cert_sha256);
        let identity = der
            .as_deref()
            .and_then(|d| identity_from_der(d).ok())
            .map(Arc::new);
        let refusal = |stage, code| {
            let mut r = Refusal::new(stage, code).by(identity.clone());
            r.cert_sha256 = cert.clone();
            r
        };
        if self.limits.require_identity && identity.is_none() {
            self.refusals
                .refuse(refusal(Stage::Handshake, codes::BAD_CERTIFICATE));
            return;
        }
        let key = match &cert {
            Some(c) => format!("cert:{c}"),
            None => format!("anonymous:{}", addr.ip()),
        };
        let cap = match identity.as_deref().map(|i| i.role) {
            Some(bulkhead_tokens::Role::ControlPlane) => self.limits.per_control_plane,
            _ => self.limits.per_identity,
        };
        let Some(_slot) = self.per_identity.take(key, cap) else {
            self.refusals
                .refuse(refusal(Stage::Admission, codes::IDENTITY_CONNECTION_CAP));
            return;
        };
        let Ok(_permit) = Arc::clone(&self.established).try_acquire_owned() else {
            self.refusals
                .refuse(refusal(Stage::Admission, codes::TOO_MANY_CONNECTIONS));
            return;
        };
        let served = Arc::new(AtomicU64::new(0));
        let peer = Peer(identity.clone());
        let app = self.app.clone();
        let count = Arc::clone(&served);
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                count.fetch_add(1, Ordering::Relaxed);
                req.extensions_mut().insert(peer.clone());
                if let Some(id) = &peer.0 {
                    req.extensions_mut().insert(Arc::clone(id));
                }
                let mut app = app.clone();
                async move { app.call(req.map(axum::body::Body::new)).await }
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(self.limits.max_buf_size)
            .serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = conn.await {
            match classify_http(&e, served.load(Ordering::Relaxed)) {
                Some(code) => self.refusals.refuse(refusal(Stage::Http, code)),
                None => tracing::debug!(peer = %addr, error = %e, "connection ended with error"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_slots_cap_and_release() {
        let s = Arc::new(KeyedSlots::default());
        let a1 = s.take("a".into(), 2);
        let a2 = s.take("a".into(), 2);
        assert!(a1.is_some() && a2.is_some());
        assert!(
            s.take("a".into(), 2).is_none(),
            "third slot for one identity"
        );
        assert!(
            s.take("b".into(), 2).is_some(),
            "another identity is not affected"
        );
        drop(a1);
        assert!(
            s.take("a".into(), 2).is_some(),
            "a released slot is free again"
        );
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(soft, lim.rlim_max);
    }
}
