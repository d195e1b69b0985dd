//! Counters served as Prometheus text on `GET /v1/metrics` (pulled, never pushed).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    /// (operation, code) → count.
    requests: Mutex<BTreeMap<(String, String), u64>>,
}

/// Values owned by other parts, sampled at render time.
pub struct Sampled {
    pub audit_records: u64,
    pub audit_batches: u64,
    pub audit_failures: u64,
    pub outbound_blocked: u64,
    pub alerts: Vec<(&'static str, u64)>,
    pub instances: u32,
}

impl Metrics {
    pub fn count(&self, op: &str, code: &str) {
        let mut m = match self.requests.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *m.entry((op.to_string(), code.to_string())).or_default() += 1;
    }

    pub fn render(&self, s: &Sampled) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP bulkhead_requests_total Requests by operation and result code."
        );
        let _ = writeln!(out, "# TYPE bulkhead_requests_total counter");
        let m = match self.requests.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for ((op, code), n) in &m {
            let _ = writeln!(
                out,
                "bulkhead_requests_total{{operation=\"{op}\",code=\"{code}\"}} {n}"
            );
        }
        let mut gauge = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            "bulkhead_audit_records",
            "gauge",
            "Records in the audit log.",
            s.audit_records,
        );
        gauge(
            "bulkhead_audit_commits_total",
            "counter",
            "Group commits (fsyncs) of the audit log.",
            s.audit_batches,
        );
        gauge(
            "bulkhead_audit_failures_total",
            "counter",
            "Failed audit writes (requests refused).",
            s.audit_failures,
        );
        gauge(
            "bulkhead_outbound_blocked_total",
            "counter",
            "Outbound connection attempts blocked by seccomp.",
            s.outbound_blocked,
        );
        gauge(
            "bulkhead_instances",
            "gauge",
            "Live instances.",
            u64::from(s.instances),
        );
        let _ = writeln!(out, "# HELP bulkhead_alerts_total Alerts raised by rule.");
        let _ = writeln!(out, "# TYPE bulkhead_alerts_total counter");
        for (rule, n) in &s.alerts {
            let _ = writeln!(out, "bulkhead_alerts_total{{rule=\"{rule}\"}} {n}");
        }
        out
    }
}
