//! Issue 12, item 6, against the real controller: a token grants only what it was issued for.
//! A token with trailing bytes, a token beyond this host's lifetime cap, and a token for every
//! host (`*`) from a group without the fleet right are refused and audited, even when signed by
//! the real token-service key (a token service running a looser policy, or a stolen key).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bulkhead_tokens::token::keypair_from_text;
use bulkhead_tokens::{MintRequest, Operation, Policy, TokenService};
use common::*;

/// What a misconfigured or compromised token service would sign: one-hour tokens, `*` for the
/// operators group.
const LOOSE: &str = r#"
version = 1
max_ttl = "1h"
[[group]]
name = "operators"
role = "operator"
members = ["operator"]
hosts = ["*"]
fleet = true
operations = ["DescribeHost", "GetHealth", "DrainHost"]
resources = ["host"]
"#;

/// A token service with this daemon's real signing key and `policy`.
fn signer(d: &Daemon, policy: &str) -> TokenService {
    let key = std::fs::read_to_string(d.state().token_key()).unwrap();
    TokenService::new(
        keypair_from_text(&key).unwrap(),
        Policy::parse(policy).unwrap(),
    )
}

fn mint_with(svc: &TokenService, d: &Daemon, host: &str, op: Operation, ttl: u64) -> String {
    let (identity, _) = d.state().ca().identity("operator").unwrap();
    svc.mint(&MintRequest {
        caller: identity,
        hosts: vec![host.to_string()],
        operations: vec![op],
        resources: None,
        ttl: Duration::from_secs(ttl),
    })
    .unwrap()
    .0
}

#[test]
fn token_with_trailing_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client("operator");
    let t = d.mint(
        "operator",
        HOST,
        &[Operation::DescribeHost],
        Duration::from_secs(60),
    );
    assert_eq!(
        c.request("GET", "/v1/host", Some(&t), b"").unwrap().status,
        200
    );
    // The token's bytes followed by a copy of themselves, as one base64 string: protobuf merges
    // the two messages into a token that verifies unless trailing bytes are refused.
    use base64::Engine as _;
    let eng = base64::engine::general_purpose::URL_SAFE;
    let mut raw = eng.decode(&t).unwrap();
    raw.extend_from_slice(&raw.clone());
    for bad in [eng.encode(&raw), format!("{t}{t}"), format!("{t}AAAA")] {
        let r = c.request("GET", "/v1/host", Some(&bad), b"").unwrap();
        assert_eq!(r.status, 401);
        assert_denied_and_audited(&d, &r, "token_invalid");
    }
}

#[test]
fn token_beyond_the_lifetime_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client("operator");
    let loose = signer(&d, LOOSE);
    // Within the reviewed policy's 15-minute cap: served.
    let ok = mint_with(&loose, &d, HOST, Operation::DescribeHost, 15 * 60);
    assert_eq!(
        c.request("GET", "/v1/host", Some(&ok), b"").unwrap().status,
        200
    );
    // Signed by the real key, bound to the caller's certificate, not expired: but it lives an
    // hour, beyond what this host's policy lets the operators group hold.
    for ttl in [15 * 60 + 1, 3600] {
        let long = mint_with(&loose, &d, HOST, Operation::DescribeHost, ttl);
        let r = c.request("GET", "/v1/host", Some(&long), b"").unwrap();
        assert_eq!(r.status, 403);
        assert_denied_and_audited(&d, &r, "token_lifetime_too_long");
    }
    // And the token service's own policy would not have minted it.
    let real = d.state().token_service().unwrap();
    let (identity, _) = d.state().ca().identity("operator").unwrap();
    let e = real
        .mint(&MintRequest {
            caller: identity,
            hosts: vec![HOST.into()],
            operations: vec![Operation::DescribeHost],
            resources: None,
            ttl: Duration::from_secs(3600),
        })
        .unwrap_err();
    assert_eq!(e.code(), "mint_ttl_too_long");
}

#[test]
fn fleet_wide_token_needs_the_fleet_right() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client("operator");
    let loose = signer(&d, LOOSE);
    // The operators group here may name any one host, but not every host.
    let everywhere = mint_with(&loose, &d, "*", Operation::DescribeHost, 60);
    let r = c
        .request("GET", "/v1/host", Some(&everywhere), b"")
        .unwrap();
    assert_eq!(r.status, 403);
    assert_denied_and_audited(&d, &r, "token_fleet_not_granted");
    // Scoped to this host, the same grant is served.
    let scoped = mint_with(&loose, &d, HOST, Operation::DescribeHost, 60);
    assert_eq!(
        c.request("GET", "/v1/host", Some(&scoped), b"")
            .unwrap()
            .status,
        200
    );
    // The real token service refuses `*` for the operators' ordinary rights ...
    let real = d.state().token_service().unwrap();
    let (identity, _) = d.state().ca().identity("operator").unwrap();
    let e = real
        .mint(&MintRequest {
            caller: identity.clone(),
            hosts: vec!["*".into()],
            operations: vec![Operation::DescribeHost],
            resources: None,
            ttl: Duration::from_secs(60),
        })
        .unwrap_err();
    assert_eq!(e.code(), "mint_fleet_not_granted");
    // ... and mints it only through the named fleet group, which the controller accepts.
    let (fleet, claims) = real
        .mint(&MintRequest {
            caller: identity,
            hosts: vec!["*".into()],
            operations: vec![Operation::DrainHost],
            resources: None,
            ttl: Duration::from_secs(60),
        })
        .unwrap();
    assert_eq!(claims.group, "fleet-deploy");
    let r = c
        .request("POST", "/v1/host/drain", Some(&fleet), b"{}")
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
