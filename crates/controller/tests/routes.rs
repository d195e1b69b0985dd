//! The route table is the router (every request goes through `ApiRequest::parse` over
//! `ROUTES`). These tests enumerate it against the reviewed allow-list and check the checked-in
//! OpenAPI document has not drifted from the code.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bulkhead_controller::api::{ApiRequest, ROUTES};
use bulkhead_controller::openapi;

/// The reviewed allow-list. Adding a route means editing this list in the same review.
const ALLOWED: &[(&str, &str, &str)] = &[
    ("GET", "/v1/host", "DescribeHost"),
    ("GET", "/v1/health", "GetHealth"),
    ("GET", "/v1/metrics", "GetMetrics"),
    ("GET", "/v1/audit", "ReadAudit"),
    ("GET", "/v1/alerts", "ListAlerts"),
    ("POST", "/v1/host/drain", "DrainHost"),
    ("POST", "/v1/host/attest", "AttestHost"),
    ("PUT", "/v1/host/artefacts/{id}", "UploadArtefact"),
    ("POST", "/v1/host/releases", "DeployRelease"),
    ("POST", "/v1/instances", "CreateInstance"),
    ("GET", "/v1/instances/{id}", "DescribeInstance"),
    ("POST", "/v1/instances/{id}/start", "StartInstance"),
    ("POST", "/v1/instances/{id}/stop", "StopInstance"),
    ("POST", "/v1/instances/{id}/reboot", "RebootInstance"),
    ("POST", "/v1/instances/{id}/terminate", "TerminateInstance"),
    ("POST", "/v1/instances/{id}/volumes", "AttachVolume"),
    (
        "DELETE",
        "/v1/instances/{id}/volumes/{volume_id}",
        "DetachVolume",
    ),
    ("GET", "/v1/instances/{id}/console", "GetConsole"),
    ("POST", "/v1/instances/{id}/network", "AttachNetwork"),
    (
        "PUT",
        "/v1/instances/{id}/network/routes",
        "SetNetworkRoutes",
    ),
    ("PUT", "/v1/instances/{id}/network/rules", "SetNetworkRules"),
];

/// The VPC interface routes carry customer configuration and a customer's sealed key: they
/// belong to the customer plane (an operator-role caller can never hold them).
#[test]
fn network_routes_are_customer_plane() {
    for r in ROUTES {
        if r.path.contains("/network") {
            assert_eq!(r.op.plane(), bulkhead_tokens::Plane::Customer, "{}", r.path);
            assert!(!bulkhead_tokens::Role::Operator.may_use(r.op.plane()));
        }
    }
}

/// Installing software on the host is the deployer's alone: no operator, control plane or
/// customer can hold the release routes.
#[test]
fn release_routes_are_the_deployers_alone() {
    use bulkhead_tokens::Role;
    for r in ROUTES {
        if r.path.starts_with("/v1/host/releases") || r.path.starts_with("/v1/host/artefacts") {
            assert!(r.op.deployer_only(), "{}", r.path);
            assert!(Role::Deployer.may_hold(r.op));
            for role in [
                Role::Operator,
                Role::ControlPlane,
                Role::Customer,
                Role::Host,
            ] {
                assert!(!role.may_hold(r.op), "{role} {}", r.path);
            }
        }
    }
}

/// Words no route may contain: no command execution, shells, memory or disk access, copying
/// volumes away, lowering encryption, or turning off logging.
const FORBIDDEN: &[&str] = &[
    "exec",
    "shell",
    "ssh",
    "cmd",
    "command",
    "run",
    "memory",
    "mem",
    "dump",
    "debug",
    "disk",
    "read",
    "write",
    "copy",
    "migrate",
    "export",
    "snapshot",
    "key",
    "encrypt",
    "decrypt",
    "plaintext",
    "log-level",
    "disable",
    "login",
    "sudo",
    "root",
    "eval",
    "script",
    "upload",
];

#[test]
fn router_serves_exactly_the_allow_list() {
    let served: BTreeSet<(String, String, String)> = ROUTES
        .iter()
        .map(|r| {
            (
                r.method.as_str().to_string(),
                r.path.to_string(),
                r.op.name().to_string(),
            )
        })
        .collect();
    let allowed: BTreeSet<(String, String, String)> = ALLOWED
        .iter()
        .map(|(m, p, o)| (m.to_string(), p.to_string(), o.to_string()))
        .collect();
    assert_eq!(
        served, allowed,
        "route table differs from the reviewed allow-list"
    );
    assert_eq!(ROUTES.len(), ALLOWED.len(), "duplicate routes");
    // Every operation has exactly one route.
    let ops: BTreeSet<_> = ROUTES.iter().map(|r| r.op).collect();
    assert_eq!(ops.len(), bulkhead_tokens::Operation::ALL.len());
}

#[test]
fn no_route_names_a_forbidden_capability() {
    for r in ROUTES {
        for seg in r.path.split('/') {
            let seg = seg.to_ascii_lowercase();
            for f in FORBIDDEN {
                assert!(
                    !seg.contains(f) || seg.starts_with('{'),
                    "route {} has forbidden segment {seg:?}",
                    r.path
                );
            }
        }
    }
}

#[test]
fn anything_outside_the_table_is_no_such_route() {
    for p in [
        "/v1/exec",
        "/v1/shell",
        "/v1/memory",
        "/v1/instances/i-1/memory",
        "/v1/instances/i-1/disk",
        "/v1/host/",
        "/v1//host",
        "/V1/host",
        "/v1/host/../exec",
        "/v2/host",
    ] {
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let e = ApiRequest::parse(m, p, None, b"").unwrap_err();
            assert_eq!(e.code(), "no_such_route", "{m} {p}");
        }
    }
}

#[test]
fn openapi_document_matches_the_checked_in_copy() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/controller.json");
    let generated = openapi::document_json();
    if std::env::var_os("BULKHEAD_BLESS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/controller.json is stale; regenerate with \
         `BULKHEAD_BLESS=1 cargo test --release -p bulkhead-controller --test routes` \
         (or `bulkhead-controller --print-openapi > openapi/controller.json`) and review the diff"
    );
    // And it lists exactly the routes of the table.
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let mut n = 0;
    for (p, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            assert!(ALLOWED
                .iter()
                .any(|(am, ap, _)| am.eq_ignore_ascii_case(m) && ap == p));
            n += 1;
        }
    }
    assert_eq!(n, ALLOWED.len());
}
