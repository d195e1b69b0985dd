//! Token verification on arbitrary bearer strings: decode + full authorization against a fixed
//! request; must never panic, and must never accept (the fuzzer cannot forge an Ed25519
//! signature under this fixed key).
#![no_main]

use std::sync::OnceLock;

use biscuit_auth::{KeyPair, PrivateKey};
use bulkhead_tokens::token::RequestContext;
use bulkhead_tokens::{Identity, Operation, RevocationList, Role, Verifier};
use libfuzzer_sys::fuzz_target;

const KEY_HEX: &str = "0a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let sk = PrivateKey::from_bytes_hex(KEY_HEX, biscuit_auth::builder::Algorithm::Ed25519)
            .expect("fixed key");
        Verifier::new(KeyPair::from(&sk).public())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let peer = Identity {
        name: "operator".into(),
        role: Role::Operator,
        cert_sha256: "00".repeat(32),
    };
    let ctx = RequestContext {
        host: "host-1",
        peer: &peer,
        operation: Operation::DescribeHost,
        resources: &["host".to_string()],
        now: 1_800_000_000,
    };
    let r = verifier().authorize(token, &RevocationList::default(), &ctx);
    assert!(r.is_err(), "fuzzer produced an accepted token");
});
