//! The central monitoring rules' thresholds ([`Rules`], from `policy/fleet-rules.toml`) and
//! the state they keep between polls ([`FleetMonitor`]); see [`crate::fleet`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fleet::{rule, Finding};

/// Thresholds of the central rules, from `fleet-rules.toml` (every field optional).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// A host that has not answered a poll for this long raises `host_silent`.
    pub silent_after_secs: u64,
    /// This many refused requests in one host's pulled log …
    pub authz_failures: u32,
    /// … within this many seconds raise `repeated_authz_failures`.
    pub window_secs: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            silent_after_secs: 30,
            authz_failures: 20,
            window_secs: 60,
        }
    }
}

/// Why a rules file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("not a rules file: {0}")]
    Syntax(String),
    #[error("{field} must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        min: u64,
        max: u64,
    },
}

impl Rules {
    /// The one parser of the rules file.
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        let r: Rules = toml::from_str(text).map_err(|e| RulesError::Syntax(e.message().into()))?;
        let check = |field, v: u64, min, max| {
            if (min..=max).contains(&v) {
                Ok(())
            } else {
                Err(RulesError::OutOfRange { field, min, max })
            }
        };
        check("silent_after_secs", r.silent_after_secs, 1, 86_400)?;
        check("authz_failures", u64::from(r.authz_failures), 1, 1_000_000)?;
        check("window_secs", r.window_secs, 1, 86_400)?;
        Ok(r)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The state the central rules keep between polls.
#[derive(Debug, Default)]
pub struct FleetMonitor {
    pub rules: Rules,
    flagged: Mutex<HashMap<String, &'static str>>,
    last_seen: Mutex<HashMap<String, Instant>>,
    silent: Mutex<HashSet<String>>,
    denies: Mutex<HashMap<String, VecDeque<u64>>>,
    /// (rule, host) of the last `repeated_authz_failures`, with the time it fired (ms).
    authz_fired: Mutex<HashMap<String, u64>>,
    attest_failed: Mutex<HashSet<String>>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl FleetMonitor {
    pub fn new(rules: Rules) -> Self {
        FleetMonitor {
            rules,
            ..FleetMonitor::default()
        }
    }

    /// Marks `host` as flagged by `rule` (its pulls stop); false if it already was.
    pub fn flag(&self, host: &str, rule: &'static str) -> bool {
        lock(&self.flagged).insert(host.to_string(), rule).is_none()
    }

    pub fn flagged(&self, host: &str) -> Option<&'static str> {
        lock(&self.flagged).get(host).copied()
    }

    /// A poll of `host` answered.
    pub fn seen(&self, host: &str) {
        lock(&self.last_seen).insert(host.to_string(), Instant::now());
        lock(&self.silent).remove(host);
    }

    /// A poll of `host` failed: a finding once it has been silent too long (once per silence).
    pub fn unanswered(&self, host: &str) -> Option<Finding> {
        let since = *lock(&self.last_seen)
            .entry(host.to_string())
            .or_insert_with(Instant::now);
        let quiet = since.elapsed();
        if quiet < Duration::from_secs(self.rules.silent_after_secs)
            || !lock(&self.silent).insert(host.to_string())
        {
            return None;
        }
        Some(Finding {
            rule: rule::SILENT,
            host: host.into(),
            evidence: format!("no answer to polls for {} s", quiet.as_secs()),
        })
    }

    /// Attestation of `host` failed with `code` (once until it attests again).
    pub fn attestation_failed(&self, host: &str, code: &str) -> Option<Finding> {
        lock(&self.attest_failed)
            .insert(host.to_string())
            .then(|| Finding {
                rule: rule::ATTESTATION_FAILED,
                host: host.into(),
                evidence: format!("attestation refused: {code}"),
            })
    }

    pub fn attested(&self, host: &str) {
        lock(&self.attest_failed).remove(host);
    }

    /// Counts refused requests in records pulled from `host`; a finding when the window holds
    /// the threshold (at most once per window).
    pub fn denials(&self, host: &str, times_ms: &[u64]) -> Option<Finding> {
        if times_ms.is_empty() {
            return None;
        }
        let window = self.rules.window_secs.saturating_mul(1000);
        let mut all = lock(&self.denies);
        let q = all.entry(host.to_string()).or_default();
        q.extend(times_ms.iter().copied());
        let newest = q.iter().copied().max().unwrap_or(0);
        while q.front().is_some_and(|t| t.saturating_add(window) < newest) {
            q.pop_front();
        }
        if q.len() < usize::try_from(self.rules.authz_failures).unwrap_or(usize::MAX) {
            return None;
        }
        let mut fired = lock(&self.authz_fired);
        if fired
            .get(host)
            .is_some_and(|t| t.saturating_add(window) > newest)
        {
            return None;
        }
        fired.insert(host.to_string(), newest);
        Some(Finding {
            rule: rule::AUTHZ_FAILURES,
            host: host.into(),
            evidence: format!(
                "{} refused requests within {} s",
                q.len(),
                self.rules.window_secs
            ),
        })
    }

    pub fn count(&self, rule: &'static str) {
        *lock(&self.counts).entry(rule).or_default() += 1;
    }

    /// Prometheus text: alerts raised per rule since start, and which hosts are flagged.
    pub fn render_metrics(&self, hosts: &[String]) -> String {
        let counts = lock(&self.counts);
        let mut out = String::from(
            "# HELP bulkhead_fleet_alerts_total Central alerts raised since start, by rule.\n\
             # TYPE bulkhead_fleet_alerts_total counter\n",
        );
        for r in rule::ALL {
            let n = counts.get(r).copied().unwrap_or(0);
            out.push_str(&format!(
                "bulkhead_fleet_alerts_total{{rule=\"{r}\"}} {n}\n"
            ));
        }
        out.push_str(
            "# HELP bulkhead_fleet_host_flagged 1 when the host's pulled audit failed a check.\n\
             # TYPE bulkhead_fleet_host_flagged gauge\n",
        );
        for h in hosts {
            // Host ids are checked names (letters, digits, '-', '.'), nothing to escape.
            let f = u8::from(self.flagged(h).is_some());
            out.push_str(&format!(
                "bulkhead_fleet_host_flagged{{host=\"{}\"}} {f}\n",
                escape_label(h)
            ));
        }
        out
    }
}

/// A label value escaped per the Prometheus text format.
pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
