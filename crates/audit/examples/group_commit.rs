//! The audit log alone, as the controller drives it: N threads each append a request record and
//! wait for it to be durable (signed checkpoint per commit), then queue an outcome record, in a
//! loop. Runs the plain and the preallocated log in turn, ROUNDS times each, in a directory on
//! the disk under test, and prints one line per run (appends/s, commits/s, p50/p99 wait).
//!
//! Usage: group_commit DIR [SECONDS] [THREADS] [ROUNDS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_audit::{AuditEntry, AuditLog, CheckpointSigner, Decision, EntryKind, LogOptions};

fn entry(i: u64) -> AuditEntry {
    AuditEntry {
        kind: EntryKind::Request,
        request_id: format!("{i:024x}"),
        caller: "operator".into(),
        cert_sha256: Some("ab".repeat(32)),
        token_id: Some("cd".repeat(16)),
        op: "DescribeHost".into(),
        resources: vec!["host".into()],
        params_sha256: None,
        decision: Decision::Allow,
        code: "ok".into(),
    }
}

fn run(dir: &Path, preallocate: bool, secs: u64, threads: usize, key: &[u8]) -> String {
    let path = dir.join(format!("bench-{}.log", u8::from(preallocate)));
    let _ = std::fs::remove_file(&path);
    let signer = Arc::new(CheckpointSigner::from_pkcs8_der(key).unwrap());
    let (log, _) = AuditLog::open_with_options(
        &path,
        LogOptions {
            signer: Some(signer),
            preallocate,
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut i = u64::try_from(t).unwrap() << 40;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    log.append_blocking(entry(i)).unwrap();
                    lat.push(u64::try_from(t0.elapsed().as_micros()).unwrap());
                    let mut o = entry(i);
                    o.kind = EntryKind::Outcome;
                    log.append_queued(o);
                    i += 1;
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let el = start.elapsed().as_secs_f64();
    let stats = log.stats();
    drop(log);
    lat.sort_unstable();
    let pct = |p: usize| {
        lat.get(lat.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    let n = lat.len() as f64;
    std::thread::sleep(Duration::from_millis(200));
    let _ = std::fs::remove_file(&path);
    format!(
        "{:<12} appends/s {:>7.0}  commits/s {:>6.0}  records/commit {:>5.1}  wait p50 {} µs p99 {} µs",
        if preallocate { "preallocated" } else { "plain" },
        n / el,
        stats.batches as f64 / el,
        stats.records as f64 / stats.batches.max(1) as f64,
        pct(50),
        pct(99)
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(
        args.get(1)
            .expect("usage: group_commit DIR [SECONDS] [THREADS] [ROUNDS]"),
    );
    let secs = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let rounds = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let key = {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    for r in 0..rounds {
        for pre in [false, true] {
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let line = run(dir, pre, secs, threads, &key);
            println!(
                "round {r} {line}  load {}",
                load.split_whitespace().next().unwrap_or("?")
            );
        }
    }
}
