//! Attacks on the real controller over real mTLS. Each test asserts the refusal (stable error
//! code) and the audit record of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bulkhead_controller::api::{BodyKind, ROUTES};
use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Operation;
use common::*;

const MIN5: Duration = Duration::from_secs(300);

fn sample(path: &str) -> String {
    if path.starts_with("/v1/host/artefacts/") {
        // An artefact's path names its SHA-256.
        return path.replace("{id}", &"ab".repeat(32));
    }
    path.replace("{id}", "i-1").replace("{volume_id}", "v-1")
}

fn sample_body(kind: BodyKind) -> &'static [u8] {
    match kind {
        BodyKind::None => b"",
        BodyKind::Drain => b"{}",
        BodyKind::Attest => {
            br#"{"nonce":"abababababababababababababababababababababababababababababababab"}"#
        }
        BodyKind::CreateInstance => {
            br#"{"instance_id":"i-1","image":"img-1","vcpus":1,"memory_mib":128}"#
        }
        BodyKind::AttachVolume => SAMPLE_ATTACH_VOLUME.as_bytes(),
        BodyKind::AttachNetwork => SAMPLE_ATTACH_NETWORK.as_bytes(),
        BodyKind::NetworkRoutes => br#"{"routes":["10.0.1.6=2@127.0.0.1:40001"]}"#,
        BodyKind::NetworkRules => br#"{"allow":["tcp:7000:10.0.0.0/16"]}"#,
        BodyKind::Artefact => b"artefact bytes",
        BodyKind::DeployRelease => br#"{"release":"{}"}"#,
    }
}

/// A well-formed AttachVolume body (a 126-byte sealed blob, base64: 168 characters).
const SAMPLE_ATTACH_VOLUME: &str = concat!(
    r#"{"volume_id":"v-1","sealed_key":""#,
    "c2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVk",
    "c2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVk",
    "c2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVkc2VhbGVk",
    r#""}"#
);

/// A well-formed AttachNetwork body (a 126-byte sealed blob, hex).
const SAMPLE_ATTACH_NETWORK: &str = concat!(
    r#"{"epoch":1,"sealed_epoch_key":""#,
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab",
    r#""}"#
);

fn tls_refusals(d: &Daemon, code: &str) -> usize {
    d.audit()
        .iter()
        .filter(|r| r["entry"]["op"] == "TlsHandshake" && r["entry"]["code"] == code)
        .count()
}

fn wait_for<F: Fn() -> bool>(f: F) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn no_client_certificate_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = Client::new(dir.path(), None, d.port);
    let r = c.request("GET", "/v1/host", None, b"");
    assert!(r.is_err(), "served without a client certificate: {r:?}");
    assert!(wait_for(|| tls_refusals(&d, "tls_no_client_cert") == 1));
}

#[test]
fn foreign_ca_certificate_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let evil = tempfile::tempdir().unwrap();
    let ca = CaDir::new(evil.path());
    ca.init().unwrap();
    ca.issue("operator", bulkhead_tokens::Role::Operator, false)
        .unwrap();
    // Trust the real CA for the server, but present a certificate from the foreign CA.
    let c = Client::new(dir.path(), Some((evil.path(), "operator")), d.port);
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    let r = c.request("GET", "/v1/host", Some(&t), b"");
    assert!(r.is_err(), "served a foreign-CA certificate: {r:?}");
    assert!(wait_for(|| tls_refusals(&d, "tls_bad_client_cert") == 1));
}

#[test]
fn every_operation_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    for who in ["operator", "customer", "control-plane"] {
        let c = d.client(who);
        for route in ROUTES {
            let path = sample(route.path);
            let r = c
                .request(route.method.as_str(), &path, None, sample_body(route.body))
                .unwrap();
            assert_eq!(r.status, 401, "{} {path}", route.method.as_str());
            assert_denied_and_audited(&d, &r, "token_missing");
        }
    }
}

#[test]
fn expired_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint(
        "operator",
        HOST,
        &[Operation::DescribeHost],
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_millis(2100));
    let r = d
        .client("operator")
        .request("GET", "/v1/host", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 401);
    assert_denied_and_audited(&d, &r, "token_expired");
}

#[test]
fn token_for_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", "host-2", &[Operation::DescribeHost], MIN5);
    let r = d
        .client("operator")
        .request("GET", "/v1/host", Some(&t), b"")
        .unwrap();
    assert_denied_and_audited(&d, &r, "token_wrong_host");
}

#[test]
fn token_for_one_operation_cannot_do_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", HOST, &[Operation::GetHealth], MIN5);
    let c = d.client("operator");
    assert_eq!(
        c.request("GET", "/v1/health", Some(&t), b"")
            .unwrap()
            .status,
        200
    );
    let r = c.request("GET", "/v1/host", Some(&t), b"").unwrap();
    assert_eq!(r.status, 403);
    assert_denied_and_audited(&d, &r, "token_operation_not_granted");
    let r = c
        .request("POST", "/v1/host/drain", Some(&t), b"{}")
        .unwrap();
    assert_denied_and_audited(&d, &r, "token_operation_not_granted");
    // The host did not start draining.
    let t2 = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    let r = c.request("GET", "/v1/host", Some(&t2), b"").unwrap();
    assert_eq!(r.json["draining"], false);
}

#[test]
fn tampered_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    let c = d.client("operator");
    let mut seen = 0;
    for pos in [10, t.len() / 3, t.len() / 2, t.len() - 10] {
        let mut b = t.clone().into_bytes();
        b[pos] = if b[pos] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(b).unwrap();
        let r = c.request("GET", "/v1/host", Some(&bad), b"").unwrap();
        assert_eq!(r.status, 401);
        assert_denied_and_audited(&d, &r, "token_invalid");
        seen += 1;
    }
    // A token signed by another token service (a forged key) is invalid too.
    let other = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(other.path())
        .ensure_dev(HOST)
        .unwrap();
    for f in ["ca.pem", "ca.key", "operator.pem", "operator.key"] {
        std::fs::copy(dir.path().join(f), other.path().join(f)).unwrap();
    }
    let forged = mint(
        other.path(),
        "operator",
        HOST,
        &[Operation::DescribeHost],
        MIN5,
    );
    let r = c.request("GET", "/v1/host", Some(&forged), b"").unwrap();
    assert_denied_and_audited(&d, &r, "token_invalid");
    assert_eq!(seen, 4);
}

#[test]
fn stolen_token_with_another_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    // Another valid CA certificate (the control plane's) presenting the operator's token.
    let r = d
        .client("control-plane")
        .request("GET", "/v1/host", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 403);
    assert_denied_and_audited(&d, &r, "token_cert_mismatch");
    // Same name, rotated key: the old token is bound to the old certificate.
    CaDir::new(dir.path()).rotate("operator").unwrap();
    let r = d
        .client("operator")
        .request("GET", "/v1/host", Some(&t), b"")
        .unwrap();
    assert_denied_and_audited(&d, &r, "token_cert_mismatch");
}

#[test]
fn operator_token_on_customer_plane_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    // The token service refuses to mint it at all.
    let st = d.state();
    let (id, _) = st.ca().identity("operator").unwrap();
    let err = st
        .token_service()
        .unwrap()
        .mint(&bulkhead_tokens::MintRequest {
            caller: id,
            hosts: vec![HOST.into()],
            operations: vec![Operation::GetConsole],
            resources: None,
            ttl: MIN5,
        })
        .unwrap_err();
    assert_eq!(err.code(), "mint_plane_violation");
    // And an operator's valid token cannot reach any customer-plane operation.
    let t = d.mint(
        "operator",
        HOST,
        &[Operation::DescribeHost, Operation::DrainHost],
        MIN5,
    );
    let c = d.client("operator");
    for route in ROUTES
        .iter()
        .filter(|r| r.op.plane() == bulkhead_tokens::Plane::Customer)
    {
        let r = c
            .request(
                route.method.as_str(),
                &sample(route.path),
                Some(&t),
                sample_body(route.body),
            )
            .unwrap();
        assert_eq!(r.status, 403, "{}", route.path);
        assert_denied_and_audited(&d, &r, "plane_violation");
    }
    // The monitor raised an alert about calls outside the caller's grants.
    let ta = d.mint("operator", HOST, &[Operation::ListAlerts], MIN5);
    let r = c.request("GET", "/v1/alerts", Some(&ta), b"").unwrap();
    let alerts = r.json["alerts"].as_array().unwrap();
    assert!(alerts.iter().any(|a| a["rule"] == "call_outside_grants"));
    assert!(d.audit().iter().any(|r| r["entry"]["kind"] == "alert"));
}

/// Installing software is the deployer's alone: an operator's valid token, or a control
/// plane's, on the release routes is refused (`deployer_only`) and audited, and nothing is
/// stored.
#[test]
fn release_routes_refuse_every_role_but_the_deployer() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    for who in ["operator", "control-plane"] {
        let t = d.mint(who, HOST, &[Operation::DescribeHost], MIN5);
        let c = d.client(who);
        for route in ROUTES.iter().filter(|r| r.op.deployer_only()) {
            let r = c
                .request(
                    route.method.as_str(),
                    &sample(route.path),
                    Some(&t),
                    sample_body(route.body),
                )
                .unwrap();
            assert_eq!(r.status, 403, "{who} {}", route.path);
            assert_denied_and_audited(&d, &r, "deployer_only");
        }
    }
    assert!(!dir
        .path()
        .join("releases/artefacts")
        .join("ab".repeat(32))
        .exists());
}

#[test]
fn quota_exceeded_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint(
        "customer",
        HOST,
        &[
            Operation::CreateInstance,
            Operation::StartInstance,
            Operation::RebootInstance,
        ],
        MIN5,
    );
    let c = d.client("customer");
    let r = c
        .request(
            "POST",
            "/v1/instances",
            Some(&t),
            sample_body(BodyKind::CreateInstance),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(
        c.request("POST", "/v1/instances/i-1/start", Some(&t), b"")
            .unwrap()
            .status,
        200
    );
    for _ in 0..3 {
        let r = c
            .request("POST", "/v1/instances/i-1/reboot", Some(&t), b"")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = c
        .request("POST", "/v1/instances/i-1/reboot", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 429);
    assert_denied_and_audited(&d, &r, "quota_exceeded");
    // A restart does not reset the quota: it is rebuilt from the audit log.
    drop(d);
    let d = Daemon::start(dir.path());
    let r = d
        .client("customer")
        .request("POST", "/v1/instances/i-1/reboot", Some(&t), b"")
        .unwrap();
    assert_denied_and_audited(&d, &r, "quota_exceeded");
}

#[test]
fn revoked_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    let c = d.client("operator");
    assert_eq!(
        c.request("GET", "/v1/host", Some(&t), b"").unwrap().status,
        200
    );
    let (_, claims) = d.state().verifier().unwrap().decode(&t).unwrap();
    // Make sure the revocation file's mtime moves even on coarse-grained filesystems.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        dir.path().join("revoked.txt"),
        format!("{}\n", claims.token_id),
    )
    .unwrap();
    let r = c.request("GET", "/v1/host", Some(&t), b"").unwrap();
    assert_eq!(r.status, 401);
    assert_denied_and_audited(&d, &r, "token_revoked");
    assert_eq!(
        request_record(&d.audit(), &r.request_id)["entry"]["token_id"],
        claims.token_id.as_str()
    );
}

#[test]
fn bad_bodies_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint(
        "customer",
        HOST,
        &[Operation::CreateInstance, Operation::DescribeInstance],
        MIN5,
    );
    let c = d.client("customer");
    let big = vec![b' '; 64 * 1024];
    let cases: Vec<(&[u8], &str)> = vec![
        (b"{\"instance_id\":", "body_malformed"),
        (b"not json", "body_malformed"),
        (
            br#"{"instance_id":"i-1","image":"img","vcpus":1,"memory_mib":128,"privileged":true}"#,
            "body_unknown_field",
        ),
        (
            br#"{"instance_id":"i-1","image":"img","vcpus":"one","memory_mib":128}"#,
            "body_invalid",
        ),
        (br#"{"instance_id":"i-1"}"#, "body_invalid"),
        (b"{\"instance_id\":\"i-\xff\xfe\"}", "body_not_utf8"),
        (&big, "body_too_large"),
        (
            br#"{"instance_id":"../../etc","image":"img","vcpus":1,"memory_mib":128}"#,
            "bad_resource_id",
        ),
    ];
    for (body, code) in cases {
        let r = c.request("POST", "/v1/instances", Some(&t), body).unwrap();
        assert!(r.status == 400 || r.status == 413, "{code}: {}", r.status);
        assert_denied_and_audited(&d, &r, code);
    }
    let r = c
        .request("GET", "/v1/instances/i-1", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "no_such_instance");
    // An oversized or garbage token is refused too.
    let r = c
        .request("GET", "/v1/instances/i-1", Some(&"A".repeat(5000)), b"")
        .unwrap();
    assert_denied_and_audited(&d, &r, "token_too_large");
}

#[test]
fn forbidden_routes_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint("control-plane", HOST, &[Operation::DescribeHost], MIN5);
    let c = d.client("control-plane");
    for (m, p) in [
        ("POST", "/v1/exec"),
        ("POST", "/v1/shell"),
        ("GET", "/v1/memory"),
        ("GET", "/v1/instances/i-1/memory"),
        ("POST", "/v1/instances/i-1/exec"),
        ("GET", "/v1/volumes/v-1/read"),
        ("POST", "/v1/volumes/v-1/copy"),
        ("POST", "/v1/audit/disable"),
        ("GET", "/v1/debug"),
        ("GET", "/"),
        ("PUT", "/v1/host"),
    ] {
        let r = c.request(m, p, Some(&t), b"").unwrap();
        let code = if p == "/v1/host" {
            "method_not_allowed"
        } else {
            "no_such_route"
        };
        assert_denied_and_audited(&d, &r, code);
        let rec = request_record(&d.audit(), &r.request_id);
        assert_eq!(rec["entry"]["caller"], "control-plane");
    }
    assert!(d
        .audit()
        .iter()
        .any(|r| r["entry"]["kind"] == "alert" && r["entry"]["op"] == "forbidden_route_probe"));
}

#[test]
fn customer_data_path_works_and_the_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let t = d.mint(
        "customer",
        HOST,
        &[
            Operation::CreateInstance,
            Operation::StartInstance,
            Operation::AttachVolume,
            Operation::DetachVolume,
            Operation::GetConsole,
            Operation::TerminateInstance,
        ],
        MIN5,
    );
    let c = d.client("customer");
    let steps: Vec<(&str, &str, &[u8], u16)> = vec![
        (
            "POST",
            "/v1/instances",
            sample_body(BodyKind::CreateInstance),
            201,
        ),
        ("POST", "/v1/instances/i-1/start", b"", 200),
        (
            "POST",
            "/v1/instances/i-1/volumes",
            sample_body(BodyKind::AttachVolume),
            200,
        ),
        ("GET", "/v1/instances/i-1/console", b"", 200),
        ("DELETE", "/v1/instances/i-1/volumes/v-1", b"", 200),
        ("POST", "/v1/instances/i-1/terminate", b"", 200),
    ];
    for (m, p, b, want) in steps {
        let r = c.request(m, p, Some(&t), b).unwrap();
        assert_eq!(
            r.status,
            want,
            "{m} {p}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let rec = request_record(&d.audit(), &r.request_id);
        assert_eq!(rec["entry"]["decision"], "allow");
    }
    // Operator pulls the audit log from a cursor and metrics; the chain verifies.
    let to = d.mint(
        "operator",
        HOST,
        &[Operation::ReadAudit, Operation::GetMetrics],
        MIN5,
    );
    let o = d.client("operator");
    let r = o
        .request("GET", "/v1/audit?after=0&limit=5", Some(&to), b"")
        .unwrap();
    assert_eq!(r.json["records"].as_array().unwrap().len(), 5);
    assert_eq!(r.json["next_after"], 5);
    let r = o.request("GET", "/v1/metrics", Some(&to), b"").unwrap();
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("bulkhead_requests_total{operation=\"AttachVolume\",code=\"ok\"} 1"));
    drop(d);
    let head = bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    assert!(head.records >= 13);
}

#[test]
fn sandbox_blocks_outbound_connect_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let addr = target.local_addr().unwrap().to_string();
    let out = std::process::Command::new(controller_bin())
        .args(["--dev", "--state-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--sandbox-self-test", &addr])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "self-test failed: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["blocked"], true);
    // execve is trapped too: hypervisors and cards are started only by the launcher.
    assert_eq!(v["exec_blocked"], true);
    // Nothing reached the target.
    assert!(target.accept().is_err());
    let recs = audit_records(&dir.path().join("audit.log"));
    assert!(recs
        .iter()
        .any(|r| r["entry"]["kind"] == "alert" && r["entry"]["op"] == "outbound_connect_blocked"));
}

#[test]
fn production_mode_refuses_to_start_with_missing_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let st = bulkhead_tokens::statedir::StateDir::new(dir.path());
    st.ensure_dev(HOST).unwrap();
    let cfg = bulkhead_controller::config::Config::from_state_dir(&st, HOST, "127.0.0.1:0");
    let text = format!(
        "host_id = \"{}\"\nlisten = \"{}\"\nca_cert = {:?}\nhost_cert = {:?}\nhost_key = {:?}\n\
         token_public_key = {:?}\nrights = {:?}\nrevocations = {:?}\naudit_log = {:?}\n",
        cfg.host_id,
        cfg.listen,
        cfg.ca_cert,
        cfg.host_cert,
        cfg.host_key,
        cfg.token_public_key,
        cfg.rights,
        cfg.revocations,
        cfg.audit_log
    );
    let cfg_path = dir.path().join("controller.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    std::fs::remove_file(st.token_pub()).unwrap();
    let out = std::process::Command::new(controller_bin())
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    // No flags at all: refused too.
    let out = std::process::Command::new(controller_bin())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A token scoped to one instance cannot act on another instance of the same customer on the
/// same host: refused with `token_resource_not_granted` (a 403, never a 500), audited as a deny,
/// and the other instance is untouched.
#[test]
fn token_scoped_to_one_instance_is_refused_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client("customer");
    let broad = d.mint(
        "customer",
        HOST,
        &[Operation::CreateInstance, Operation::DescribeInstance],
        MIN5,
    );
    for id in ["i-a", "i-b"] {
        let body =
            format!(r#"{{"instance_id":"{id}","image":"img-1","vcpus":1,"memory_mib":128}}"#);
        let r = c
            .request("POST", "/v1/instances", Some(&broad), body.as_bytes())
            .unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let st = d.state();
    let (id, _) = st.ca().identity("customer").unwrap();
    let (scoped, _) = st
        .token_service()
        .unwrap()
        .mint(&bulkhead_tokens::MintRequest {
            caller: id,
            hosts: vec![HOST.into()],
            operations: vec![Operation::DescribeInstance, Operation::TerminateInstance],
            resources: Some(vec![bulkhead_tokens::ResourcePattern::parse(
                "instance:i-a",
            )
            .unwrap()]),
            ttl: MIN5,
        })
        .unwrap();
    // On its own instance the token works.
    let r = c
        .request("GET", "/v1/instances/i-a", Some(&scoped), b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // On the other instance: refused, both reading and acting.
    let r = c
        .request("GET", "/v1/instances/i-b", Some(&scoped), b"")
        .unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_denied_and_audited(&d, &r, "token_resource_not_granted");
    let r = c
        .request("POST", "/v1/instances/i-b/terminate", Some(&scoped), b"")
        .unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_denied_and_audited(&d, &r, "token_resource_not_granted");
    // Instance B is untouched.
    let r = c
        .request("GET", "/v1/instances/i-b", Some(&broad), b"")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(r.json["state"], "terminated", "{}", r.json);
}

/// The VPC interface routes: bad network input is refused with a typed code and creates
/// nothing; a token for one instance cannot plug or re-route another's interface; a sealed
/// epoch key is never digested into the audit log; an interface is attached once.
#[test]
fn network_requests_are_checked_scoped_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client("customer");
    let t = d.mint(
        "customer",
        HOST,
        &[
            Operation::CreateInstance,
            Operation::DescribeInstance,
            Operation::AttachNetwork,
            Operation::SetNetworkRoutes,
            Operation::SetNetworkRules,
        ],
        MIN5,
    );
    let create = |id: &str, net: &str| {
        let body = format!(
            r#"{{"instance_id":"{id}","image":"img-1","vcpus":1,"memory_mib":128,"network":{net}}}"#
        );
        c.request("POST", "/v1/instances", Some(&t), body.as_bytes())
            .unwrap()
    };
    let good = r#"{"vpc":7,"card_id":1,"mac":"02:00:00:00:01:05","ip":"10.0.1.5","prefix":24,"allow":["tcp:7000:10.0.0.0/16"],"routes":[]}"#;
    for (net, code) in [
        (good.replace("02:00", "03:00"), "bad_network_mac"),
        (good.replace("10.0.1.5", "10.0.1.255"), "bad_network_ip"),
        (good.replace("tcp:7000", "tcp:70000"), "bad_network_rule"),
        (
            good.replace(r#""routes":[]"#, r#""routes":["10.0.1.6=1@127.0.0.1:1"]"#),
            "bad_network_route",
        ),
        (good.replace(r#""vpc":7"#, r#""vpc":0"#), "bad_network_vpc"),
        (
            good.replace(r#""prefix":24"#, r#""prefix":24,"key":"00""#),
            "body_unknown_field",
        ),
    ] {
        let r = create("i-bad", &net);
        assert_eq!(
            r.status,
            400,
            "{code}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_denied_and_audited(&d, &r, code);
    }
    // Nothing was created by any of them.
    let r = c
        .request("GET", "/v1/instances/i-bad", Some(&t), b"")
        .unwrap();
    assert_eq!(r.code(), "no_such_instance");

    let r = create("i-a", good);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = c
        .request(
            "POST",
            "/v1/instances",
            Some(&t),
            br#"{"instance_id":"i-plain","image":"img-1","vcpus":1,"memory_mib":128}"#,
        )
        .unwrap();
    assert_eq!(r.status, 201);

    // Routes and rules before the card exists; an instance without an interface.
    let r = c
        .request(
            "PUT",
            "/v1/instances/i-a/network/routes",
            Some(&t),
            sample_body(BodyKind::NetworkRoutes),
        )
        .unwrap();
    assert_eq!(r.code(), "no_network");
    let r = c
        .request(
            "POST",
            "/v1/instances/i-plain/network",
            Some(&t),
            SAMPLE_ATTACH_NETWORK.as_bytes(),
        )
        .unwrap();
    assert_eq!((r.status, r.code()), (409, "no_network"));
    // A bad sealed key or epoch.
    for (body, code) in [
        (
            r#"{"epoch":1,"sealed_epoch_key":"abcd"}"#.to_string(),
            "bad_sealed_epoch_key",
        ),
        (
            SAMPLE_ATTACH_NETWORK.replace(r#""epoch":1"#, r#""epoch":0"#),
            "bad_network_epoch",
        ),
    ] {
        let r = c
            .request(
                "POST",
                "/v1/instances/i-a/network",
                Some(&t),
                body.as_bytes(),
            )
            .unwrap();
        assert_denied_and_audited(&d, &r, code);
    }

    // A token scoped to i-plain cannot touch i-a's interface.
    let st = d.state();
    let (id, _) = st.ca().identity("customer").unwrap();
    let (scoped, _) = st
        .token_service()
        .unwrap()
        .mint(&bulkhead_tokens::MintRequest {
            caller: id,
            hosts: vec![HOST.into()],
            operations: vec![
                Operation::AttachNetwork,
                Operation::SetNetworkRoutes,
                Operation::SetNetworkRules,
            ],
            resources: Some(vec![bulkhead_tokens::ResourcePattern::parse(
                "instance:i-plain",
            )
            .unwrap()]),
            ttl: MIN5,
        })
        .unwrap();
    for (m, p, body) in [
        (
            "POST",
            "/v1/instances/i-a/network",
            SAMPLE_ATTACH_NETWORK.as_bytes(),
        ),
        (
            "PUT",
            "/v1/instances/i-a/network/routes",
            sample_body(BodyKind::NetworkRoutes),
        ),
        (
            "PUT",
            "/v1/instances/i-a/network/rules",
            sample_body(BodyKind::NetworkRules),
        ),
    ] {
        let r = c.request(m, p, Some(&scoped), body).unwrap();
        assert_eq!(r.status, 403, "{p}");
        assert_denied_and_audited(&d, &r, "token_resource_not_granted");
    }

    // The owner's attach works (the detached backend runs no card: endpoint 0.0.0.0:0), once.
    let r = c
        .request(
            "POST",
            "/v1/instances/i-a/network",
            Some(&t),
            SAMPLE_ATTACH_NETWORK.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json["net_endpoint"].as_str().is_some());
    let r = c
        .request("GET", "/v1/instances/i-a", Some(&t), b"")
        .unwrap();
    assert!(r.json["net_endpoint"].as_str().is_some(), "{}", r.json);
    let r = c
        .request(
            "POST",
            "/v1/instances/i-a/network",
            Some(&t),
            SAMPLE_ATTACH_NETWORK.as_bytes(),
        )
        .unwrap();
    assert_eq!((r.status, r.code()), (409, "network_attached"));
    for (p, kind) in [
        ("/v1/instances/i-a/network/routes", BodyKind::NetworkRoutes),
        ("/v1/instances/i-a/network/rules", BodyKind::NetworkRules),
    ] {
        let r = c.request("PUT", p, Some(&t), sample_body(kind)).unwrap();
        assert_eq!(r.status, 200, "{p}: {}", String::from_utf8_lossy(&r.body));
    }

    // Every one of these is audited; the customer-plane bodies (sealed key, addresses,
    // rules) leave no digest or trace in the log.
    let audit = d.audit();
    for op in ["AttachNetwork", "SetNetworkRoutes", "SetNetworkRules"] {
        assert!(
            audit
                .iter()
                .any(|r| r["entry"]["op"] == op && r["entry"]["decision"] == "allow"),
            "{op}"
        );
        assert!(audit
            .iter()
            .filter(|r| r["entry"]["op"] == op)
            .all(|r| r["entry"]["params_sha256"].is_null()));
    }
    let raw = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
    for needle in [
        "0123456789abcdef",
        "10.0.1.5",
        "tcp:7000",
        "02:00:00:00:01:05",
    ] {
        assert!(!raw.contains(needle), "{needle} in the audit log");
    }
}
