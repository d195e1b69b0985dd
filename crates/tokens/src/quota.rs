//! Sliding-window quotas ("at most N reboots per hour"), enforced by the controller itself.

use std::collections::{HashMap, VecDeque};

use crate::ops::Operation;
use crate::policy::Quota;

/// Call times per (caller, operation), in Unix seconds.
#[derive(Debug, Default)]
pub struct QuotaBook {
    calls: HashMap<(String, Operation), VecDeque<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: at most {max} per {per_secs}s")]
pub struct QuotaExceeded {
    pub max: u32,
    pub per_secs: u64,
}

impl QuotaExceeded {
    pub fn code(&self) -> &'static str {
        "quota_exceeded"
    }
}

impl QuotaBook {
    /// Records one call at `now` if the quota allows it; otherwise records nothing.
    pub fn charge(
        &mut self,
        caller: &str,
        op: Operation,
        quota: &Quota,
        now: u64,
    ) -> Result<(), QuotaExceeded> {
        let window = quota.per.as_secs();
        let q = self.calls.entry((caller.to_string(), op)).or_default();
        while q.front().is_some_and(|t| t.saturating_add(window) <= now) {
            q.pop_front();
        }
        let max = usize::try_from(quota.max).unwrap_or(usize::MAX);
        if q.len() >= max {
            return Err(QuotaExceeded {
                max: quota.max,
                per_secs: window,
            });
        }
        q.push_back(now);
        Ok(())
    }

    /// Counts a past call without checking (used to rebuild the book from the audit log).
    pub fn record(&mut self, caller: &str, op: Operation, at: u64) {
        self.calls
            .entry((caller.to_string(), op))
            .or_default()
            .push_back(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn window_slides() {
        let q = Quota {
            operation: Operation::RebootInstance,
            max: 2,
            per: Duration::from_secs(60),
        };
        let mut b = QuotaBook::default();
        assert!(b.charge("c", Operation::RebootInstance, &q, 100).is_ok());
        assert!(b.charge("c", Operation::RebootInstance, &q, 110).is_ok());
        assert!(b.charge("c", Operation::RebootInstance, &q, 120).is_err());
        assert!(b.charge("d", Operation::RebootInstance, &q, 120).is_ok());
        assert!(b.charge("c", Operation::RebootInstance, &q, 161).is_ok());
    }
}
