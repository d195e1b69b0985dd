//! Test-only helpers shared by Bulkhead's integration tests (a dev-dependency only; nothing
//! here ships in a daemon).
//!
//! A test that cannot run on this machine (no `/dev/kvm`, no swtpm, not root, no test guest,
//! no PostgreSQL, ...) calls [`skip_or_fail`] with the reason. By default that prints a loud
//! `*** SKIPPED` line and the test returns early, so a developer laptop without KVM can still
//! run the rest of the suite. With `BULKHEAD_REQUIRE_ALL=1` in the environment (`make test`
//! and therefore `.ci/run` set it) every skip is a test failure instead: a CI machine that
//! lacks KVM, swtpm or root goes red rather than green without having run the claim tests.

/// The environment variable that turns every skip into a failure.
pub const REQUIRE_ALL_ENV: &str = "BULKHEAD_REQUIRE_ALL";

/// True when `BULKHEAD_REQUIRE_ALL` is set to anything but empty or `0`.
pub fn require_all() -> bool {
    std::env::var_os(REQUIRE_ALL_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Reports that the calling test cannot run here, for `reason`. Returns normally (after a
/// loud `*** SKIPPED` line on stderr) so the caller can `return`; panics with the reason when
/// [`require_all`] is set.
///
/// # Panics
/// When `BULKHEAD_REQUIRE_ALL=1`: a skipped test is a failed test.
#[track_caller]
pub fn skip_or_fail(reason: &str) {
    if require_all() {
        panic!("{REQUIRE_ALL_ENV} is set and this test would have been skipped: {reason}");
    }
    eprintln!("\n*** SKIPPED {reason} (set {REQUIRE_ALL_ENV}=1 to make this a failure) ***\n");
}

/// Asserts `cond` when [`require_all`] is set; otherwise prints a loud note when it is false.
/// For properties a test can only check in the full environment (for example "the cluster
/// ran attested" needs swtpm, "each host ran in its own network namespace" needs root).
///
/// # Panics
/// When `BULKHEAD_REQUIRE_ALL=1` and `cond` is false.
#[track_caller]
pub fn require(cond: bool, what: &str) {
    if cond {
        return;
    }
    if require_all() {
        panic!("{REQUIRE_ALL_ENV} is set and {what} does not hold");
    }
    eprintln!("\n*** NOT CHECKED: {what} does not hold here (set {REQUIRE_ALL_ENV}=1 to make this a failure) ***\n");
}

#[cfg(test)]
mod tests {
    // The switch is process-global state; one test exercises both settings in order.
    #[test]
    fn the_switch_turns_a_skip_into_a_panic() {
        std::env::remove_var(super::REQUIRE_ALL_ENV);
        super::skip_or_fail("demo: nothing missing");
        super::require(false, "demo");
        std::env::set_var(super::REQUIRE_ALL_ENV, "1");
        assert!(std::panic::catch_unwind(|| super::skip_or_fail("demo")).is_err());
        assert!(std::panic::catch_unwind(|| super::require(false, "demo")).is_err());
        super::require(true, "demo");
        std::env::set_var(super::REQUIRE_ALL_ENV, "0");
        super::skip_or_fail("demo again");
    }
}
