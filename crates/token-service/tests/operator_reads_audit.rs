//! Claim 6 against the real `bulkhead-token-service` binary: an operator who reads the service's
//! audit log cannot confirm a guessed mint body by hashing guesses, because the recorded digest
//! is keyed (`bulkhead_audit::ParamsKey`), not a plain SHA-256.
//!
//! The test mints over mutual TLS as the dev `operator`, then plays the operator: it reads
//! `audit.log`, hashes a dictionary of plausible mint bodies (the true one among them) with plain
//! SHA-256 and finds no match. With the old unkeyed digest the true body matches and the test
//! fails. It also pins what the keyed digest still tells: equal bodies give equal digests within
//! one process run, and different digests after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bulkhead_audit::{AuditRecord, CheckpointKey, VerifyOptions};
use bulkhead_mtls::HttpsClient;
use bulkhead_tokens::pki::{CaDir, ServerIdentity, TOKEN_SERVICE_NAME};
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::Role;
use sha2::{Digest, Sha256};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "bulkhead-token-service-audit-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The running service; killed on drop.
struct Service {
    child: Child,
    addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(st: &StateDir, state_dir: &Path) -> Service {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-token-service"))
        .args(["--listen", "127.0.0.1:0", "--ca-dir"])
        .arg(st.root())
        .arg("--signing-key")
        .arg(st.token_key())
        .arg("--rights")
        .arg(st.rights())
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    assert_eq!(
        ready["event"], "ready",
        "token service did not start: {line}"
    );
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    Service {
        child,
        addr: ready["listen"].as_str().unwrap().to_string(),
    }
}

/// A mint body in the one format both the test and the operator's dictionary use.
fn mint_body(host: &str, op: &str, ttl: u64) -> Vec<u8> {
    format!(r#"{{"hosts":["{host}"],"operations":["{op}"],"ttl_secs":{ttl}}}"#).into_bytes()
}

fn mint(rt: &tokio::runtime::Runtime, client: &HttpsClient, s: &Service, body: &[u8]) -> u16 {
    rt.block_on(client.request(
        &s.addr,
        "POST",
        "/v1/Mint",
        &[("content-type", "application/json")],
        body.to_vec(),
    ))
    .unwrap()
    .status
}

/// The recorded digests of the mint requests, in log order.
fn mint_digests(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
        .filter(|r| r.entry.op.starts_with("Mint:"))
        .map(|r| {
            r.entry
                .params_sha256
                .expect("a mint record carries a digest")
        })
        .collect()
}

#[test]
fn an_operator_cannot_confirm_a_guessed_mint_body_from_the_audit_log() {
    let dir = Scratch::new();
    let st = StateDir::new(dir.path().join("ca"));
    st.ensure_dev("host-1").unwrap();
    let ca = CaDir::new(st.root());
    ca.issue(TOKEN_SERVICE_NAME, Role::Service, false).unwrap();
    let state_dir: PathBuf = dir.path().join("tokens");
    let log = state_dir.join("audit.log");
    let client = HttpsClient::pinned(
        &ca.ca_pem(),
        Some((&ca.cert("operator"), &ca.key("operator"))),
        ServerIdentity::service(TOKEN_SERVICE_NAME),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The secret the operator wants to confirm: a low-entropy mint body, sent twice, and one
    // other body.
    let secret = mint_body("host-3", "DrainHost", 300);
    let other = mint_body("host-4", "DrainHost", 300);
    let svc = start(&st, &state_dir);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    assert_eq!(mint(&rt, &client, &svc, &other), 200);
    let first = mint_digests(&log);
    assert_eq!(first.len(), 3, "one record per mint");

    // The operator's dictionary: every host, operator operation and usual TTL.
    let ops = [
        "DescribeHost",
        "GetHealth",
        "GetMetrics",
        "ReadAudit",
        "ListAlerts",
        "DrainHost",
        "AttestHost",
    ];
    let mut dictionary = Vec::new();
    for h in 1..=20 {
        for op in ops {
            for ttl in [30, 60, 120, 300, 600, 900] {
                dictionary.push(mint_body(&format!("host-{h}"), op, ttl));
            }
        }
    }
    assert!(dictionary.contains(&secret) && dictionary.contains(&other));
    for guess in &dictionary {
        let plain = hex::encode(Sha256::digest(guess));
        assert!(
            !first.contains(&plain),
            "the log confirms the guess {}",
            String::from_utf8_lossy(guess)
        );
    }

    // What the keyed digest still says: within one run, equal bodies give equal digests and a
    // different body a different one.
    assert_eq!(
        first[0], first[1],
        "equal bodies, one process: equal digests"
    );
    assert_ne!(first[0], first[2]);

    // After a restart the key is a new one: the same body gets another digest.
    drop(svc);
    let svc = start(&st, &state_dir);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    drop(svc);
    let all = mint_digests(&log);
    assert_eq!(all.len(), 4);
    assert_ne!(all[3], first[0], "a restart draws a new key");

    // The key left no trace a reader could use, and the log (with its keyed digests) still
    // verifies against the service's certificate.
    let key =
        CheckpointKey::from_cert_pem(&std::fs::read(ca.cert(TOKEN_SERVICE_NAME)).unwrap()).unwrap();
    let head = bulkhead_audit::verify_with(
        &log,
        &VerifyOptions {
            key: Some(key),
            ..VerifyOptions::default()
        },
    )
    .unwrap();
    assert!(head.records >= 4);
}
