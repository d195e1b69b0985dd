//! Fleet audit: the control plane checks every host's audit chain as it pulls it.
//!
//! Each pull continues from the last record stored for that host (its sequence number and line
//! hash are the anchor); every pulled record must chain from it, and every checkpoint must be
//! signed by the host's own key (its TLS certificate) when the control plane has that
//! certificate. The head the host reports in `DescribeHost` must not be behind the anchor, nor
//! differ from it at the same sequence number. A host that fails any of these is flagged: its
//! pull stops (its history is never silently re-based), and a central alert — rule, host,
//! evidence — is written to the control plane's own audit log, where the operators' API
//! (`GET /v1/operator/alerts`) and `bulkhead-control` read it. Alerts a host raised itself
//! (kind `alert` in its pulled log, e.g. `audit_torn_tail`) are raised centrally as
//! `host_alert`.

//!
//! Beside the chain checks, [`FleetMonitor`] applies the central rules of `fleet-rules.toml`
//! ([`Rules`]): a host that stops answering polls (`host_silent`), a host whose pulled log shows
//! many refused requests in a window (`repeated_authz_failures`), a host that fails attestation
//! (`host_attestation_failed`), and any host-raised alert, named after the host's own rule
//! (`host_alert`, or `sandbox_kill` when the host's sandbox killed one of its processes). Each
//! alert is a durable record in the control plane's audit log and a counter in
//! `GET /v1/operator/metrics`.

use bulkhead_audit::{line_hash, Anchor, AuditRecord, ChainFollower, EntryKind, Head};
use bulkhead_controller_proto::{calls, HostDescription};

use crate::hosts::ANSWER_MALFORMED;
use crate::repo::{HostRow, Repository};
use crate::service::ControlPlane;
use crate::ControlError;

/// Audit records asked for per pull (at most [`bulkhead_controller_proto::MAX_AUDIT_PAGE`]).
const PULL_PAGE: u32 = 500;

/// Central alert rules (stable names).
pub mod rule {
    /// A pulled record does not continue the chain from the last stored record, or a checkpoint
    /// signature does not verify.
    pub const CHAIN_BROKEN: &str = "host_audit_chain_broken";
    /// The host reports a head behind what was already pulled (records deleted).
    pub const TRUNCATED: &str = "host_audit_truncated";
    /// The host reports a different record at an already-pulled sequence number.
    pub const REWRITTEN: &str = "host_audit_rewritten";
    /// The host's own log holds an alert (raised by the host, pulled).
    pub const HOST_ALERT: &str = "host_alert";
    /// A host's sandbox killed (or blocked) one of its processes: a fault or a compromise.
    pub const SANDBOX_KILL: &str = "sandbox_kill";
    /// A host has not answered polls for `silent_after_secs`.
    pub const SILENT: &str = "host_silent";
    /// `authz_failures` refused requests within `window_secs` in one host's pulled log.
    pub const AUTHZ_FAILURES: &str = "repeated_authz_failures";
    /// A host failed attestation (no work is placed on it).
    pub const ATTESTATION_FAILED: &str = "host_attestation_failed";
    pub const ALL: &[&str] = &[
        CHAIN_BROKEN,
        TRUNCATED,
        REWRITTEN,
        HOST_ALERT,
        SANDBOX_KILL,
        SILENT,
        AUTHZ_FAILURES,
        ATTESTATION_FAILED,
    ];
    /// Host-side alert rules that mean the host's sandbox stopped one of its processes.
    pub const HOST_SANDBOX_RULES: &[&str] = &["outbound_connect_blocked", "sandbox_kill"];
}

pub use crate::fleet_rules::{FleetMonitor, Rules, RulesError};

/// What was found about one host's pulled audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: &'static str,
    pub host: String,
    pub evidence: String,
}

/// The anchor for `host`: its last stored record (seq, line hash), if any.
pub fn stored_anchor(repo: &dyn Repository, host: &str) -> Result<Option<Anchor>, ControlError> {
    let cursor = repo.host_audit_cursor(host)?;
    if cursor == 0 {
        return Ok(None);
    }
    let last = repo.host_audit_after(host, cursor - 1, 1)?;
    Ok(last.first().map(|(seq, line)| Anchor {
        seq: *seq,
        hash: line_hash(line.as_bytes()),
    }))
}

/// Checks the head a host reports against the stored anchor.
pub fn check_head(host: &str, anchor: Option<&Anchor>, head: &Head) -> Option<Finding> {
    let a = anchor?;
    if head.seq < a.seq {
        return Some(Finding {
            rule: rule::TRUNCATED,
            host: host.into(),
            evidence: format!(
                "host reports head seq {} but seq {} was already pulled",
                head.seq, a.seq
            ),
        });
    }
    if head.seq == a.seq && head.hash != a.hash {
        return Some(Finding {
            rule: rule::REWRITTEN,
            host: host.into(),
            evidence: format!(
                "record {} now hashes to {}, pulled as {}",
                a.seq, head.hash, a.hash
            ),
        });
    }
    None
}

/// Checks a page of pulled lines against the anchor. Returns the records to store (all or
/// none) and the findings (host alerts found in the page, or the break).
pub fn check_page(
    host: &str,
    anchor: Option<&Anchor>,
    key: Option<&bulkhead_audit::CheckpointKey>,
    lines: &[String],
) -> (Vec<(u64, String)>, Vec<Finding>) {
    let mut f = match anchor {
        Some(a) => ChainFollower::resume(key.cloned(), a, 0),
        None => ChainFollower::new(key.cloned()),
    };
    let mut keep = Vec::with_capacity(lines.len());
    let mut found = Vec::new();
    for line in lines {
        let rec: AuditRecord = match f.push(line.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                return (
                    Vec::new(),
                    vec![Finding {
                        rule: rule::CHAIN_BROKEN,
                        host: host.into(),
                        evidence: e.to_string(),
                    }],
                )
            }
        };
        if rec.entry.kind == EntryKind::Alert {
            let r = if rule::HOST_SANDBOX_RULES.contains(&rec.entry.op.as_str()) {
                rule::SANDBOX_KILL
            } else {
                rule::HOST_ALERT
            };
            found.push(Finding {
                rule: r,
                host: host.into(),
                evidence: format!("{}: {} (seq {})", rec.entry.op, rec.entry.code, rec.seq),
            });
        }
        keep.push((rec.seq, line.clone()));
    }
    (keep, found)
}

impl ControlPlane {
    /// Raises a central alert: one durable record in the control plane's audit log.
    pub(crate) async fn raise(&self, f: &Finding) {
        tracing::error!(rule = f.rule, host = %f.host, evidence = %f.evidence, "fleet alert");
        self.fleet.count(f.rule);
        let id = crate::service::new_id("alert");
        if let Err(e) = self.audit_alert(&id, f.rule, &f.host, &f.evidence).await {
            tracing::error!(error = %e, "could not record fleet alert");
        }
    }

    /// Marks `host` as flagged by `rule` (its pulls stop); returns false if it already was.
    pub(crate) fn flag(&self, host: &str, rule: &'static str) -> bool {
        self.fleet.flag(host, rule)
    }

    /// The rule that flagged `host`, if any.
    pub fn flagged(&self, host: &str) -> Option<&'static str> {
        self.fleet.flagged(host)
    }

    /// Pulls `h`'s audit records after the last stored one and stores them only if they
    /// continue its chain (see [`crate::fleet`]). `described` is the host's `DescribeHost`
    /// answer of this round (its audit head). Returns how many records were stored.
    pub(crate) async fn pull_host_audit(
        &self,
        h: &HostRow,
        described: &HostDescription,
    ) -> Result<u64, ControlError> {
        if self.flagged(&h.host_id).is_some() {
            return Ok(0);
        }
        let anchor = stored_anchor(self.repo.as_ref(), &h.host_id)?;
        let head = &described.audit_head;
        let head_seq = head.seq;
        if let Some(f) = check_head(&h.host_id, anchor.as_ref(), head) {
            if self.flag(&h.host_id, f.rule) {
                self.raise(&f).await;
            }
            return Ok(0);
        }
        let after = anchor.as_ref().map_or(0, |a| a.seq);
        let read = calls::ReadAudit {
            after,
            limit: PULL_PAGE,
        };
        let lines = match self.hosts.call(&h.host_id, &h.addr, &read).await {
            Ok(page) => page.records,
            // An answer that is not an audit page serves no record: checked as a cut below.
            Err(ControlError::Host(ANSWER_MALFORMED)) => Vec::new(),
            Err(_) => return Ok(0),
        };
        if lines.is_empty() && head_seq > after {
            // The host says its log reaches `head_seq` yet serves nothing after `after`:
            // records were cut out from under the running controller.
            let f = Finding {
                rule: rule::TRUNCATED,
                host: h.host_id.clone(),
                evidence: format!(
                    "host reports head seq {head_seq} but serves no record after seq {after}"
                ),
            };
            if self.flag(&h.host_id, f.rule) {
                self.raise(&f).await;
            }
            return Ok(0);
        }
        let (keep, found) = check_page(
            &h.host_id,
            anchor.as_ref(),
            self.audit_keys.get(&h.host_id),
            &lines,
        );
        for f in &found {
            if f.rule == rule::CHAIN_BROKEN && !self.flag(&h.host_id, f.rule) {
                continue;
            }
            self.raise(f).await;
        }
        if keep.is_empty() {
            return Ok(0);
        }
        self.repo.append_host_audit(&h.host_id, &keep)?;
        self.observe_denials(&h.host_id, &keep).await;
        Ok(u64::try_from(keep.len()).unwrap_or(0))
    }

    /// Counts the refused requests in a page pulled from `host` (the central authorization-
    /// failure rule).
    pub(crate) async fn observe_denials(&self, host: &str, page: &[(u64, String)]) {
        let times: Vec<u64> = page
            .iter()
            .filter_map(|(_, l)| serde_json::from_str::<AuditRecord>(l).ok())
            .filter(|r| {
                r.entry.kind == EntryKind::Request
                    && r.entry.decision == bulkhead_audit::Decision::Deny
            })
            .map(|r| r.time_ms)
            .collect();
        if let Some(f) = self.fleet.denials(host, &times) {
            self.raise(&f).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fleet_rules::escape_label;
    use bulkhead_audit::{AuditEntry, AuditLog, Decision};
    use std::time::Duration;

    fn entry(kind: EntryKind, op: &str) -> AuditEntry {
        AuditEntry {
            kind,
            request_id: "r".into(),
            caller: "c".into(),
            cert_sha256: None,
            token_id: None,
            op: op.into(),
            resources: vec![],
            params_sha256: None,
            decision: Decision::None,
            code: "ok".into(),
        }
    }

    fn log_lines(n: usize, alert_at: Option<usize>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        for i in 0..n {
            let kind = if Some(i) == alert_at {
                EntryKind::Alert
            } else {
                EntryKind::Request
            };
            log.append_blocking(entry(kind, "DescribeHost")).unwrap();
        }
        drop(log);
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_page_must_continue_the_anchor() {
        let lines = log_lines(6, Some(4));
        let (keep, found) = check_page("h", None, None, &lines[..3]);
        assert_eq!(keep.len(), 3);
        assert!(found.is_empty());
        let anchor = Anchor {
            seq: 3,
            hash: line_hash(lines[2].as_bytes()),
        };
        let (keep, found) = check_page("h", Some(&anchor), None, &lines[3..]);
        assert_eq!(keep.len(), 3);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rule, rule::HOST_ALERT);
        // Another log's records after the same seq do not continue it.
        let other = log_lines(6, None);
        let (keep, found) = check_page("h", Some(&anchor), None, &other[3..]);
        assert!(keep.is_empty());
        assert_eq!(found[0].rule, rule::CHAIN_BROKEN);
    }

    #[test]
    fn rules_parse_strictly() {
        assert_eq!(Rules::parse("").unwrap(), Rules::default());
        let r = Rules::parse("silent_after_secs = 5\nauthz_failures = 3").unwrap();
        assert_eq!(
            (r.silent_after_secs, r.authz_failures, r.window_secs),
            (5, 3, 60)
        );
        assert!(matches!(
            Rules::parse("silent_after_secs = 0"),
            Err(RulesError::OutOfRange { .. })
        ));
        assert!(matches!(
            Rules::parse("silent = 5"),
            Err(RulesError::Syntax(_))
        ));
        assert!(Rules::parse("window_secs = -1").is_err());
    }

    #[test]
    fn each_central_rule_fires_on_its_cause_and_once() {
        let m = FleetMonitor::new(Rules {
            silent_after_secs: 1,
            authz_failures: 3,
            window_secs: 10,
        });
        // Silence.
        m.seen("h");
        assert!(m.unanswered("h").is_none(), "not silent long enough");
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(m.unanswered("h").unwrap().rule, rule::SILENT);
        assert!(m.unanswered("h").is_none(), "once per silence");
        m.seen("h");
        assert!(m.unanswered("h").is_none());
        // Denials: two, then a third within the window; spread-out ones do not count.
        assert!(m.denials("h", &[1_000, 2_000]).is_none());
        assert_eq!(m.denials("h", &[3_000]).unwrap().rule, rule::AUTHZ_FAILURES);
        assert!(m.denials("h", &[4_000]).is_none(), "once per window");
        assert!(m.denials("g", &[0, 20_000, 40_000]).is_none());
        // Attestation.
        assert_eq!(
            m.attestation_failed("h", "attest_bad_pcr").unwrap().rule,
            rule::ATTESTATION_FAILED
        );
        assert!(m.attestation_failed("h", "attest_bad_pcr").is_none());
        m.attested("h");
        assert!(m.attestation_failed("h", "x").is_some());
        // Metrics.
        m.count(rule::SILENT);
        m.flag("h", rule::TRUNCATED);
        let text = m.render_metrics(&["h".into(), "g".into()]);
        assert!(text.contains("bulkhead_fleet_alerts_total{rule=\"host_silent\"} 1"));
        assert!(text.contains("bulkhead_fleet_host_flagged{host=\"h\"} 1"));
        assert!(text.contains("bulkhead_fleet_host_flagged{host=\"g\"} 0"));
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_head_behind_or_different_is_flagged() {
        let a = Anchor {
            seq: 10,
            hash: "ab".repeat(32),
        };
        let head = |seq, hash: &str| Head {
            seq,
            hash: hash.into(),
            checkpoint: 0,
        };
        assert_eq!(
            check_head("h", Some(&a), &head(9, "x")).unwrap().rule,
            rule::TRUNCATED
        );
        assert_eq!(
            check_head("h", Some(&a), &head(10, "cd")).unwrap().rule,
            rule::REWRITTEN
        );
        assert!(check_head("h", Some(&a), &head(10, &"ab".repeat(32))).is_none());
        assert!(check_head("h", Some(&a), &head(12, "zz")).is_none());
        assert!(check_head("h", None, &head(0, "")).is_none());
    }
}
