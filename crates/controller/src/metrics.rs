//! Counters served as Prometheus text on `GET /v1/metrics` (pulled, never pushed).
//!
//! Nothing a caller sends becomes a label value as is: operations that are not a known name
//! (an unknown route, whose label would be the caller's path) are counted under the one label
//! [`UNKNOWN_ROUTE`], and every label value is escaped per the exposition format.

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
    /// Each running net card's counters (numbers only), by instance.
    pub net: Vec<crate::backend::NetCounters>,
}

/// The operation label every request to a route that does not exist is counted under.
pub const UNKNOWN_ROUTE: &str = "unknown_route";

/// An operation or code name as the code base spells them: a letter, then letters, digits,
/// `_` or `:`, at most 64 bytes. Anything else (a caller's path) is not a label of its own.
fn is_name(s: &str) -> bool {
    s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Escapes a label value per the Prometheus text exposition format: `\` → `\\`, `"` → `\"`,
/// newline → `\n`.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    pub fn count(&self, op: &str, code: &str) {
        self.count_n(op, code, 1);
    }

    /// Adds `n` to (op, code); unknown operations are counted under [`UNKNOWN_ROUTE`].
    pub fn count_n(&self, op: &str, code: &str, n: u64) {
        let op = if is_name(op) { op } else { UNKNOWN_ROUTE };
        let code = if is_name(code) { code } else { "other" };
        let mut m = match self.requests.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let c = m.entry((op.to_string(), code.to_string())).or_default();
        *c = c.saturating_add(n);
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
                "bulkhead_requests_total{{operation=\"{}\",code=\"{}\"}} {n}",
                escape_label(op),
                escape_label(code)
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
            let _ = writeln!(
                out,
                "bulkhead_alerts_total{{rule=\"{}\"}} {n}",
                escape_label(rule)
            );
        }
        let _ = writeln!(
            out,
            "# HELP bulkhead_netcard Net card counters by instance interface (numbers only)."
        );
        let _ = writeln!(out, "# TYPE bulkhead_netcard counter");
        for n in &s.net {
            for (name, v) in &n.counters {
                if !is_name(name) {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "bulkhead_netcard{{instance=\"{}\",counter=\"{}\"}} {v}",
                    escape_label(&n.instance),
                    escape_label(name)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_unknown_routes_share_one_label() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let m = Metrics::default();
        m.count("GET /x\"} 1\nfake_metric 1", "no_such_route");
        m.count("GET /y", "no_such_route");
        m.count("CreateInstance", "ok");
        let out = m.render(&Sampled {
            audit_records: 0,
            audit_batches: 0,
            audit_failures: 0,
            outbound_blocked: 0,
            alerts: vec![],
            instances: 0,
            net: Vec::new(),
        });
        assert!(!out.contains("fake_metric"), "{out}");
        assert!(out.contains(
            "bulkhead_requests_total{operation=\"unknown_route\",code=\"no_such_route\"} 2"
        ));
        assert!(out.contains("operation=\"CreateInstance\",code=\"ok\"} 1"));
    }
}
