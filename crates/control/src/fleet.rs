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

use bulkhead_audit::{line_hash, Anchor, AuditRecord, ChainFollower, EntryKind, Head};
use serde_json::Value;

use crate::repo::Repository;
use crate::service::ControlPlane;
use crate::ControlError;

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
}

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
            found.push(Finding {
                rule: rule::HOST_ALERT,
                host: host.into(),
                evidence: format!("{}: {} (seq {})", rec.entry.op, rec.entry.code, rec.seq),
            });
        }
        keep.push((rec.seq, line.clone()));
    }
    (keep, found)
}

/// The pulled lines of a `ReadAudit` answer.
pub fn lines_of(v: &Value) -> Vec<String> {
    v["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    r.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| r.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

impl ControlPlane {
    /// Raises a central alert: one durable record in the control plane's audit log.
    pub(crate) async fn raise(&self, f: &Finding) {
        tracing::error!(rule = f.rule, host = %f.host, evidence = %f.evidence, "fleet alert");
        let id = crate::service::new_id("alert");
        if let Err(e) = self.audit_alert(&id, f.rule, &f.host, &f.evidence).await {
            tracing::error!(error = %e, "could not record fleet alert");
        }
    }

    /// Marks `host` as flagged by `rule` (its pulls stop); returns false if it already was.
    pub(crate) fn flag(&self, host: &str, rule: &'static str) -> bool {
        self.flagged_hosts()
            .insert(host.to_string(), rule)
            .is_none()
    }

    /// The rule that flagged `host`, if any.
    pub fn flagged(&self, host: &str) -> Option<&'static str> {
        self.flagged_hosts().get(host).copied()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_audit::{AuditEntry, AuditLog, Decision};

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
