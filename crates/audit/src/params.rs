//! Keyed digests of request parameters: what an audit record's `params_sha256` holds when a
//! service digests the bytes a caller sent.
//!
//! Operators read audit logs; they must not learn customer content from them (claim 6). What a
//! record shows in clear is chosen by the service that writes it: the operation (`op`, e.g.
//! `Mint:DrainHost`, `CreateVolume`) and the resources it names (`resources`, e.g. `host:host-3`,
//! `volume:vol-7`) are plain text, readable by anyone who reads the log. The digest covers the
//! whole body, but what it alone stands for is the rest of the body: for a mint, the TTL and any
//! resource patterns; for a storage request, a volume's size, a snapshot source, a grant's
//! generation; any free text. A plain SHA-256 of such a body is no secret when those fields are
//! low-entropy: whoever reads the record takes the clear fields from it, hashes guesses of the
//! rest until one matches. So a service digests a body with HMAC-SHA256 under a [`ParamsKey`]
//! instead. Without the key, the digest confirms no guess of the hidden fields; with it, equal
//! bodies still give equal digests, so a reader can tell that two requests of one process
//! carried the same parameters (a replay, a retry) without learning the hidden ones.
//!
//! Where the key comes from: each process draws 32 random bytes when it starts
//! ([`ParamsKey::generate`]) and keeps them in memory only (the drawn bytes are zeroed once the
//! HMAC key is made from them). The key is never written to the log,
//! to a file or to a log line, and no API hands it out; [`ParamsKey`]'s `Debug` prints only that
//! it is a key. Nothing re-checks a digest against a body after the fact (the control plane's
//! fleet check and `bulkhead audit verify` read the field as an opaque string), so a key that
//! lives as long as the process is enough. What follows from that, and what a reader may rely on:
//! * within one process run, equal bodies give equal digests and different bodies different
//!   ones (up to HMAC-SHA256 collisions);
//! * across a restart, equal bodies give different digests: records of two runs cannot be joined
//!   on this field;
//! * nobody, operator or service owner, can later prove which body a record digested.
//!
//! The JSON field keeps its name (`params_sha256`, 64 hex digits) so older logs, the fleet check
//! and every existing reader parse records unchanged; its meaning is "keyed" wherever a service
//! digests caller bytes. Records written before this change carry plain SHA-256 digests.

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

/// Length of a [`ParamsKey`] in bytes.
pub const PARAMS_KEY_BYTES: usize = 32;

/// The key a service digests request parameters with. Lives in memory for one process run.
pub struct ParamsKey {
    key: hmac::Key,
}

/// Why a [`ParamsKey`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsKeyError {
    #[error("the system random number generator failed")]
    Random,
}

impl std::fmt::Debug for ParamsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParamsKey(..)")
    }
}

impl ParamsKey {
    /// A fresh key of [`PARAMS_KEY_BYTES`] random bytes from the system's generator.
    pub fn generate() -> Result<ParamsKey, ParamsKeyError> {
        // Zeroed when dropped, on the error path too; the struct keeps only aws-lc's key.
        let mut bytes = Zeroizing::new([0u8; PARAMS_KEY_BYTES]);
        aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| ParamsKeyError::Random)?;
        Ok(ParamsKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref()),
        })
    }

    /// HMAC-SHA256 of `params` under this key, lower-case hex (64 digits): the value of an
    /// audit record's `params_sha256`.
    pub fn digest(&self, params: &[u8]) -> String {
        hex::encode(hmac::sign(&self.key, params).as_ref())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_digest_is_keyed_stable_per_key_and_not_plain_sha256() {
        let k = ParamsKey::generate().unwrap();
        let other = ParamsKey::generate().unwrap();
        let body = br#"{"volume_id":"vol-1","size_bytes":1048576}"#;
        let d = k.digest(body);
        assert_eq!(d.len(), 64);
        assert!(d
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        // Equal bodies, one key: equal digests; another body: another digest.
        assert_eq!(k.digest(body), d);
        assert_ne!(
            k.digest(br#"{"volume_id":"vol-2","size_bytes":1048576}"#),
            d
        );
        // Not the plain digest an operator could recompute, and not the same under another key.
        assert_ne!(d, hex::encode(Sha256::digest(body)));
        assert_ne!(other.digest(body), d);
    }

    #[test]
    fn the_digest_is_hmac_sha256_of_the_key() {
        // The construction itself, checked against the RFC 4231 test case 2 vector through the
        // same code path a generated key takes.
        let k = ParamsKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"),
        };
        assert_eq!(
            k.digest(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn debug_shows_no_key_material() {
        let k = ParamsKey::generate().unwrap();
        assert_eq!(format!("{k:?}"), "ParamsKey(..)");
    }
}
