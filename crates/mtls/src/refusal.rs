//! Refusals: every connection or request a daemon turns away, handed to that daemon's audit sink.
//!
//! A flood must not be able to fill the disk, so refusals pass a [`Summariser`] first: at most
//! `per_second` records per (stage, code) and second are written one by one; the rest are only
//! counted, and once per interval each (stage, code) with suppressed refusals gets one summary
//! record ("K more refusals with this code in the last interval"). Nothing is dropped without
//! being counted. Codes are `&'static str`, so the set of keys is bounded by the program text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_audit::{AuditEntry, Decision, EntryKind};
use bulkhead_tokens::Identity;

/// The stable codes the server loop refuses with.
pub mod codes {
    /// The client presented no certificate where one is required.
    pub const TLS_NO_CLIENT_CERT: &str = "tls_no_client_cert";
    /// The client's certificate does not chain to the CA (or is expired, revoked, ...).
    pub const TLS_BAD_CLIENT_CERT: &str = "tls_bad_client_cert";
    /// Any other TLS failure (not TLS at all, wrong version, bad message).
    pub const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";
    /// The handshake did not finish within the handshake timeout.
    pub const TLS_HANDSHAKE_TIMEOUT: &str = "tls_handshake_timeout";
    /// The certificate verified but names no Bulkhead identity.
    pub const BAD_CERTIFICATE: &str = "bad_certificate";
    /// Too many connections were still handshaking.
    pub const TOO_MANY_HANDSHAKES: &str = "too_many_handshakes";
    /// This client identity already holds its share of connections.
    pub const IDENTITY_CONNECTION_CAP: &str = "identity_connection_cap";
    /// All established-connection slots are taken.
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    /// Not an HTTP/1.1 request (garbage request line, header line without a colon, ...).
    pub const HTTP_MALFORMED: &str = "http_malformed";
    /// An HTTP/2 connection preface on the HTTP/1.1-only listener.
    pub const HTTP2_PREFACE: &str = "http2_preface";
    /// Request line plus headers larger than the buffer.
    pub const HTTP_HEADER_TOO_LARGE: &str = "http_header_too_large";
    /// No complete request head within the header-read timeout.
    pub const HTTP_TIMEOUT: &str = "http_timeout";
    /// The client went away in the middle of a request.
    pub const HTTP_INCOMPLETE: &str = "http_incomplete";
}

/// Where a refusal happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// During the TLS handshake or the identity check right after it.
    Handshake,
    /// Connection admission (budgets and per-identity caps).
    Admission,
    /// The HTTP/1.1 parser, before any handler ran.
    Http,
    /// A daemon's handler, before its audited pipeline (unknown route, body too large, ...).
    Handler,
}

impl Stage {
    /// The `op` an audit record of this stage carries.
    pub fn op(self) -> &'static str {
        match self {
            Stage::Handshake => "TlsHandshake",
            Stage::Admission => "ConnectionAdmission",
            Stage::Http => "HttpParse",
            Stage::Handler => "Request",
        }
    }
}

/// One refused connection or request.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub stage: Stage,
    pub code: &'static str,
    /// The verified client identity, if the handshake got that far.
    pub identity: Option<Arc<Identity>>,
    /// SHA-256 of the client certificate, if one was presented and verified.
    pub cert_sha256: Option<String>,
    /// The route as a bounded, escaped label ([`route_label`]); never a body.
    pub route: Option<String>,
}

impl Refusal {
    pub fn new(stage: Stage, code: &'static str) -> Refusal {
        Refusal {
            stage,
            code,
            identity: None,
            cert_sha256: None,
            route: None,
        }
    }

    /// Attaches the caller (its certificate hash is taken from the identity).
    pub fn by(mut self, identity: Option<Arc<Identity>>) -> Refusal {
        if let Some(id) = &identity {
            self.cert_sha256 = Some(id.cert_sha256.clone());
        }
        self.identity = identity;
        self
    }

    /// Attaches the route (escaped and bounded here).
    pub fn at(mut self, method: &str, path: &str) -> Refusal {
        self.route = Some(route_label(method, path));
        self
    }

    /// The audit record for this refusal: a `Request` record with decision `Deny`. Holds no
    /// body and no digest of one.
    pub fn audit_entry(&self, request_id: String) -> AuditEntry {
        AuditEntry {
            kind: EntryKind::Request,
            request_id,
            caller: self
                .identity
                .as_ref()
                .map_or_else(|| "-".to_string(), |i| i.name.clone()),
            cert_sha256: self.cert_sha256.clone(),
            token_id: None,
            op: self.stage.op().to_string(),
            resources: self.route.iter().map(|r| format!("route:{r}")).collect(),
            params_sha256: None,
            decision: Decision::Deny,
            code: self.code.to_string(),
        }
    }
}

/// Refusals that were counted but not written one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub stage: Stage,
    pub code: &'static str,
    /// How many refusals with this code were not written individually in the interval.
    pub suppressed: u64,
    pub interval: Duration,
}

impl Summary {
    /// The audit record: op `RefusalSummary`, the code, and `suppressed:K` / `stage:S` /
    /// `interval_ms:N` as its resources.
    pub fn audit_entry(&self, request_id: String) -> AuditEntry {
        AuditEntry {
            kind: EntryKind::Request,
            request_id,
            caller: "-".into(),
            cert_sha256: None,
            token_id: None,
            op: "RefusalSummary".into(),
            resources: vec![
                format!("suppressed:{}", self.suppressed),
                format!("stage:{}", self.stage.op()),
                format!("interval_ms:{}", self.interval.as_millis()),
            ],
            params_sha256: None,
            decision: Decision::Deny,
            code: self.code.to_string(),
        }
    }
}

/// What a daemon does with refusals: write them into its own audit log (and metrics).
/// Called from async tasks; must not block for long (queue the record).
pub trait RefusalSink: Send + Sync + 'static {
    fn record(&self, refusal: &Refusal);
    fn summary(&self, summary: &Summary);
}

/// Longest route label kept.
pub const MAX_ROUTE_LABEL: usize = 128;

/// `METHOD /path` with everything but `A-Za-z0-9/_.~-` percent-encoded, bounded to
/// [`MAX_ROUTE_LABEL`] bytes. The query is not kept.
pub fn route_label(method: &str, path: &str) -> String {
    let mut out = String::new();
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'.' | b'~' | b'-');
    for b in method.bytes().take(16) {
        push_escaped(&mut out, b, safe(b) && b != b'/');
    }
    out.push(' ');
    let path = path.split('?').next().unwrap_or("");
    for b in path.bytes() {
        if out.len() + 3 > MAX_ROUTE_LABEL {
            out.push('~');
            break;
        }
        push_escaped(&mut out, b, safe(b));
    }
    out
}

fn push_escaped(out: &mut String, b: u8, keep: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if keep {
        out.push(char::from(b));
    } else {
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[derive(Debug, Default)]
struct CodeCount {
    second: u64,
    written: u32,
    suppressed: u64,
}

/// The rate summariser (pure: time is passed in).
#[derive(Debug)]
pub struct Summariser {
    per_second: u32,
    interval_ms: u64,
    window_start_ms: u64,
    codes: BTreeMap<(Stage, &'static str), CodeCount>,
}

impl Summariser {
    pub fn new(per_second: u32, interval: Duration) -> Summariser {
        Summariser {
            per_second,
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            window_start_ms: 0,
            codes: BTreeMap::new(),
        }
    }

    /// True: write this refusal individually. False: it was counted for the next summary.
    pub fn admit(&mut self, stage: Stage, code: &'static str, now_ms: u64) -> bool {
        let c = self.codes.entry((stage, code)).or_default();
        let second = now_ms / 1000;
        if c.second != second {
            c.second = second;
            c.written = 0;
        }
        if c.written < self.per_second {
            c.written += 1;
            true
        } else {
            c.suppressed = c.suppressed.saturating_add(1);
            false
        }
    }

    /// Summaries due at `now_ms` (at most one per (stage, code) per interval), resetting their
    /// counts. `force` takes them regardless of the interval (shutdown, tests).
    pub fn take_due(&mut self, now_ms: u64, force: bool) -> Vec<Summary> {
        if !force && now_ms.saturating_sub(self.window_start_ms) < self.interval_ms {
            return Vec::new();
        }
        let interval = Duration::from_millis(now_ms.saturating_sub(self.window_start_ms));
        self.window_start_ms = now_ms;
        let mut out = Vec::new();
        for ((stage, code), c) in &mut self.codes {
            if c.suppressed > 0 {
                out.push(Summary {
                    stage: *stage,
                    code,
                    suppressed: std::mem::take(&mut c.suppressed),
                    interval,
                });
            }
        }
        // Forget codes idle for a whole interval so the map stays small.
        let idle_before = now_ms.saturating_sub(self.interval_ms) / 1000;
        self.codes
            .retain(|_, c| c.suppressed > 0 || c.second >= idle_before);
        out
    }
}

/// Individual records per (stage, code) and second, by default.
pub const DEFAULT_PER_SECOND: u32 = 5;
/// How often summaries are written, by default.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// A daemon's refusal hub: the summariser in front of its sink. Shared by its listeners and
/// its handlers.
pub struct Refusals {
    sink: Arc<dyn RefusalSink>,
    summariser: Mutex<Summariser>,
    interval: Duration,
    epoch: Instant,
}

impl Refusals {
    pub fn new(sink: Arc<dyn RefusalSink>) -> Arc<Refusals> {
        Refusals::with_rate(sink, DEFAULT_PER_SECOND, DEFAULT_SUMMARY_INTERVAL)
    }

    pub fn with_rate(
        sink: Arc<dyn RefusalSink>,
        per_second: u32,
        interval: Duration,
    ) -> Arc<Refusals> {
        Arc::new(Refusals {
            sink,
            summariser: Mutex::new(Summariser::new(per_second, interval)),
            interval,
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Summariser> {
        match self.summariser.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records `r` (or counts it for the next summary).
    pub fn refuse(&self, r: Refusal) {
        let now = self.now_ms();
        let write = self.lock().admit(r.stage, r.code, now);
        if write {
            // Logged at the same rate as recorded: a flood does not flood the log either.
            tracing::info!(
                stage = r.stage.op(),
                code = r.code,
                caller = ?r.identity.as_ref().map(|i| &i.name),
                route = ?r.route,
                "refused"
            );
            self.sink.record(&r);
        }
        self.flush(false);
    }

    /// Writes the summaries that are due (all pending ones if `force`).
    pub fn flush(&self, force: bool) {
        let now = self.now_ms();
        let due = self.lock().take_due(now, force);
        for s in &due {
            tracing::warn!(
                stage = s.stage.op(),
                code = s.code,
                suppressed = s.suppressed,
                "refusals summarised"
            );
            self.sink.summary(s);
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Flushes summaries every interval until the process ends (call inside a tokio runtime).
    pub fn spawn_flusher(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.flush(false);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_written_up_to_the_rate_and_the_rest_is_summarised_exactly() {
        let mut s = Summariser::new(5, Duration::from_secs(5));
        let mut written = 0u64;
        let mut summarised = 0u64;
        let mut summaries = 0;
        // 5000 refusals of one code over 2.5 s.
        for i in 0..5000u64 {
            let now = i / 2;
            if s.admit(Stage::Http, "http_malformed", now) {
                written += 1;
            }
            for x in s.take_due(now, false) {
                summarised += x.suppressed;
                summaries += 1;
            }
        }
        for x in s.take_due(10_000, false) {
            assert_eq!(x.code, "http_malformed");
            assert_eq!(x.stage, Stage::Http);
            summarised += x.suppressed;
            summaries += 1;
        }
        // Three distinct seconds (0, 1, 2): 15 written, the rest counted.
        assert_eq!(written, 15);
        assert_eq!(written + summarised, 5000);
        assert!(summaries <= 2, "{summaries}");
    }

    #[test]
    fn codes_are_limited_separately_and_quiet_codes_have_no_summary() {
        let mut s = Summariser::new(2, Duration::from_secs(1));
        assert!(s.admit(Stage::Handshake, "a", 0));
        assert!(s.admit(Stage::Handshake, "a", 1));
        assert!(!s.admit(Stage::Handshake, "a", 2));
        assert!(s.admit(Stage::Handshake, "b", 3));
        assert!(s.admit(Stage::Http, "a", 3), "same code, other stage");
        // A new second admits again.
        assert!(s.admit(Stage::Handshake, "a", 1000));
        assert!(
            s.take_due(999, false).is_empty(),
            "not due within the interval"
        );
        let due = s.take_due(5000, true);
        assert!(due
            .iter()
            .all(|d| d.code == "a" && d.stage == Stage::Handshake));
        assert_eq!(due.iter().map(|d| d.suppressed).sum::<u64>(), 1);
        assert!(s.take_due(9000, true).is_empty());
    }

    #[test]
    fn route_labels_are_escaped_and_bounded() {
        let l = route_label("GET", "/v1/x\"} 1\nfake_metric 1?q=secret");
        assert_eq!(l, "GET /v1/x%22%7D%201%0Afake_metric%201");
        assert!(!l.contains('"') && !l.contains('\n'));
        let long = route_label("POST", &"/a".repeat(500));
        assert!(long.len() <= MAX_ROUTE_LABEL, "{}", long.len());
        assert!(long.ends_with('~'));
        assert_eq!(route_label("G\"T", "/"), "G%22T /");
    }

    #[test]
    fn audit_entries_hold_no_body_digest() {
        let r = Refusal::new(Stage::Handler, "no_such_route").at("GET", "/v1/mint");
        let e = r.audit_entry("x".into());
        assert_eq!(e.params_sha256, None);
        assert_eq!(e.decision, Decision::Deny);
        assert_eq!(e.resources, vec!["route:GET /v1/mint".to_string()]);
        let s = Summary {
            stage: Stage::Http,
            code: "http_malformed",
            suppressed: 7,
            interval: Duration::from_secs(5),
        };
        let e = s.audit_entry("y".into());
        assert_eq!(e.op, "RefusalSummary");
        assert_eq!(e.resources[0], "suppressed:7");
    }
}
