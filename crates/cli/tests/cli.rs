//! The `bulkhead` binary end to end: CA, token minting against the dev token service, revocation,
//! and audit verification (including a tampered log), with the real controller where it matters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bulkhead(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ca_init_issue_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let d = s(dir.path());
    assert!(bulkhead(&["ca", "init", "--dir", d]).status.success());
    assert!(
        !bulkhead(&["ca", "init", "--dir", d]).status.success(),
        "re-init must refuse"
    );
    let out = bulkhead(&[
        "ca", "issue", "--dir", d, "--name", "alice", "--role", "operator",
    ]);
    assert!(out.status.success());
    assert!(dir.path().join("alice.pem").exists() && dir.path().join("alice.key").exists());
    let before = std::fs::read(dir.path().join("alice.pem")).unwrap();
    assert!(
        !bulkhead(&["ca", "issue", "--dir", d, "--name", "alice", "--role", "operator"])
            .status
            .success()
    );
    assert!(
        !bulkhead(&["ca", "issue", "--dir", d, "--name", "bob", "--role", "root"])
            .status
            .success()
    );
    assert!(bulkhead(&["ca", "rotate", "--dir", d, "--name", "alice"])
        .status
        .success());
    assert_ne!(before, std::fs::read(dir.path().join("alice.pem")).unwrap());
    let (id, _) = bulkhead_tokens::pki::CaDir::new(dir.path())
        .identity("alice")
        .unwrap();
    assert_eq!(id.role, bulkhead_tokens::Role::Operator);
}

#[test]
fn token_mint_follows_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev("host-1")
        .unwrap();
    let d = s(dir.path());
    let ok = bulkhead(&[
        "token",
        "mint",
        "--dev-dir",
        d,
        "--caller",
        "operator",
        "--host",
        "host-1",
        "--ops",
        "DescribeHost,GetHealth",
        "--ttl",
        "5m",
    ]);
    assert!(ok.status.success());
    let token = String::from_utf8(ok.stdout).unwrap();
    assert!(token.trim().len() > 100);
    for (ops, ttl, code) in [
        ("GetConsole", "5m", "mint_plane_violation"),
        ("DescribeHost", "2h", "mint_ttl_too_long"),
        ("ExecShell", "5m", "bad_argument"),
    ] {
        let out = bulkhead(&[
            "token",
            "mint",
            "--dev-dir",
            d,
            "--caller",
            "operator",
            "--host",
            "host-1",
            "--ops",
            ops,
            "--ttl",
            ttl,
        ]);
        assert!(!out.status.success(), "{ops} {ttl}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(code));
        assert!(out.stdout.is_empty());
    }
    // A caller the policy does not know.
    let ca = bulkhead_tokens::pki::CaDir::new(dir.path());
    ca.issue("mallory", bulkhead_tokens::Role::Operator, false)
        .unwrap();
    let out = bulkhead(&[
        "token",
        "mint",
        "--dev-dir",
        d,
        "--caller",
        "mallory",
        "--host",
        "host-1",
        "--ops",
        "DescribeHost",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("mint_not_granted"));
    // Revocation by token.
    let out = bulkhead(&["token", "revoke", "--dev-dir", d, "--token", token.trim()]);
    assert!(out.status.success());
    let (_, claims) = bulkhead_tokens::statedir::StateDir::new(dir.path())
        .verifier()
        .unwrap()
        .decode(token.trim())
        .unwrap();
    let revoked = std::fs::read_to_string(dir.path().join("revoked.txt")).unwrap();
    assert!(revoked.contains(&claims.token_id));
}

fn target_bin(name: &str) -> std::path::PathBuf {
    // Both binaries live in the same target directory.
    Path::new(env!("CARGO_BIN_EXE_bulkhead"))
        .parent()
        .unwrap()
        .join(name)
}

#[test]
fn audit_verify_counts_and_finds_the_first_broken_record() {
    let controller = target_bin("bulkhead-controller");
    if !controller.exists() {
        bulkhead_testkit::skip_or_fail(
            "audit_verify_counts_and_finds_the_first_broken_record: build bulkhead-controller first (cargo build --release)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(&controller)
        .args([
            "--dev",
            "--state-dir",
            s(dir.path()),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("ready"));
    child.kill().unwrap();
    child.wait().unwrap();
    let log = dir.path().join("audit.log");
    // The controller's log is preallocated: killed, it ends in NUL padding, which is no record.
    let before = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start_matches('\0').is_empty())
        .count() as u64;
    // Append a few records through the library (the same writer the controller uses).
    let rt = tokio_free_append(&log, 4);
    assert_eq!(rt, before + 4);
    let out = bulkhead(&["audit", "verify", s(&log)]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{rt} records")), "{stdout}");
    // Tamper with an appended "allow" record that is not the last: verification stops at the
    // record after it (whose prev no longer matches).
    let text = std::fs::read_to_string(&log).unwrap();
    let intact: Vec<String> = text.lines().map(str::to_string).collect();
    let mut lines = intact.clone();
    let t = lines
        .iter()
        .position(|l| l.contains("\"r1\"") && l.contains("\"allow\""))
        .unwrap_or_else(|| panic!("no appended allow record in\n{text}"));
    assert!(t + 1 < lines.len(), "{text}");
    lines[t] = lines[t].replace("\"allow\"", "\"deny\"");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = bulkhead(&["audit", "verify", s(&log)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {}", t + 2)), "{err}\n{text}");
    // Deleting a record is found too, on an otherwise intact log: restore the original, check
    // it verifies again (so only the deletion can break it), then delete record 2.
    std::fs::write(&log, intact.join("\n") + "\n").unwrap();
    let out = bulkhead(&["audit", "verify", s(&log)]);
    assert!(
        out.status.success(),
        "the restored log must verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut deleted = intact.clone();
    deleted.remove(t);
    std::fs::write(&log, deleted.join("\n") + "\n").unwrap();
    let out = bulkhead(&["audit", "verify", s(&log)]);
    assert!(!out.status.success(), "a deleted middle record verified");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {}", t + 1)), "{err}\n{text}");
}

fn tokio_free_append(log: &Path, n: usize) -> u64 {
    let (l, _) = bulkhead_audit::AuditLog::open(log).unwrap();
    let mut last = 0;
    for i in 0..n {
        last = l
            .append_blocking(bulkhead_audit::AuditEntry {
                kind: bulkhead_audit::EntryKind::Request,
                request_id: format!("r{i}"),
                caller: "operator".into(),
                cert_sha256: None,
                token_id: None,
                op: "DescribeHost".into(),
                resources: vec!["host".into()],
                params_sha256: None,
                decision: bulkhead_audit::Decision::Allow,
                code: "ok".into(),
            })
            .unwrap();
    }
    last
}
