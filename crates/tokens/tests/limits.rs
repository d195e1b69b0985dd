//! Issue 12, item 6: tokens grant only what they were issued for.
//!
//! - a token followed by any bytes (a copy of itself, one more character) is refused;
//! - the token service refuses a lifetime above the granting group's cap, and a controller's
//!   policy check refuses such a token even when a (compromised or misconfigured) token service
//!   signed it;
//! - audience `*` needs the separately named fleet right, at mint and at the controller.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use biscuit_auth::KeyPair;
use bulkhead_tokens::policy::DEFAULT_RIGHTS_TOML;
use bulkhead_tokens::token::RequestContext;
use bulkhead_tokens::{
    Identity, MintError, MintRequest, Operation, Policy, RevocationList, Role, TokenError,
    TokenService, Verifier,
};

fn operator() -> Identity {
    Identity {
        name: "operator".into(),
        role: Role::Operator,
        cert_sha256: "ab".repeat(32),
    }
}

fn req(caller: Identity, hosts: &[&str], ops: &[Operation], ttl: u64) -> MintRequest {
    MintRequest {
        caller,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        operations: ops.to_vec(),
        resources: None,
        ttl: Duration::from_secs(ttl),
    }
}

/// A policy as loose as the one before issue 12: one-hour tokens, `*` for everyone.
const LOOSE: &str = r#"
version = 1
max_ttl = "1h"
[[group]]
name = "operators"
role = "operator"
members = ["operator"]
hosts = ["*"]
fleet = true
operations = ["DescribeHost", "DrainHost"]
resources = ["host"]
"#;

fn authorize(v: &Verifier, token: &str, host: &str) -> Result<(), TokenError> {
    let peer = operator();
    let res = ["host".to_string()];
    v.authorize(
        token,
        &RevocationList::default(),
        &RequestContext {
            host,
            peer: &peer,
            operation: Operation::DescribeHost,
            resources: &res,
            now: bulkhead_tokens::clock::unix_now(),
        },
    )
    .map(|_| ())
    .map_err(|(e, _)| e)
}

#[test]
fn trailing_bytes_are_refused() {
    let svc = TokenService::new(KeyPair::new(), Policy::parse(DEFAULT_RIGHTS_TOML).unwrap());
    let v = Verifier::new(svc.public_key());
    let (t, _) = svc
        .mint(&req(
            operator(),
            &["host-1"],
            &[Operation::DescribeHost],
            60,
        ))
        .unwrap();
    assert!(authorize(&v, &t, "host-1").is_ok());
    // The token followed by a copy of itself: base64 of two concatenated protobuf messages,
    // which a protobuf decoder merges.
    let doubled = format!("{t}{t}");
    assert_eq!(authorize(&v, &doubled, "host-1"), Err(TokenError::Invalid));
    assert_eq!(v.decode(&doubled).unwrap_err(), TokenError::Invalid);
    // Its decoded bytes followed by a copy, re-encoded as one base64 string.
    use base64::Engine as _;
    let eng = base64::engine::general_purpose::URL_SAFE;
    let mut raw = eng.decode(&t).unwrap();
    raw.extend_from_slice(&raw.clone());
    let merged = eng.encode(&raw);
    assert_eq!(authorize(&v, &merged, "host-1"), Err(TokenError::Invalid));
    // Any trailing bytes at all.
    for tail in ["A", "AA", "AAAA", "=", "\n", " "] {
        let padded = format!("{t}{tail}");
        assert_eq!(
            authorize(&v, &padded, "host-1"),
            Err(TokenError::Invalid),
            "tail {tail:?}"
        );
    }
    let mut raw = eng.decode(&t).unwrap();
    raw.push(0);
    assert_eq!(
        authorize(&v, &eng.encode(&raw), "host-1"),
        Err(TokenError::Invalid)
    );
}

#[test]
fn lifetime_is_capped_per_group_at_mint_and_at_the_controller() {
    let policy = Policy::parse(DEFAULT_RIGHTS_TOML).unwrap();
    let op_group = policy.groups_of("operator").next().unwrap().clone();
    assert!(op_group.max_ttl <= Duration::from_secs(15 * 60));
    let cp = policy
        .groups
        .iter()
        .find(|g| g.name == "control-plane")
        .unwrap();
    assert!(cp.max_ttl <= Duration::from_secs(5 * 60));

    let svc = TokenService::new(KeyPair::new(), policy.clone());
    let over = op_group.max_ttl.as_secs() + 1;
    assert_eq!(
        svc.mint(&req(
            operator(),
            &["host-1"],
            &[Operation::DescribeHost],
            over
        ))
        .unwrap_err(),
        MintError::TtlTooLong
    );
    let cp_id = Identity {
        name: "control-plane".into(),
        role: Role::ControlPlane,
        cert_sha256: "cd".repeat(32),
    };
    assert_eq!(
        svc.mint(&req(
            cp_id.clone(),
            &["host-1"],
            &[Operation::GetHealth],
            600
        ))
        .unwrap_err(),
        MintError::TtlTooLong
    );
    let (_, ok) = svc
        .mint(&req(
            cp_id.clone(),
            &["host-1"],
            &[Operation::GetHealth],
            60,
        ))
        .unwrap();
    assert_eq!(policy.admits_token(&cp_id, &ok), Ok(()));

    // A token service with a looser policy (or a stolen signing key) mints one-hour tokens; the
    // controller's own copy of the reviewed policy refuses them.
    let loose = TokenService::new(KeyPair::new(), Policy::parse(LOOSE).unwrap());
    let v = Verifier::new(loose.public_key());
    let (t, claims) = loose
        .mint(&req(
            operator(),
            &["host-1"],
            &[Operation::DescribeHost],
            3600,
        ))
        .unwrap();
    assert!(authorize(&v, &t, "host-1").is_ok(), "the signature is fine");
    assert_eq!(
        policy.admits_token(&operator(), &claims),
        Err(TokenError::LifetimeTooLong)
    );
    let (_, short) = loose
        .mint(&req(
            operator(),
            &["host-1"],
            &[Operation::DescribeHost],
            60,
        ))
        .unwrap();
    assert_eq!(policy.admits_token(&operator(), &short), Ok(()));
}

#[test]
fn every_host_needs_the_fleet_right() {
    let policy = Policy::parse(DEFAULT_RIGHTS_TOML).unwrap();
    let svc = TokenService::new(KeyPair::new(), policy.clone());
    // The operators group may name any one host, not every host.
    assert_eq!(
        svc.mint(&req(operator(), &["*"], &[Operation::DescribeHost], 60))
            .unwrap_err(),
        MintError::FleetNotGranted
    );
    assert_eq!(
        svc.mint(&req(
            operator(),
            &["host-1", "*"],
            &[Operation::DescribeHost],
            60
        ))
        .unwrap_err(),
        MintError::FleetNotGranted
    );
    let customer = Identity {
        name: "customer".into(),
        role: Role::Customer,
        cert_sha256: "ef".repeat(32),
    };
    assert_eq!(
        svc.mint(&req(customer, &["*"], &[Operation::StartInstance], 60))
            .unwrap_err(),
        MintError::FleetNotGranted
    );
    // The one fleet-wide grant of the default policy is the named deploy group, for DrainHost.
    let (_, fleet) = svc
        .mint(&req(operator(), &["*"], &[Operation::DrainHost], 60))
        .unwrap();
    assert_eq!(fleet.group, "fleet-deploy");
    assert_eq!(policy.admits_token(&operator(), &fleet), Ok(()));
    let (_, scoped) = svc
        .mint(&req(
            operator(),
            &["host-1"],
            &[Operation::DescribeHost],
            60,
        ))
        .unwrap();
    assert_eq!(policy.admits_token(&operator(), &scoped), Ok(()));

    // A `*` token minted elsewhere under a group without the right is refused by the
    // controller's policy check: the group of that name here has no fleet right.
    let loose = TokenService::new(KeyPair::new(), Policy::parse(LOOSE).unwrap());
    let (_, everywhere) = loose
        .mint(&req(operator(), &["*"], &[Operation::DescribeHost], 60))
        .unwrap();
    assert_eq!(everywhere.group, "operators");
    assert_eq!(
        policy.admits_token(&operator(), &everywhere),
        Err(TokenError::FleetNotGranted)
    );
    // A group name this host's policy does not give the caller.
    let mut foreign = everywhere.clone();
    foreign.group = "admins".into();
    assert_eq!(
        policy.admits_token(&operator(), &foreign),
        Err(TokenError::GroupNotGranted)
    );
}

#[test]
fn policy_refuses_bad_fleet_and_ttl_settings() {
    let base = r#"
version = 1
max_ttl = "15m"
[[group]]
name = "ops"
role = "operator"
members = ["alice"]
hosts = ["*"]
operations = ["DescribeHost"]
resources = ["host"]
"#;
    let p = Policy::parse(base).unwrap();
    assert!(!p.groups[0].fleet);
    assert_eq!(p.groups[0].max_ttl, Duration::from_secs(900));
    let with = |extra: &str| base.replace("hosts = [\"*\"]", &format!("hosts = [\"*\"]\n{extra}"));
    assert_eq!(
        Policy::parse(&with("max_ttl = \"5m\"")).unwrap().groups[0].max_ttl,
        Duration::from_secs(300)
    );
    assert!(Policy::parse(&with("max_ttl = \"30m\"")).is_err());
    assert!(Policy::parse(&with("max_ttl = \"soon\"")).is_err());
    assert!(Policy::parse(&with("fleet = true")).unwrap().groups[0].fleet);
    assert!(Policy::parse(&with("fleet = \"yes\"")).is_err());
    let named = base.replace("hosts = [\"*\"]", "hosts = [\"host-1\"]\nfleet = true");
    assert!(Policy::parse(&named).is_err());
}
