//! Issue 12 item 3 against the real daemons of a cluster (`bulkhead-token-service`,
//! `bulkhead-kms`, `bulkhead-control`'s customer and operator listeners): every request they
//! refuse before their audited pipelines leaves a record in that daemon's own audit log —
//! wrong routes and oversized bodies at the token service, non-UTF-8 and oversized bodies at the
//! customer API, an unknown route at the KMS, refused TLS handshakes and malformed HTTP at
//! each — and no record holds the refused body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_devcluster::cluster::{self, Cluster, StartOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bins() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bulkhead-control"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn up(dir: &Path) -> Cluster {
    let b = bins();
    let help = std::process::Command::new(b.join("bulkhead-controller"))
        .arg("--help")
        .output()
        .unwrap();
    let controller_args = if String::from_utf8_lossy(&help.stdout).contains("--backend") {
        vec!["--backend".into(), "detached".into()]
    } else {
        Vec::new()
    };
    cluster::start(
        dir,
        &StartOptions {
            hosts: 1,
            controller_args,
            bins: b,
            record: false,
            poll_interval_ms: 500,
            database_url: None,
            // These tests attack the services' listeners; attestation and namespaces are
            // covered by the cluster tests.
            attest: Some(false),
            netns: Some(false),
        },
    )
    .unwrap()
}

fn tls(ca: &Path, name: Option<&str>) -> Arc<rustls::ClientConfig> {
    tls_from(ca, ca, name)
}

/// Trusts `ca`'s CA; presents `name`'s certificate from `certs` (possibly another CA's).
fn tls_from(ca: &Path, certs: &Path, name: Option<&str>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca.join("ca.pem")).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match name {
        None => b.with_no_client_auth(),
        Some(n) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(certs.join(format!("{n}.pem"))).unwrap()],
                PrivateKeyDer::from_pem_file(certs.join(format!("{n}.key"))).unwrap(),
            )
            .unwrap(),
    })
}

/// Writes `bytes` raw over TLS to `addr` and returns what comes back until the server closes.
fn raw(cfg: &Arc<rustls::ClientConfig>, addr: &str, bytes: &[u8]) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            return Vec::new();
        };
        let Ok(mut s) = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
        else {
            return Vec::new();
        };
        let _ = s.write_all(bytes).await;
        let _ = s.flush().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        out
    })
}

fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn status(resp: &[u8]) -> u16 {
    String::from_utf8_lossy(resp)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn entries(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("entry").cloned())
        .collect()
}

/// Waits (up to 10 s) for a deny record in `log` with `op`, `code` and (if given) the route.
fn wait_refusal(log: &Path, what: &str, op: &str, code: &str, route: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = entries(log).into_iter().find(|e| {
            e["kind"] == "request"
                && e["decision"] == "deny"
                && e["op"] == op
                && e["code"] == code
                && route.is_none_or(|r| {
                    e["resources"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == &format!("route:{r}")))
                })
        });
        if let Some(e) = found {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no {op}/{code} record in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_refusal_of_the_token_service_kms_and_control_plane_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path());
    let ca = dir.path().join("ca");
    let cp = tls(&ca, Some("control-plane"));
    let anon = tls(&ca, None);

    // Token service.
    let log = dir.path().join("tokens/audit.log");
    for (method, path) in [
        ("GET", "/v1/Mint"),
        ("POST", "/v1/mint"),
        ("POST", "/v1/Mint/"),
    ] {
        let r = raw(&cp, &c.token_addr, &request(method, path, b"{}"));
        assert_eq!(status(&r), 404, "{method} {path}");
        let e = wait_refusal(
            &log,
            &format!("token service {method} {path}"),
            "Request",
            "no_such_route",
            Some(&format!("{method} {path}")),
        );
        assert_eq!(e["caller"], "control-plane");
    }
    let secret = "S3CRET-".repeat(9 * 1024 / 7 + 1);
    let r = raw(
        &cp,
        &c.token_addr,
        &request("POST", "/v1/Mint", secret.as_bytes()),
    );
    assert_eq!(status(&r), 413);
    wait_refusal(
        &log,
        "9 KiB body",
        "Request",
        "body_too_large",
        Some("POST /v1/Mint"),
    );
    assert!(raw(&anon, &c.token_addr, &request("POST", "/v1/Mint", b"{}")).is_empty());
    wait_refusal(
        &log,
        "no client certificate",
        "TlsHandshake",
        "tls_no_client_cert",
        None,
    );
    // A certificate of the same name from another CA.
    let rogue = tempfile::tempdir().unwrap();
    let rogue_ca = bulkhead_tokens::pki::CaDir::new(rogue.path());
    rogue_ca.init().unwrap();
    rogue_ca
        .issue("control-plane", bulkhead_tokens::Role::ControlPlane, false)
        .unwrap();
    let forged = tls_from(&ca, rogue.path(), Some("control-plane"));
    assert!(raw(&forged, &c.token_addr, &request("POST", "/v1/Mint", b"{}")).is_empty());
    wait_refusal(
        &log,
        "certificate from another CA",
        "TlsHandshake",
        "tls_bad_client_cert",
        None,
    );
    let r = raw(
        &cp,
        &c.token_addr,
        b"GET /v1/Mint HTTP/1.1\r\nno colon\r\n\r\n",
    );
    assert_eq!(status(&r), 400);
    wait_refusal(
        &log,
        "token service: header without colon",
        "HttpParse",
        "http_malformed",
        None,
    );

    // KMS.
    let log = dir.path().join("kms/audit.log");
    for (method, path) in [("POST", "/v1/NoSuchThing"), ("GET", "/v1/GenerateDataKey")] {
        let r = raw(&cp, &c.kms_addr, &request(method, path, b"{}"));
        assert_eq!(status(&r), 404, "{method} {path}");
        wait_refusal(
            &log,
            &format!("KMS {method} {path}"),
            "Request",
            "no_such_route",
            Some(&format!("{method} {path}")),
        );
    }
    let r = raw(
        &cp,
        &c.kms_addr,
        &request("POST", "/v1/GenerateDataKey", &vec![b'x'; 40 * 1024]),
    );
    assert_eq!(status(&r), 413);
    wait_refusal(
        &log,
        "KMS oversized body",
        "Request",
        "body_too_large",
        None,
    );
    assert!(raw(&anon, &c.kms_addr, &request("POST", "/v1/Decrypt", b"{}")).is_empty());
    wait_refusal(
        &log,
        "KMS without a certificate",
        "TlsHandshake",
        "tls_no_client_cert",
        None,
    );
    bulkhead_audit::verify(&log).unwrap();

    // Control plane, customer API (no client certificates on this listener).
    let log = dir.path().join("control/audit.log");
    let r = raw(
        &anon,
        &c.control_addr,
        &request(
            "POST",
            "/v1/RunInstances",
            &[0xff, 0xfe, b'P', b'I', b'N', 0x80],
        ),
    );
    assert_eq!(status(&r), 400);
    wait_refusal(
        &log,
        "non-UTF-8 body",
        "Request",
        "body_malformed",
        Some("POST /v1/RunInstances"),
    );
    let r = raw(
        &anon,
        &c.control_addr,
        &request("POST", "/v1/RunInstances", &vec![b'7'; 64 * 1024]),
    );
    assert_eq!(status(&r), 413);
    wait_refusal(
        &log,
        "oversized body",
        "Request",
        "body_too_large",
        Some("POST /v1/RunInstances"),
    );
    let r = raw(&anon, &c.control_addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(r.is_empty() || status(&r) >= 400);
    wait_refusal(
        &log,
        "HTTP/2 preface at the customer API",
        "HttpParse",
        "http2_preface",
        None,
    );

    // Control plane, operator API: no certificate, and malformed HTTP with one.
    assert!(raw(
        &anon,
        &c.operator_addr,
        &request("GET", "/v1/operator/hosts", b"")
    )
    .is_empty());
    wait_refusal(
        &log,
        "operator API without a certificate",
        "TlsHandshake",
        "tls_no_client_cert",
        None,
    );
    let op = tls(&ca, Some("operator"));
    let r = raw(&op, &c.operator_addr, b"\x00\x01garbage\r\n\r\n");
    assert_eq!(status(&r), 400);
    let e = wait_refusal(
        &log,
        "operator API garbage",
        "HttpParse",
        "http_malformed",
        None,
    );
    assert_eq!(e["caller"], "operator");

    drop(c);
    // No refused body (nor its digest) is in any log: the 9 KiB "secret" appears nowhere.
    for l in ["tokens/audit.log", "kms/audit.log", "control/audit.log"] {
        let p = dir.path().join(l);
        bulkhead_audit::verify(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("S3CRET"), "{l} holds a refused body");
        assert!(!text.contains("PIN"), "{l} holds a refused body");
    }
}

#[test]
fn an_operator_call_is_answered_within_1s_while_2000_idle_connections_are_open() {
    bulkhead_mtls::raise_nofile_limit();
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path());
    let ca = dir.path().join("ca");
    let other = tls(&ca, Some("control-plane"));
    let addr = c.operator_addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 1,000 TLS connections of one (non-operator) identity that never send a request, then
    // 1,000 TCP connections that never start a handshake.
    let (held_tls, held_tcp) = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000u64 {
            let cfg = Arc::clone(&other);
            let addr = addr.clone();
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(i % 50)).await;
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                    .await
            });
        }
        let mut tls = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(s) = r.unwrap() {
                tls.push(s);
            }
        }
        let mut tcp = Vec::new();
        for _ in 0..1000 {
            tcp.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        (tls, tcp)
    });
    let op = tls(&ca, Some("operator"));
    let started = Instant::now();
    let r = raw(
        &op,
        &c.operator_addr,
        &request("GET", "/v1/operator/hosts", b""),
    );
    let took = started.elapsed();
    eprintln!(
        "operator call with {} TLS + {} TCP idle connections open: {took:?}",
        held_tls.len(),
        held_tcp.len()
    );
    assert_eq!(status(&r), 200, "{}", String::from_utf8_lossy(&r));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(held_tcp);
    drop(held_tls);
}
