//! Claim 6 against the real `bulkhead-token-service` binary: an operator who reads the service's
//! audit log cannot confirm a guess of the mint body's fields the record does not show, because
//! the recorded digest is keyed (`bulkhead_audit::ParamsKey`), not a plain SHA-256.
//!
//! What the record shows in clear, and the operator reads: the hosts (`resources`:
//! `host:host-3`) and the operations (`op`: `Mint:DrainHost`). What only the digest covers: the
//! TTL (and resource patterns, which these bodies do not carry). The test mints over mutual TLS
//! as the dev `operator`, then plays the operator: it reads `audit.log`, takes each record's
//! clear host and operation, hashes every TTL from 1 s to a day with plain SHA-256 and finds no
//! match. With the old unkeyed digest the true body matches and the test fails. It also pins
//! what the keyed digest still tells: equal bodies give equal digests within one process run,
//! and different digests after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bulkhead_audit::{AuditRecord, CheckpointKey, EntryKind, VerifyOptions};
use bulkhead_mtls::HttpsClient;
use bulkhead_tokens::pki::{CaDir, ServerIdentity, TOKEN_SERVICE_NAME};
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::Role;

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

/// The records the service wrote, in log order. A line still being written (a queued record
/// half on disk) is skipped; the exact counts below catch a missing one.
fn records(log: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .filter(|r| r.entry.kind != EntryKind::Checkpoint)
        .collect()
}

/// What an operator reads of each mint record: the clear hosts and operations, and the digest.
struct MintRecord {
    hosts: Vec<String>,
    ops: String,
    digest: String,
}

fn mint_records(log: &Path) -> Vec<MintRecord> {
    records(log)
        .into_iter()
        .filter(|r| r.entry.op.starts_with("Mint:"))
        .map(|r| MintRecord {
            hosts: r
                .entry
                .resources
                .iter()
                .map(|h| {
                    h.strip_prefix("host:")
                        .expect("a host resource")
                        .to_string()
                })
                .collect(),
            ops: r.entry.op.trim_start_matches("Mint:").to_string(),
            digest: r
                .entry
                .params_sha256
                .expect("a mint record carries a digest"),
        })
        .collect()
}

#[test]
fn an_operator_cannot_confirm_a_guessed_mint_body_from_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let st = StateDir::new(dir.path().join("ca"));
    st.ensure_dev("host-1").unwrap();
    let ca = CaDir::new(st.root());
    ca.issue(TOKEN_SERVICE_NAME, Role::Service, false).unwrap();
    let state_dir = dir.path().join("tokens");
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

    // The secret the operator wants to confirm: the TTL of a mint whose host and operation the
    // record shows. Sent twice, and one other body.
    let secret = mint_body("host-3", "DrainHost", 300);
    let other = mint_body("host-4", "DrainHost", 300);
    let svc = start(&st, &state_dir);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    assert_eq!(mint(&rt, &client, &svc, &other), 200);
    let first = mint_records(&log);
    assert_eq!(first.len(), 3, "one record per mint");
    // The clear part of the record is the clear part of the body.
    assert_eq!(first[0].hosts, ["host-3"]);
    assert_eq!(first[2].hosts, ["host-4"]);
    assert!(first.iter().all(|r| r.ops == "DrainHost"));

    // The operator's dictionary: each record's clear hosts and operations, every TTL up to a day.
    let mut dictionary = Vec::new();
    for r in &first {
        for ttl in 1..=86_400 {
            for host in &r.hosts {
                dictionary.push(mint_body(host, &r.ops, ttl));
            }
        }
    }
    let digests: Vec<String> = first.iter().map(|r| r.digest.clone()).collect();
    bulkhead_testkit::assert_digests_keyed(&digests, (&secret, &other), &dictionary);

    // After a restart the key is a new one: the same body gets another digest.
    drop(svc);
    let svc = start(&st, &state_dir);
    assert_eq!(mint(&rt, &client, &svc, &secret), 200);
    drop(svc);
    let all = mint_records(&log);
    assert_eq!(all.len(), 4);
    assert_ne!(all[3].digest, first[0].digest, "a restart draws a new key");

    // The service left nothing but its log in its state directory (the key is in no file there),
    // the log holds exactly the four mint records besides its checkpoints, and it still verifies
    // against the service's certificate.
    let files: Vec<String> = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["audit.log"]);
    assert_eq!(records(&log).len(), 4, "four mint records, nothing else");
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
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(head.records, u64::try_from(lines).unwrap());
}
