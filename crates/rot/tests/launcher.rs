//! The real `bulkhead-launcher` binary with its own (dev) swtpm: provision, boot healthy, a byte
//! of a measured binary changes, boot refuses and says why (exit 3, JSON health).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn launcher(
    root: &std::path::Path,
    trust: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-launcher"))
        .arg("--root")
        .arg(root)
        .args([
            "--name",
            "host-a",
            "--env",
            "staging",
            "--dev-swtpm",
            "--trust-root",
        ])
        .arg(trust)
        .args(args)
        .output()
        .expect("run bulkhead-launcher")
}

#[test]
fn launcher_binary_boots_healthy_then_refuses_a_tampered_binary() {
    if skip("launcher_binary_boots_healthy_then_refuses_a_tampered_binary") {
        return;
    }
    let k = keys();
    let art = Artefacts::new("v1", 0);
    let rel = art.release(&k, 1, &env("staging"), &[0, 1]);
    let work = tempfile::tempdir().unwrap();
    let trust = work.path().join("trust-root.json");
    std::fs::write(&trust, serde_json::to_vec(&k.root).unwrap()).unwrap();
    let relp = work.path().join("release.json");
    std::fs::write(&relp, rel.to_json().unwrap()).unwrap();
    let root = work.path().join("host");

    let out = launcher(
        &root,
        &trust,
        &[
            "provision",
            "--release",
            relp.to_str().unwrap(),
            "--from",
            art.path().to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enrol: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(enrol["environment"], "staging");

    let key_out = work.path().join("host.key");
    let out = launcher(
        &root,
        &trust,
        &["boot", "--host-key-out", key_out.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["accepts_customer_work"], true);
    // The unsealed identity is the block card's host key file, and it is the enrolled one.
    let key = bulkhead_sealing::HostKey::read_file(&key_out).expect("host key file");
    assert_eq!(
        hex::encode(key.public().to_file_bytes()),
        enrol["host_public"].as_str().unwrap()
    );
    std::fs::remove_file(&key_out).unwrap();
    // The same TPM (state kept in ROOT/swtpm) across launcher runs: same AK.
    let again = launcher(&root, &trust, &["attest", "--nonce", &"ab".repeat(32)]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let bin = root.join("releases/v1/bulkhead-controller");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&bin, bytes).unwrap();
    let out = launcher(
        &root,
        &trust,
        &["boot", "--host-key-out", key_out.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(!key_out.exists(), "a refusing host hands out no key");
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["accepts_customer_work"], false);
    let codes: Vec<&str> = health["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"artefact_mismatch") && codes.contains(&"unseal_failed"),
        "{codes:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REFUSES customer work"), "{stderr}");
}
