//! The control plane's own audit log: each call's decision (durable before acting) and outcome,
//! central alerts (fleet monitoring), and the alerts and metrics read back for operators.

use bulkhead_audit::{AuditEntry, Decision, EntryKind};
use serde_json::{json, Value};

use super::ControlPlane;
use crate::ControlError;

impl ControlPlane {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn audit(
        &self,
        kind: EntryKind,
        request_id: &str,
        who: (&str, &str),
        op: &str,
        res: Vec<String>,
        // The body is never recorded (claim 2); callers still say what they were sent.
        _body: Option<&str>,
        code: &str,
    ) -> Result<(), ControlError> {
        let entry = AuditEntry {
            kind,
            request_id: request_id.to_string(),
            caller: who.0.to_string(),
            cert_sha256: None,
            token_id: Some(who.1.to_string()).filter(|s| !s.is_empty()),
            op: op.to_string(),
            resources: res,
            // Claim 2: a customer's request body (user data, …) leaves no digest, length or
            // prefix in a record an operator can read.
            params_sha256: None,
            decision: match kind {
                EntryKind::Request if code == "ok" => Decision::Allow,
                EntryKind::Request => Decision::Deny,
                _ => Decision::None,
            },
            code: code.to_string(),
        };
        if kind == EntryKind::Request {
            self.audit
                .append(entry)
                .await
                .map_err(|_| ControlError::AuditUnavailable)?;
        } else {
            self.audit.append_queued(entry);
        }
        Ok(())
    }

    /// A central alert (fleet monitoring), durable before this returns.
    pub(crate) async fn audit_alert(
        &self,
        request_id: &str,
        rule: &str,
        host: &str,
        evidence: &str,
    ) -> Result<u64, bulkhead_audit::AuditError> {
        self.audit
            .append(AuditEntry {
                kind: EntryKind::Alert,
                request_id: request_id.to_string(),
                caller: host.to_string(),
                cert_sha256: None,
                token_id: None,
                op: rule.to_string(),
                resources: vec![format!("host:{host}")],
                params_sha256: None,
                decision: Decision::None,
                code: evidence.chars().take(512).collect(),
            })
            .await
    }
    /// Prometheus text of the central monitoring (operators' API).
    pub fn fleet_metrics(&self) -> String {
        let hosts: Vec<String> = self
            .repo
            .hosts()
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.host_id)
            .collect();
        let mut text = self.fleet.render_metrics(&hosts);
        text.push_str(&self.step_times.render_metrics());
        text
    }
    /// The central alerts recorded so far (newest last), at most `limit`.
    pub fn alerts(&self, limit: usize) -> Vec<Value> {
        let lines =
            bulkhead_audit::read_after(self.audit.path(), 0, usize::MAX).unwrap_or_default();
        let mut out: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<bulkhead_audit::AuditRecord>(l).ok())
            .filter(|r| r.entry.kind == EntryKind::Alert)
            .map(|r| {
                json!({
                    "rule": r.entry.op,
                    "host": r.entry.caller,
                    "evidence": r.entry.code,
                    "time_ms": r.time_ms,
                    "seq": r.seq,
                })
            })
            .collect();
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
        out
    }
}
