//! The audit log under crashes and a full disk, against the real controller.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tokens::Operation;
use common::*;

const MIN5: Duration = Duration::from_secs(300);

/// kill -9 the controller in a loop while requests are in flight. Afterwards the chain verifies
/// and every request the controller acknowledged (HTTP 200) has its allow record in the log.
#[test]
fn kill_dash_nine_loop_keeps_the_chain_and_every_acknowledged_request() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut token = None;
    for round in 0..6 {
        let mut d = Daemon::start(dir.path());
        let t = token
            .get_or_insert_with(|| d.mint("operator", HOST, &[Operation::DescribeHost], MIN5))
            .clone();
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        // Several at once, so requests share group commits when the controller dies.
        for _ in 0..6 {
            let c = d.client("operator");
            let t = t.clone();
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            workers.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok(r) = c.request("GET", "/v1/host", Some(&t), b"") {
                        if r.status == 200 {
                            acked.lock().unwrap().push(r.request_id.clone());
                        }
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(150 + 60 * round));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 10,
        "too few requests got through: {}",
        acked.len()
    );
    let log = dir.path().join("audit.log");
    let head = bulkhead_audit::verify(&log).expect("chain must verify after kill -9 loop");
    let recs = audit_records(&log);
    assert_eq!(head.records, u64::try_from(recs.len()).unwrap());
    for id in &acked {
        let rec = request_record(&recs, id);
        assert_eq!(rec["entry"]["decision"], "allow");
    }
    // The controller starts again on the same log and keeps extending the chain.
    let d = Daemon::start(dir.path());
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    assert_eq!(
        d.client("operator")
            .request("GET", "/v1/host", Some(&t), b"")
            .unwrap()
            .status,
        200
    );
    drop(d);
    assert!(bulkhead_audit::verify(&log).unwrap().records > head.records);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Fill the filesystem under the audit log: requests are refused (fail closed) and change
/// nothing; once space is back, requests are served again and the chain is intact.
#[test]
fn full_disk_under_the_audit_log_fails_closed() {
    if !is_root() {
        bulkhead_testkit::skip_or_fail(
            "full_disk_under_the_audit_log_fails_closed: needs root to mount a tmpfs",
        );
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bulkhead_testkit::skip_or_fail(
            "full_disk_under_the_audit_log_fails_closed: mount -t tmpfs failed (no CAP_SYS_ADMIN in this sandbox?)",
        );
        return;
    }
    let _m = Mount(mnt.clone());
    let d = Daemon::start(&mnt);
    let t = d.mint(
        "customer",
        HOST,
        &[Operation::CreateInstance, Operation::DescribeInstance],
        MIN5,
    );
    let c = d.client("customer");
    assert_eq!(
        c.request("GET", "/v1/instances/i-0", Some(&t), b"")
            .unwrap()
            .code(),
        "no_such_instance"
    );
    // Fill the filesystem. The audit writer may be busy meanwhile (the GET's outcome record is
    // written after its answer): its preallocation write takes every free page and gives them
    // back when it fails, so a fill that ended during it would leave room. Fill until the disk
    // stays full after a pause.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            while f.write_all(&chunk).is_ok() {}
            std::thread::sleep(std::time::Duration::from_millis(300));
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    // The log's last page may still have room for a few records; keep asking until refused.
    let mut refused = None;
    for i in 0..64 {
        let body = format!(r#"{{"instance_id":"i-{i}","image":"img","vcpus":1,"memory_mib":64}}"#);
        let r = c
            .request("POST", "/v1/instances", Some(&t), body.as_bytes())
            .unwrap();
        if r.status == 503 {
            assert_eq!(r.code(), "audit_unavailable");
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("requests were never refused on a full disk");
    // Nothing happened: the instance was not created and the request is not in the log.
    assert!(!d
        .audit()
        .iter()
        .any(|x| x["entry"]["request_id"] == r.request_id.as_str()));
    std::fs::remove_file(&filler).unwrap();
    let r2 = c
        .request("GET", &format!("/v1/instances/i-{i}"), Some(&t), b"")
        .unwrap();
    assert_eq!(r2.code(), "no_such_instance");
    assert_eq!(r2.status, 404);
    drop(d);
    let head = bulkhead_audit::verify(&mnt.join("audit.log")).expect("chain intact");
    assert!(head.records > 0);
}
