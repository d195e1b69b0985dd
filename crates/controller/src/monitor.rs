//! Monitoring rules over the audit stream. Every request outcome passes through
//! [`Monitor::observe`]; rules that fire produce [`Alert`]s, which the controller appends to the
//! audit log, keeps for `GET /v1/alerts`, and counts in metrics. Nothing is pushed anywhere.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::api::Alert;

/// Auth failures from one identity within [`AUTH_WINDOW_SECS`] that raise an alert.
pub const AUTH_FAILURE_THRESHOLD: usize = 5;
pub const AUTH_WINDOW_SECS: u64 = 60;
/// Reboots on this host within [`REBOOT_WINDOW_SECS`] that raise an alert.
pub const REBOOT_THRESHOLD: usize = 5;
pub const REBOOT_WINDOW_SECS: u64 = 600;
/// The same rule on the same subject fires at most once per this many seconds.
pub const REFIRE_SECS: u64 = 60;
/// Alerts kept for the pull API.
pub const MAX_ALERTS: usize = 1000;

/// Rule names (stable; also metric labels).
pub mod rule {
    pub const AUTH_FAILURES: &str = "auth_failures";
    pub const OUTSIDE_GRANTS: &str = "call_outside_grants";
    pub const FORBIDDEN_ROUTE: &str = "forbidden_route_probe";
    pub const MANY_REBOOTS: &str = "many_reboots";
    pub const OUTBOUND_BLOCKED: &str = "outbound_connect_blocked";
    /// The audit log was found damaged at start (a torn record cut off, or records after its
    /// last signed checkpoint).
    pub const AUDIT_DAMAGED: &str = "audit_log_damaged";
    /// A hypervisor or block card died of SIGSYS: its seccomp filter killed it.
    pub const SANDBOX_KILL: &str = "sandbox_kill";
    pub const ALL: &[&str] = &[
        AUDIT_DAMAGED,
        SANDBOX_KILL,
        AUTH_FAILURES,
        OUTSIDE_GRANTS,
        FORBIDDEN_ROUTE,
        MANY_REBOOTS,
        OUTBOUND_BLOCKED,
    ];
}

fn is_auth_failure(code: &str) -> bool {
    code.starts_with("token_") || code.starts_with("tls_") || code == "bad_certificate"
}

fn is_outside_grants(code: &str) -> bool {
    matches!(
        code,
        "token_operation_not_granted"
            | "token_resource_not_granted"
            | "plane_violation"
            | "policy_denied"
    )
}

#[derive(Default)]
pub struct Monitor {
    auth_failures: HashMap<String, VecDeque<u64>>,
    reboots: VecDeque<u64>,
    last_fired: HashMap<(&'static str, String), u64>,
    alerts: VecDeque<Alert>,
    next_id: u64,
    counts: BTreeMap<&'static str, u64>,
}

impl Monitor {
    /// Feeds one decided request. Returns the alerts it raised.
    pub fn observe(&mut self, caller: &str, op: &str, code: &str, now: u64) -> Vec<Alert> {
        let mut out = Vec::new();
        if is_auth_failure(code) {
            let q = self.auth_failures.entry(caller.to_string()).or_default();
            q.push_back(now);
            while q
                .front()
                .is_some_and(|t| t.saturating_add(AUTH_WINDOW_SECS) < now)
            {
                q.pop_front();
            }
            if q.len() >= AUTH_FAILURE_THRESHOLD {
                let n = q.len();
                out.extend(self.fire(
                    rule::AUTH_FAILURES,
                    caller,
                    format!("{n} authentication/authorization failures in {AUTH_WINDOW_SECS}s"),
                    now,
                ));
            }
        }
        if is_outside_grants(code) {
            out.extend(self.fire(
                rule::OUTSIDE_GRANTS,
                caller,
                format!("{op} refused: {code}"),
                now,
            ));
        }
        if code == "no_such_route" || code == "method_not_allowed" {
            out.extend(self.fire(
                rule::FORBIDDEN_ROUTE,
                caller,
                format!("request for a route that does not exist: {op}"),
                now,
            ));
        }
        if op == "RebootInstance" && code == "ok" {
            self.reboots.push_back(now);
            while self
                .reboots
                .front()
                .is_some_and(|t| t.saturating_add(REBOOT_WINDOW_SECS) < now)
            {
                self.reboots.pop_front();
            }
            if self.reboots.len() >= REBOOT_THRESHOLD {
                let n = self.reboots.len();
                out.extend(self.fire(
                    rule::MANY_REBOOTS,
                    "host",
                    format!("{n} reboots in {REBOOT_WINDOW_SECS}s"),
                    now,
                ));
            }
        }
        out
    }

    /// Reports outbound connection attempts the sandbox blocked since the last call.
    pub fn outbound_blocked(&mut self, new_attempts: u64, now: u64) -> Vec<Alert> {
        if new_attempts == 0 {
            return Vec::new();
        }
        // Always fire: any outbound attempt means a fault or a compromise.
        self.last_fired
            .remove(&(rule::OUTBOUND_BLOCKED, "controller".to_string()));
        self.fire(
            rule::OUTBOUND_BLOCKED,
            "controller",
            format!("{new_attempts} outbound connection attempt(s) blocked by seccomp"),
            now,
        )
        .into_iter()
        .collect()
    }

    /// Reports processes their sandbox killed (always fires: a fault or a compromise).
    pub fn sandbox_killed(&mut self, kills: &[(u32, String)], now: u64) -> Vec<Alert> {
        kills
            .iter()
            .filter_map(|(pid, what)| {
                self.fire(
                    rule::SANDBOX_KILL,
                    &format!("{what}-{pid}"),
                    format!("{what} (pid {pid}) was killed by its seccomp sandbox (SIGSYS)"),
                    now,
                )
            })
            .collect()
    }

    /// Reports damage the audit log found at open (`bulkhead_audit::OpenReport::alerts`).
    pub fn audit_damaged(&mut self, what: &[String], now: u64) -> Vec<Alert> {
        what.iter()
            .filter_map(|w| {
                self.fire(
                    rule::AUDIT_DAMAGED,
                    w,
                    format!("{w} found when the audit log was opened; recorded in the log"),
                    now,
                )
            })
            .collect()
    }

    fn fire(
        &mut self,
        rule: &'static str,
        subject: &str,
        detail: String,
        now: u64,
    ) -> Option<Alert> {
        let key = (rule, subject.to_string());
        if self
            .last_fired
            .get(&key)
            .is_some_and(|t| t.saturating_add(REFIRE_SECS) > now)
        {
            return None;
        }
        self.last_fired.insert(key, now);
        self.next_id += 1;
        let alert = Alert {
            id: self.next_id,
            rule: rule.to_string(),
            subject: subject.to_string(),
            detail,
            time: now,
        };
        *self.counts.entry(rule).or_default() += 1;
        if self.alerts.len() >= MAX_ALERTS {
            self.alerts.pop_front();
        }
        self.alerts.push_back(alert.clone());
        Some(alert)
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.alerts.iter().cloned().collect()
    }

    /// Alerts raised per rule since start.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        rule::ALL
            .iter()
            .map(|r| (*r, self.counts.get(r).copied().unwrap_or(0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_fire_once_per_window() {
        let mut m = Monitor::default();
        let mut fired = 0;
        for i in 0..10 {
            fired += m
                .observe("mallory", "DescribeHost", "token_invalid", 100 + i)
                .len();
        }
        assert_eq!(fired, 1);
        assert_eq!(m.alerts()[0].rule, rule::AUTH_FAILURES);
    }

    #[test]
    fn plane_violation_and_probe_fire() {
        let mut m = Monitor::default();
        assert_eq!(
            m.observe("operator", "GetConsole", "plane_violation", 1)
                .len(),
            1
        );
        assert_eq!(
            m.observe("operator", "GET /v1/exec", "no_such_route", 1)
                .len(),
            1
        );
        assert_eq!(m.outbound_blocked(1, 2).len(), 1);
        assert_eq!(m.outbound_blocked(1, 3).len(), 1);
    }
}
