//! A writer process killed with SIGKILL while many threads append: every record it acknowledged
//! is in the log afterwards, and the log (with its preallocated space and perhaps a torn batch)
//! reopens and verifies with its checkpoint key.
//!
//! The writer is this test binary run again (`AUDIT_KILL_CHILD` set): it appends from 8 threads
//! and prints `seq request_id` on stdout for each acknowledgement, after `append` returned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_audit::{
    AuditEntry, AuditLog, AuditRecord, CheckpointSigner, Decision, EntryKind, LogOptions,
    VerifyOptions,
};

const CHILD_ENV: &str = "AUDIT_KILL_CHILD";

fn key_der() -> Vec<u8> {
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .unwrap()
        .as_ref()
        .to_vec()
}

fn options(key: &[u8]) -> LogOptions {
    LogOptions {
        signer: Some(Arc::new(CheckpointSigner::from_pkcs8_der(key).unwrap())),
        preallocate: true,
    }
}

/// The writer process (a no-op unless run by the test below).
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let round = std::env::var("AUDIT_KILL_ROUND").unwrap();
    let key = std::fs::read(dir.join("key.der")).unwrap();
    let (log, _) = AuditLog::open_with_options(&dir.join("audit.log"), options(&key)).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            let out = Arc::clone(&out);
            let round = round.clone();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let id = format!("r{round}-t{t}-{i}");
                    let seq = log
                        .append_blocking(AuditEntry {
                            kind: EntryKind::Request,
                            request_id: id.clone(),
                            caller: "operator".into(),
                            cert_sha256: None,
                            token_id: None,
                            op: "DescribeHost".into(),
                            resources: vec!["host".into()],
                            params_sha256: None,
                            decision: Decision::Allow,
                            code: "ok".into(),
                        })
                        .unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "{seq} {id}").unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn kill_dash_nine_keeps_every_acknowledged_record() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_der();
    std::fs::write(dir.path().join("key.der"), &key).unwrap();
    let log_path = dir.path().join("audit.log");
    let mut acked: HashMap<u64, String> = HashMap::new();
    for round in 0..4 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("AUDIT_KILL_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines() {
                    let Ok(l) = l else { break };
                    lines.lock().unwrap().push(l);
                }
            })
        };
        // Let it get going (at least some acknowledgements), then kill it mid-stream.
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines.lock().unwrap().len() < 200 + 300 * round {
            assert!(Instant::now() < deadline, "writer made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let got = lines.lock().unwrap();
        for l in got
            .iter()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        {
            let (seq, id) = l.split_once(' ').unwrap();
            assert!(
                acked.insert(seq.parse().unwrap(), id.to_string()).is_none(),
                "{seq} acknowledged twice"
            );
        }
    }
    assert!(acked.len() >= 1000, "only {} acknowledgements", acked.len());
    // Reopen as the next daemon would (cuts a torn batch, keeps the padding), then verify.
    let (log, report) = AuditLog::open_with_options(&log_path, options(&key)).unwrap();
    drop(log);
    let opts = VerifyOptions {
        key: Some(
            CheckpointSigner::from_pkcs8_der(&key)
                .unwrap()
                .verifying_key(),
        ),
        ..VerifyOptions::default()
    };
    let head = bulkhead_audit::verify_with(&log_path, &opts).expect("chain and seals verify");
    assert!(head.records >= report.records);
    let recs: Vec<AuditRecord> = bulkhead_audit::read_after(&log_path, 0, usize::MAX)
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (seq, id) in &acked {
        let rec = recs
            .get(usize::try_from(*seq - 1).unwrap())
            .unwrap_or_else(|| panic!("acknowledged record {seq} ({id}) lost"));
        assert_eq!(rec.seq, *seq);
        assert_eq!(
            &rec.entry.request_id, id,
            "record {seq} is not what was acknowledged"
        );
    }
}
