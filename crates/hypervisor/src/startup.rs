//! Start-up step marks: with `BULKHEAD_LOG=bulkhead_hypervisor::startup=debug` every step of
//! building a VM logs the CLOCK_MONOTONIC time at which it ended (`mono_ns`), so the time from
//! process start to the first `KVM_RUN` can be broken down without a tracer in the way
//! (docs/status.md, issue 18). When the level is disabled `tracing` evaluates nothing (not even
//! the clock read): a mark costs one check of the callsite's cached interest.

/// Logs that start-up step `step` ended now.
pub fn mark(step: &'static str) {
    tracing::debug!(
        mono_ns = crate::live_update::monotonic_ns(),
        step,
        "start-up step"
    );
}
