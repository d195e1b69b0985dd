//! The token service's request parser and the policy decision behind it, on arbitrary bodies:
//! never a panic, and — the claim that matters — whatever the body says, an operator is never
//! minted a customer-plane operation, and a token never names hosts or operations beyond the
//! request.
//! Input layout: byte 0 picks the caller's role; the rest is the body.
#![no_main]

use std::sync::OnceLock;

use bulkhead_tokens::policy::DEFAULT_RIGHTS_TOML;
use bulkhead_tokens::wire::parse_mint;
use bulkhead_tokens::{Identity, Plane, Policy, Role, TokenService};
use libfuzzer_sys::fuzz_target;

fn service() -> &'static TokenService {
    static S: OnceLock<TokenService> = OnceLock::new();
    S.get_or_init(|| {
        TokenService::new(
            biscuit_auth::KeyPair::new(),
            Policy::parse(DEFAULT_RIGHTS_TOML).expect("reviewed policy parses"),
        )
    })
}

const CALLERS: [(&str, Role); 4] = [
    ("operator", Role::Operator),
    ("control-plane", Role::ControlPlane),
    ("customer", Role::Customer),
    ("host-1", Role::Host),
];

fuzz_target!(|data: &[u8]| {
    let Some((&who, body)) = data.split_first() else {
        return;
    };
    let (name, role) = CALLERS[usize::from(who) % CALLERS.len()];
    let caller = Identity {
        name: name.into(),
        role,
        cert_sha256: "00".repeat(32),
    };
    let Ok(req) = parse_mint(&caller, body) else {
        return;
    };
    let Ok((_token, claims)) = service().mint(&req) else {
        return;
    };
    if role == Role::Operator {
        assert!(
            claims.operations.iter().all(|o| o.plane() == Plane::Operator),
            "operator minted a customer-plane operation: {claims:?}"
        );
    }
    assert!(claims.operations.iter().all(|o| req.operations.contains(o)));
    assert!(claims.audience.iter().all(|h| req.hosts.contains(h)));
});
