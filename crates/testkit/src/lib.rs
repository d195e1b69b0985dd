//! Test-only helpers shared by Bulkhead's integration tests (a dev-dependency only; nothing
//! here ships in a daemon).
//!
//! A test that cannot run on this machine (no `/dev/kvm`, no swtpm, not root, no test guest,
//! no PostgreSQL, ...) calls [`skip_or_fail`] with the reason. By default that prints a loud
//! `*** SKIPPED` line and the test returns early, so a developer laptop without KVM can still
//! run the rest of the suite. With `BULKHEAD_REQUIRE_ALL=1` in the environment (`make test`
//! and therefore `.ci/run` set it) every skip is a test failure instead: a CI machine that
//! lacks KVM, swtpm or root goes red rather than green without having run the claim tests.
//!
//! [`assert_digests_keyed`] is claim 6's check of an audit log's body digests, shared by the
//! tests that read a daemon's real log as an operator would.

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

/// Claim 6's check of an audit log's body digests, as an operator who reads the log would make
/// it. `recorded` are the `params_sha256` values of three requests of one process run, in log
/// order: `sent.0`, `sent.0` again, then `sent.1`. `dictionary` is the operator's guesses; the
/// caller builds it from what the records show in clear (`op`, `resources`) and varies what only
/// the digest covers. Asserts that
/// * the dictionary holds both bodies that were sent (so a plain digest would have matched);
/// * no guess, hashed with plain SHA-256, equals any recorded digest;
/// * the digest is keyed per run, not fresh per request: the two equal bodies recorded equal
///   digests, the other body another one.
///
/// # Panics
/// When any of these does not hold (this is an assertion helper for tests).
#[track_caller]
pub fn assert_digests_keyed(recorded: &[String], sent: (&[u8], &[u8]), dictionary: &[Vec<u8>]) {
    use sha2::{Digest, Sha256};
    assert_eq!(
        recorded.len(),
        3,
        "three digests: a body, the same body, another body"
    );
    assert!(
        dictionary.iter().any(|g| g == sent.0) && dictionary.iter().any(|g| g == sent.1),
        "the dictionary holds the bodies that were sent"
    );
    for guess in dictionary {
        let plain = hex::encode(Sha256::digest(guess));
        assert!(
            !recorded.contains(&plain),
            "the log confirms the guess {}",
            String::from_utf8_lossy(guess)
        );
    }
    assert_eq!(
        recorded[0], recorded[1],
        "equal bodies, one process: equal digests"
    );
    assert_ne!(recorded[0], recorded[2], "another body, another digest");
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

    #[test]
    fn the_dictionary_check_refuses_plain_and_per_request_digests() {
        use sha2::{Digest, Sha256};
        let (a, b) = (b"a".to_vec(), b"b".to_vec());
        let dictionary = vec![a.clone(), b.clone(), b"c".to_vec()];
        let keyed = |k: &[u8]| hex::encode(Sha256::digest([b"key:".as_slice(), k].concat()));
        // Keyed the same way for the whole run: passes.
        super::assert_digests_keyed(&[keyed(&a), keyed(&a), keyed(&b)], (&a, &b), &dictionary);
        // Plain SHA-256: the dictionary confirms a body.
        let plain = |k: &[u8]| hex::encode(Sha256::digest(k));
        let r = [plain(&a), plain(&a), plain(&b)];
        assert!(std::panic::catch_unwind(|| {
            super::assert_digests_keyed(&r, (&a, &b), &dictionary)
        })
        .is_err());
        // A fresh digest per request (equal bodies, different digests), or a dictionary that
        // lacks a sent body: refused too.
        let r = [keyed(&a), keyed(b"x"), keyed(&b)];
        assert!(std::panic::catch_unwind(|| {
            super::assert_digests_keyed(&r, (&a, &b), &dictionary)
        })
        .is_err());
        let r = [keyed(&a), keyed(&a), keyed(&b)];
        assert!(std::panic::catch_unwind(|| {
            super::assert_digests_keyed(&r, (&a, &b), &dictionary[..1])
        })
        .is_err());
    }
}
