//! DeployRelease on a real host, with one running guest for every check: a 2-of-3 signed
//! release is uploaded (content-addressed) and deployed, and the guest's hypervisor is
//! live-updated to the release's binary (the new process runs the installed file; the guest's
//! boot id and counter show it never rebooted); then an unsigned release, one signed by 1 of 3,
//! a downgrade, a correctly signed release whose hypervisor fails its self-test, and an
//! operator's token are each refused, typed and audited, with the guest still counting on the
//! same hypervisor. The audit chain verifies at the end.
//!
//! Real processes throughout: the controller binary (dev mode, `--backend host`), its keeper,
//! `bulkhead-hypervisor` (then the release's copy of it), the test guest under /dev/kvm.
//! Without them, a loud skip (`make test` turns it into a failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_tokens::Operation;
use common::*;
use sha2::{Digest, Sha256};

const DEPLOY_OPS: &[Operation] = &[Operation::UploadArtefact, Operation::DeployRelease];
const CUSTOMER_OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::StartInstance,
    Operation::TerminateInstance,
    Operation::GetConsole,
];

fn call(d: &Daemon, who: &str, ops: &[Operation], method: &str, path: &str, body: &[u8]) -> Resp {
    let t = d.mint(who, HOST, ops, MIN10);
    d.client(who)
        .request(method, path, Some(&t), body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn customer(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let r = call(d, "customer", CUSTOMER_OPS, method, path, body.as_bytes());
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r
}

/// `(counter, boot id)` of every complete `CNT=<n> BOOT=<id> END` console line.
fn counts(d: &Daemon) -> Vec<(u64, String)> {
    let out = customer(d, "GET", "/v1/instances/i-dep/console", "").json["output"]
        .as_str()
        .unwrap_or("")
        .to_string();
    out.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("CNT=")?;
            let (n, boot) = rest.split_once(" BOOT=")?;
            let boot = boot.strip_suffix(" END")?;
            Some((n.parse().ok()?, boot.trim().to_string()))
        })
        .collect()
}

/// The guest counted on, one step at a time, on one boot only.
fn assert_never_rebooted(c: &[(u64, String)]) {
    assert!(!c.is_empty());
    for w in c.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a gap or repeat in the counter: {w:?}");
        assert_eq!(w[1].1, w[0].1, "the boot id changed: the guest rebooted");
    }
}

/// Uploads every file (content-addressed, as a deployer).
fn upload(d: &Daemon, files: &[&Path]) {
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let r = call(
            d,
            "deployer",
            DEPLOY_OPS,
            "PUT",
            &format!("/v1/host/artefacts/{sha}"),
            &bytes,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json["sha256"], sha.as_str());
    }
}

/// A release of `files` (names as they are), version `v`, signed by `signers`.
fn release(v: u64, files: &[&Path], signers: &[&ReleaseKey]) -> String {
    let list: Vec<(EventKind, &Path)> = files.iter().map(|f| (EventKind::Binary, *f)).collect();
    let m = Manifest::from_files(
        v,
        Environment::parse("dev").unwrap(),
        bulkhead_tokens::clock::unix_now() + 3600,
        MeasurePcr::DEV,
        &list,
    )
    .unwrap();
    let mut r = SignedRelease::new(&m).unwrap();
    for k in signers {
        r.sign(k);
    }
    r.to_json().unwrap()
}

fn deploy(d: &Daemon, who: &str, ops: &[Operation], signed: &str) -> Resp {
    let body = serde_json::json!({ "release": signed }).to_string();
    call(d, who, ops, "POST", "/v1/host/releases", body.as_bytes())
}

/// The outcome record of an allowed request (the refusal's code is there). The outcome is queued
/// behind the answer: waited for, briefly.
fn outcome_code(d: &Daemon, r: &Resp) -> String {
    let t = Instant::now();
    loop {
        let found = d
            .audit()
            .iter()
            .find(|x| {
                x["entry"]["request_id"] == r.request_id.as_str() && x["entry"]["kind"] == "outcome"
            })
            .map(|x| x["entry"]["code"].as_str().unwrap_or("").to_string());
        match found {
            Some(code) => return code,
            None if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => return String::new(),
        }
    }
}

/// The file process `pid` runs (as it was named when it started: a binary rebuilt since shows
/// as `PATH (deleted)`).
fn exe(pid: u64) -> PathBuf {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let s = p.display().to_string();
    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
}

struct KeeperGuard(PathBuf);

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        kill_keeper(&self.0);
    }
}

#[test]
fn deploy_release_live_updates_the_hypervisor_and_refuses_bad_releases() {
    let test = "deploy_release_live_updates_the_hypervisor_and_refuses_bad_releases";
    if !can_boot_with(
        test,
        &[
            "bulkhead-hypervisor",
            "bulkhead-blockcard",
            "bulkhead-netcard",
        ],
    ) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let _ = host_key(dir.path());
    // The release trust root pinned on this host: 3 release keys, any 2 sign.
    let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
    std::fs::write(
        dir.path().join("release-root.json"),
        serde_json::to_vec(&root).unwrap(),
    )
    .unwrap();
    let _guard = KeeperGuard(dir.path().join("run"));
    let guest = guest_dir().display().to_string();
    let d = Daemon::start_with(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
    );

    // 0. The operator's token (no deployer role) is refused before the guest even boots.
    let bins = release_dir();
    let configured_hv = bins.join("bulkhead-hypervisor").canonicalize().unwrap();
    // The release's files, copied once (a rebuild meanwhile changes nothing here).
    let src = dir.path().join("release-src");
    std::fs::create_dir_all(&src).unwrap();
    for n in ["bulkhead-hypervisor", "bulkhead-netcard"] {
        std::fs::copy(bins.join(n), src.join(n)).unwrap();
    }
    let hv = src.join("bulkhead-hypervisor");
    // A card binary rides along: installed and recorded, not applied (the unstripped controller
    // and block card are over the 64 MiB artefact cap; release builds are stripped).
    let card = src.join("bulkhead-netcard");
    let good = release(2, &[&hv, &card], &[&keys[0], &keys[2]]);
    let r = deploy(&d, "operator", &[Operation::DescribeHost], &good);
    assert_eq!(r.status, 403);
    assert_denied_and_audited(&d, &r, "deployer_only");

    let script = "i=0\nB=$(cat /proc/sys/kernel/random/boot_id)\n\
                  while [ $i -lt 100000 ]; do\n i=$((i+1))\n echo CNT=$i BOOT=$B END\n sleep 1\ndone\n";
    let create = serde_json::json!({
        "instance_id": "i-dep", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
        "user_data": script,
    });
    customer(&d, "POST", "/v1/instances", &create.to_string());
    customer(&d, "POST", "/v1/instances/i-dep/start", "");
    wait_for("the counter", boot_timeout(), || counts(&d).len() >= 3);
    let booted = Instant::now();
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();
    let old_pid = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .find(|p| exe(*p) == configured_hv)
        .expect("the guest's hypervisor");

    // 1. A good release: uploaded, deployed, the hypervisor moved to the installed binary.
    upload(&d, &[&hv, &card]);
    let t_deploy = Instant::now();
    let r = deploy(&d, "deployer", DEPLOY_OPS, &good);
    let deploy_ms = t_deploy.elapsed().as_millis();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json["version"], 2);
    let moved = r.json["moved"].as_array().unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["old_pid"], old_pid);
    let new_pid = moved[0]["new_pid"].as_u64().unwrap();
    let pause_us = moved[0]["pause_us"].as_u64().unwrap();
    let installed = dir.path().join("releases/v2/bulkhead-hypervisor");
    assert_eq!(exe(new_pid), installed.canonicalize().unwrap());
    assert_eq!(
        r.json["hypervisor"].as_str().map(PathBuf::from),
        Some(installed.canonicalize().unwrap())
    );
    wait_for(
        "the old hypervisor to exit",
        Duration::from_secs(20),
        || !alive(old_pid),
    );
    // The card binary is installed with it (recorded, not applied).
    assert_eq!(
        std::fs::read(dir.path().join("releases/v2/bulkhead-netcard")).unwrap(),
        std::fs::read(&card).unwrap()
    );
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    let at = counts(&d).last().unwrap().0;
    wait_for(
        "counting on the new hypervisor",
        Duration::from_secs(30),
        || counts(&d).last().unwrap().0 >= at + 3,
    );
    eprintln!(
        "deployed v2 in {deploy_ms} ms; guest pause {pause_us} us; pid {old_pid} -> {new_pid}"
    );

    // 2. The controller is killed -9 and restarted: it adopts the live-updated hypervisor
    //    (started by the keeper, like any hypervisor) and keeps the active release from the
    //    host record (the downgrade below is refused against that floor).
    let mut d = d;
    d.kill9_controller_only();
    // It runs with the fault hook that kills the new process of its second live update (step 5).
    let d = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "live_update:second:new_dies")],
    );
    assert!(children_of(keeper).contains(&i32::try_from(new_pid).unwrap()));
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "AdoptInstance"
        && x["entry"]["resources"][0] == "instance:i-dep"
        && x["entry"]["code"] == "ok"));

    // 3. Refusals, each typed and audited; nothing moves.
    let unsigned = release(3, &[&hv], &[]);
    let one_of_three = release(3, &[&hv], &[&keys[1]]);
    let downgrade = release(1, &[&hv], &[&keys[0], &keys[1]]);
    let broken_dir = dir.path().join("broken");
    std::fs::create_dir_all(&broken_dir).unwrap();
    let broken = broken_dir.join("bulkhead-hypervisor");
    std::fs::write(&broken, b"#!/bin/sh\necho self-test fails >&2\nexit 1\n").unwrap();
    upload(&d, &[&broken]);
    let fails_self_test = release(4, &[&broken], &[&keys[1], &keys[2]]);
    for (what, signed, status, code) in [
        ("unsigned", &unsigned, 403, "release_unsigned"),
        ("1 of 3", &one_of_three, 403, "release_too_few_signatures"),
        ("downgrade", &downgrade, 409, "release_rollback"),
        (
            "self-test",
            &fails_self_test,
            422,
            "release_self_test_failed",
        ),
    ] {
        let r = deploy(&d, "deployer", DEPLOY_OPS, signed);
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), code, "{what}");
        assert_eq!(outcome_code(&d, &r), code, "{what}: not audited");
        assert!(alive(new_pid), "{what}: the hypervisor died");
    }
    // The self-test ran on the installed (correctly signed) release and is its own record.
    assert!(d.audit().iter().any(|x| {
        x["entry"]["op"] == "DeployRelease:self-test"
            && x["entry"]["code"] == "release_self_test_failed"
            && x["entry"]["resources"][0] == "release:v4"
    }));
    let r = deploy(&d, "operator", &[Operation::DescribeHost], &good);
    assert_denied_and_audited(&d, &r, "deployer_only");
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    assert_eq!(exe(new_pid), installed.canonicalize().unwrap());

    // 4. A new instance starts the active release's hypervisor (this controller learnt it from
    //    the host record); it is terminated at once (its guest need not finish booting).
    let create = serde_json::json!({
        "instance_id": "i-new", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
    });
    customer(&d, "POST", "/v1/instances", &create.to_string());
    customer(&d, "POST", "/v1/instances/i-new/start", "");
    let fresh: Vec<u64> = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .filter(|p| *p != new_pid && alive(*p))
        .filter(|p| exe(*p) == installed.canonicalize().unwrap())
        .collect();
    assert_eq!(fresh.len(), 1, "the new instance's hypervisor: {fresh:?}");

    // 5. A good release v3 whose live update fails on the second instance (its new process
    //    dies before the hand-over): refused, and the first instance's hypervisor, already on
    //    v3, is moved back to v2; both guests keep their hypervisors' releases, the record v2.
    let v3 = release(3, &[&hv], &[&keys[0], &keys[1]]);
    let r = deploy(&d, "deployer", DEPLOY_OPS, &v3);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "release_live_update_failed");
    assert_eq!(outcome_code(&d, &r), "release_live_update_failed");
    let audited = |op: &str, inst: &str, ok: bool| {
        d.audit().iter().any(|x| {
            x["entry"]["op"] == op
                && x["entry"]["resources"][0] == "release:v3"
                && x["entry"]["resources"][1] == format!("instance:{inst}").as_str()
                && (x["entry"]["code"] == "ok") == ok
        })
    };
    assert!(audited("DeployRelease:live-update", "i-dep", true));
    assert!(audited("DeployRelease:live-update", "i-new", false));
    assert!(audited("DeployRelease:roll-back", "i-dep", true));
    let on_v2: Vec<u64> = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .filter(|p| alive(*p) && exe(*p) == installed.canonicalize().unwrap())
        .collect();
    assert_eq!(on_v2.len(), 2, "both hypervisors on v2: {on_v2:?}");
    assert!(
        on_v2.contains(&fresh[0]),
        "the second instance's hypervisor moved"
    );
    assert!(
        !on_v2.contains(&new_pid),
        "the first instance's v2 process still runs"
    );
    assert!(!children_of(keeper).into_iter().any(|p| {
        u64::try_from(p).is_ok_and(|p| alive(p) && exe(p).to_string_lossy().contains("/v3/"))
    }));
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    customer(&d, "POST", "/v1/instances/i-new/terminate", "");

    // 6. A controller that dies right after a hand-over, before it records the outcome (fault
    //    hook `live_update:after_handover:exit`): the next one adopts the new process, which
    //    runs the guest (the update was recorded as in flight before the hand-over).
    let mut d = d;
    d.kill9_controller_only();
    let mut d3 = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "live_update:after_handover:exit")],
    );
    let v4 = release(4, &[&hv], &[&keys[0], &keys[1]]);
    let body = serde_json::json!({ "release": v4 }).to_string();
    let t = d3.mint("deployer", HOST, DEPLOY_OPS, MIN10);
    let r = d3
        .client("deployer")
        .request("POST", "/v1/host/releases", Some(&t), body.as_bytes());
    assert!(r.is_err(), "the controller answered: {r:?}");
    assert_eq!(d3.child.wait().unwrap().code(), Some(70));
    d3.kill9_controller_only();
    let d = Daemon::start_with(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
    );
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "AdoptInstance"
        && x["entry"]["resources"][0] == "instance:i-dep"
        && x["entry"]["code"] == "live_update_completed"));
    let v4_bin = dir.path().join("releases/v4/bulkhead-hypervisor");
    let on_v4: Vec<u64> = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .filter(|p| alive(*p) && exe(*p) == v4_bin.canonicalize().unwrap())
        .collect();
    assert_eq!(
        on_v4.len(),
        1,
        "the guest's hypervisor after adoption: {on_v4:?}"
    );
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(
        rec.contains(&format!(r#""hypervisor_pid":{}"#, on_v4[0])),
        "{rec}"
    );
    assert!(!rec.contains("hypervisor_update"), "{rec}");

    // 7. The guest kept counting on one boot the whole time.
    let at = counts(&d).last().unwrap().0;
    wait_for(
        "counting after the refusals",
        Duration::from_secs(30),
        || counts(&d).last().unwrap().0 >= at + 2,
    );
    let c = counts(&d);
    assert_never_rebooted(&c);
    assert_eq!(c[0].0, 1);
    eprintln!(
        "guest counted {} on one boot (boot id {}) through the deploy, a controller restart, 5 refusals, a rolled-back deploy and a controller dying mid-update; {:.0?} after its boot",
        c.len(),
        c[0].1,
        booted.elapsed()
    );
    for step in [
        "verified",
        "install",
        "self-test",
        "live-update",
        "activate",
    ] {
        assert!(
            d.audit().iter().any(
                |x| x["entry"]["op"] == format!("DeployRelease:{step}").as_str()
                    && x["entry"]["code"] == "ok"
            ),
            "no audited {step}"
        );
    }
    customer(&d, "POST", "/v1/instances/i-dep/terminate", "");
    drop(d);
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    eprintln!("{test}: {:.1?}", t0.elapsed());
}
