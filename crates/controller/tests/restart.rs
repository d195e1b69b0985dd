//! The controller is restartable: a guest counting on its console and on its encrypted disk
//! keeps running, untouched, while its controller is killed -9, while a restarted controller is
//! killed in the middle of its adoption, and while controllers refuse a corrupted or
//! unknown-version host record; the controller that finally starts adopts the same hypervisor
//! process and card, reads the whole console (no gap in the counter), answers DescribeInstance,
//! detaches and attaches volumes, terminates the instance, and the audit chain verifies across
//! every restart.
//!
//! Real processes throughout: the controller binary (dev mode, `--backend host`), its keeper,
//! `bulkhead-hypervisor` and `bulkhead-blockcard`, the test guest under /dev/kvm. Needs what
//! `tests/host_backend.rs` needs; without it, a loud skip (`make test` turns it into a failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bulkhead_sealing::{seal_volume_key, HostKey};
use bulkhead_tokens::Operation;
use common::*;

const CUSTOMER_OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::DescribeInstance,
    Operation::StartInstance,
    Operation::StopInstance,
    Operation::TerminateInstance,
    Operation::AttachVolume,
    Operation::DetachVolume,
    Operation::GetConsole,
    Operation::AttachNetwork,
    Operation::SetNetworkRules,
];

fn can_boot(test: &str) -> bool {
    can_boot_with(
        test,
        &[
            "bulkhead-hypervisor",
            "bulkhead-blockcard",
            "bulkhead-netcard",
        ],
    )
}

fn host_args() -> Vec<String> {
    // A port range of its own per run for net cards (tests may run side by side).
    let base = 20000 + (std::process::id() % 20000);
    vec![
        "--backend".into(),
        "host".into(),
        "--guest-dir".into(),
        guest_dir().display().to_string(),
        "--net-host-ip".into(),
        "127.0.0.1".into(),
        "--net-port-base".into(),
        base.to_string(),
    ]
}

/// The count the guest last wrote to sector 0 of its disk, read from the backing file and
/// decrypted with the volume key (AES-256-XTS, tweak = sector number): no controller needed.
fn disk_count(backing: &Path, seed: u8) -> Option<u64> {
    use bulkhead_blockcard::xts::{CryptoSectorSize, XtsCipher};
    let data = std::fs::read(backing).ok()?;
    let mut sector = data.get(..512)?.to_vec();
    XtsCipher::new(&volume_key(seed), CryptoSectorSize::S512)
        .ok()?
        .decrypt(&mut sector, 0)
        .ok()?;
    let digits: String = sector
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| char::from(*b))
        .collect();
    digits.parse().ok()
}

fn sealed_b64(host: &HostKey, volume: &str, seed: u8) -> String {
    let k = volume_key(seed);
    let blob = seal_volume_key(host.public(), volume, &k).unwrap();
    base64::engine::general_purpose::STANDARD.encode(blob)
}

fn call(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let t = d.mint("customer", HOST, CUSTOMER_OPS, MIN10);
    d.client("customer")
        .request(method, path, Some(&t), body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn ok(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let r = call(d, method, path, body);
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r
}

fn console(d: &Daemon, id: &str) -> String {
    ok(d, "GET", &format!("/v1/instances/{id}/console"), "").json["output"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `(counter, disk readback)` of every complete `CNT=<n> DISK=<m>` line.
fn counts(out: &str) -> Vec<(u64, Option<u64>)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("CNT=")?;
            let (n, disk) = rest.split_once(" DISK=")?;
            let disk = disk.strip_suffix(" END")?;
            Some((n.parse().ok()?, disk.trim().parse().ok()))
        })
        .collect()
}

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// The keeper's children whose command line contains `what`.
fn kept(keeper: i32, what: &str) -> Vec<i32> {
    children_of(keeper)
        .into_iter()
        .filter(|p| alive(*p) && cmdline(*p).contains(what))
        .collect()
}

/// Starts a controller that is expected to stop before its ready line; returns its exit code
/// and stderr.
fn start_expecting_exit(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(controller_bin())
        .args(["--dev", "--state-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(host_args())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Everything of issue 14's first part on one boot (see the module docs).
#[test]
fn a_running_guest_survives_controller_restarts_and_is_adopted() {
    if !can_boot("a_running_guest_survives_controller_restarts_and_is_adopted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    // Whatever happens, the keeper and its children go with the test.
    let _guard = KeeperGuard(dir.path().join("run"));
    let args = host_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d1 = Daemon::start_with(dir.path(), &args);
    let keeper = i32::try_from(d1.ready["keeper_pid"].as_u64().expect("keeper pid")).unwrap();

    // The guest counts once a second, writes each count to its encrypted disk (through the
    // block card), reads it back and prints both.
    let script = "i=0\nwhile [ $i -lt 100000 ]; do\n i=$((i+1))\n \
                  if [ -b /dev/vda ]; then echo $i | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
                  R=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -n 1); else R=none; fi\n \
                  echo CNT=$i DISK=$R END\n sleep 1\ndone\n";
    let create = serde_json::json!({
        "instance_id": "i-count", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
        "user_data": script,
        "network": {"vpc": 7, "card_id": 1, "mac": "02:00:00:00:01:05", "ip": "10.0.1.5",
                    "prefix": 24, "allow": ["tcp:7000:10.0.0.0/16"], "routes": []},
    });
    ok(&d1, "POST", "/v1/instances", &create.to_string());
    // A VPC interface on its net card, the epoch key sealed to this host as the KMS seals it.
    let mut epoch_key = [0u8; 32];
    bulkhead_sealing::fill_random(&mut epoch_key).unwrap();
    let sealed = hex::encode(
        bulkhead_netcard::control::seal_epoch_key(
            host.public(),
            bulkhead_netcard::encap::VpcId(7),
            bulkhead_netcard::encap::KeyEpoch(1),
            &epoch_key,
        )
        .unwrap(),
    );
    let r = ok(
        &d1,
        "POST",
        "/v1/instances/i-count/network",
        &serde_json::json!({"epoch": 1, "sealed_epoch_key": sealed}).to_string(),
    );
    let endpoint = r.json["net_endpoint"].as_str().unwrap().to_string();
    let attach = |d: &Daemon, vol: &str, seed: u8| {
        let body =
            serde_json::json!({"volume_id": vol, "sealed_key": sealed_b64(&host, vol, seed)});
        ok(
            d,
            "POST",
            "/v1/instances/i-count/volumes",
            &body.to_string(),
        );
    };
    attach(&d1, "vol-count", 1);
    ok(&d1, "POST", "/v1/instances/i-count/start", "");
    wait_for("the counter", boot_timeout(), || {
        counts(&console(&d1, "i-count")).len() >= 3
    });
    let before = counts(&console(&d1, "i-count"));
    eprintln!("counting before the kill: {:?}", before.last());
    assert!(
        before.iter().all(|(n, disk)| *disk == Some(*n)),
        "disk readback differs: {before:?}"
    );
    let hv = kept(keeper, "bulkhead-hypervisor");
    let cards = kept(keeper, "bulkhead-blockcard");
    let nets = kept(keeper, "bulkhead-netcard");
    assert_eq!(
        (hv.len(), cards.len(), nets.len()),
        (1, 1, 1),
        "hv {hv:?} cards {cards:?} net {nets:?}"
    );
    let (hv, card, net) = (hv[0], cards[0], nets[0]);

    // 1. kill -9 the controller: the keeper, the hypervisor and the card keep running.
    d1.kill9_controller_only();
    let last_before = before.last().unwrap().0;
    // With no controller at all, the guest goes on writing counts to its encrypted disk.
    let backing = dir.path().join("volumes/vol-count.img");
    wait_for("a new count on the disk", Duration::from_secs(180), || {
        disk_count(&backing, 1).is_some_and(|n| n > last_before + 1)
    });
    eprintln!(
        "no controller: the disk holds count {:?}",
        disk_count(&backing, 1)
    );
    assert!(
        alive(keeper) && alive(hv) && alive(card) && alive(net),
        "a child died with the controller"
    );
    let record = dir.path().join("host-record");
    let good = std::fs::read(&record).unwrap();

    // 2. A record of an unknown version, then a corrupted one: refused, typed, nothing killed.
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(&record, text.replacen(" v1 ", " v9 ", 1)).unwrap();
    let (code, err) = start_expecting_exit(dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("host record is version 9; this controller reads version 1 only"),
        "{err}"
    );
    let mut bad = good.clone();
    let at = bad.len() - 3;
    bad[at] ^= 0x04;
    std::fs::write(&record, &bad).unwrap();
    let (code, err) = start_expecting_exit(dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(
        alive(keeper) && alive(hv) && alive(card) && alive(net),
        "a refused record killed a child"
    );
    std::fs::write(&record, &good).unwrap();

    // 3. A controller killed in the middle of its adoption (held there by its fault hook).
    let log = dir.path().join("stalled.log");
    let mut stalled = Command::new(controller_bin())
        .args(["--dev", "--state-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .args(host_args())
        .env("RUST_LOG", "warn")
        .env("BULKHEAD_FAULT", "adopt:after_first:stall")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the adoption fault hook", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("fault hook: stalling mid-adoption")
    });
    let _ = stalled.kill();
    let _ = stalled.wait();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        alive(keeper) && alive(hv) && alive(card) && alive(net),
        "a child died mid-adoption"
    );

    // 4. The controller that adopts: same keeper, same hypervisor process, same card.
    let t = Instant::now();
    let d3 = Daemon::start_with(dir.path(), &args);
    let ready_ms = t.elapsed().as_millis();
    assert_eq!(
        d3.ready["keeper_pid"].as_u64(),
        Some(u64::try_from(keeper).unwrap())
    );
    assert_eq!(d3.ready["adopted"]["instances"], 1, "{}", d3.ready);
    eprintln!(
        "RESTART-BENCH instances=1 start_to_ready_ms={ready_ms} adopt_ms={}",
        d3.ready["adopted"]["adopt_ms"]
    );
    assert_eq!(kept(keeper, "bulkhead-hypervisor"), vec![hv]);
    assert_eq!(kept(keeper, "bulkhead-blockcard"), vec![card]);
    assert_eq!(kept(keeper, "bulkhead-netcard"), vec![net]);
    let desc = ok(&d3, "GET", "/v1/instances/i-count", "");
    assert_eq!(desc.json["state"], "running", "{}", desc.json);
    assert_eq!(desc.json["volumes"], serde_json::json!(["vol-count"]));
    assert_eq!(desc.json["net_endpoint"], endpoint.as_str());
    // The adopted net card answers the new controller (its control socket, through the keeper).
    ok(
        &d3,
        "PUT",
        "/v1/instances/i-count/network/rules",
        &serde_json::json!({"allow": ["tcp:7001:10.0.0.0/16"]}).to_string(),
    );

    // The whole console, through the new controller: the count went on with no gap or repeat
    // while no controller ran, and every count is on the disk.
    let at_adoption = counts(&console(&d3, "i-count")).last().unwrap().0;
    eprintln!("count {last_before} at the kill, {at_adoption} when adopted");
    assert!(
        at_adoption > last_before,
        "the guest did not count while no controller ran"
    );
    let t = Instant::now();
    let mut shown = Instant::now();
    wait_for("the counter to go on", Duration::from_secs(300), || {
        let c = console(&d3, "i-count");
        let last = counts(&c).last().map(|x| x.0);
        if shown.elapsed() > Duration::from_secs(20) {
            shown = Instant::now();
            let tail: String = c
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "after {:?}: last count {last:?}; console tail {tail:?}",
                t.elapsed()
            );
        }
        last.is_some_and(|n| n >= at_adoption + 3)
    });
    eprintln!("counter went on by 3 within {:?}", t.elapsed());
    let after = counts(&console(&d3, "i-count"));
    let ns: Vec<u64> = after.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        ns,
        (1..=*ns.last().unwrap()).collect::<Vec<_>>(),
        "gap or repeat"
    );
    assert!(
        after.iter().all(|(n, disk)| *disk == Some(*n)),
        "disk readback differs: {after:?}"
    );
    // The guest never rebooted: one ready marker.
    let out = console(&d3, "i-count");
    assert_eq!(out.matches("BULKHEAD-GUEST-READY").count(), 1, "{out}");

    // 5. The new controller drives it: detach (hot-unplug), attach another volume (hot-plug).
    ok(&d3, "DELETE", "/v1/instances/i-count/volumes/vol-count", "");
    wait_for("the card to exit", Duration::from_secs(30), || !alive(card));
    wait_for(
        "the guest to lose its disk",
        Duration::from_secs(60),
        || console(&d3, "i-count").contains("DISK=none END"),
    );
    attach(&d3, "vol-two", 2);
    let n0 = counts(&console(&d3, "i-count")).last().unwrap().0;
    wait_for("counts on the new disk", Duration::from_secs(120), || {
        counts(&console(&d3, "i-count"))
            .iter()
            .any(|(n, disk)| *n > n0 && *disk == Some(*n))
    });
    let desc = ok(&d3, "GET", "/v1/instances/i-count", "");
    assert_eq!(desc.json["volumes"], serde_json::json!(["vol-two"]));

    // 6. Terminate: the adopted hypervisor and the new card go; the keeper stays for the
    // controller.
    ok(&d3, "POST", "/v1/instances/i-count/terminate", "");
    wait_for("the hypervisor to exit", Duration::from_secs(30), || {
        !alive(hv)
    });
    assert!(kept(keeper, "bulkhead-").is_empty());

    // 7. One audit chain across all four controllers, with the adoption in it.
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    let recs = d3.audit();
    let adopt: Vec<_> = recs
        .iter()
        .filter(|r| r["entry"]["op"] == "AdoptInstance")
        .collect();
    assert_eq!(adopt.len(), 1, "{adopt:?}");
    assert_eq!(adopt[0]["entry"]["code"], "ok");
    assert_eq!(adopt[0]["entry"]["resources"][0], "instance:i-count");
    let starts = recs
        .iter()
        .filter(|r| r["entry"]["op"] == "ControllerStart")
        .count();
    assert!(starts >= 3, "{starts} ControllerStart records");
    for op in ["AttachVolume", "DetachVolume", "TerminateInstance"] {
        assert!(
            recs.iter().any(|r| r["entry"]["op"] == op),
            "no {op} record"
        );
    }

    // 8. With nothing left to keep, the keeper exits with its controller.
    let mut d3 = d3;
    d3.kill9_controller_only();
    wait_for("the keeper to exit", Duration::from_secs(10), || {
        !alive(keeper)
    });
}

/// Kills the keeper of a run directory (and its children) when dropped.
struct KeeperGuard(PathBuf);

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        kill_keeper(&self.0);
    }
}

/// `make bench` (scripts/bench-controller-restart.sh): controller restart → every instance
/// adopted. `BULKHEAD_BENCH_INSTANCES` instances (default 2: one vCPU each, as many as this two-core
/// host has room for), each a created VM (a running
/// hypervisor process, not booted: adoption does not depend on what the guest does) with one
/// encrypted volume on its block card; the controller is killed -9 and restarted
/// `BULKHEAD_BENCH_ROUNDS` times (default 20). Prints one `RESTART-BENCH` line per round: the
/// new process's start to its ready line (which follows adoption) and the adoption alone.
#[test]
#[ignore = "benchmark: run by scripts/bench-controller-restart.sh"]
fn bench_controller_restart_adopts_every_instance() {
    if !can_boot("bench_controller_restart_adopts_every_instance") {
        return;
    }
    let n: usize = std::env::var("BULKHEAD_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rounds: usize = std::env::var("BULKHEAD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let args = host_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_with(dir.path(), &args);
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();
    for k in 0..n {
        let id = format!("i-b{k}");
        let vol = format!("vol-b{k}");
        let create = serde_json::json!({
            "instance_id": id, "image": "test-guest", "vcpus": 1, "memory_mib": 64,
        });
        ok(&d, "POST", "/v1/instances", &create.to_string());
        let body = serde_json::json!({"volume_id": vol, "sealed_key": sealed_b64(&host, &vol, 9)});
        ok(
            &d,
            "POST",
            &format!("/v1/instances/{id}/volumes"),
            &body.to_string(),
        );
    }
    let hvs = kept(keeper, "bulkhead-hypervisor");
    assert_eq!(hvs.len(), n);
    for round in 0..rounds {
        d.kill9_controller_only();
        let t = Instant::now();
        d = Daemon::start_with(dir.path(), &args);
        let ready_ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(d.ready["adopted"]["instances"], n, "{}", d.ready);
        eprintln!(
            "RESTART-BENCH round={round} instances={n} start_to_ready_ms={ready_ms:.1} adopt_ms={}",
            d.ready["adopted"]["adopt_ms"]
        );
        assert_eq!(kept(keeper, "bulkhead-hypervisor"), hvs);
    }
    for k in 0..n {
        ok(&d, "POST", &format!("/v1/instances/i-b{k}/terminate"), "");
    }
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
}

/// Reconciliation without a guest boot: while no controller runs, one instance's hypervisor and
/// another's block card are killed -9. The next controller adopts both instances, audits what it
/// found (`hypervisor_gone`, `card_gone`), reports the first `stopped` (StartInstance boots it
/// afresh, its volume re-plugged from the card that kept running) and the second without the
/// volume whose card died. A second controller on the same host while one runs is refused.
#[test]
fn children_that_died_meanwhile_are_reconciled() {
    if !can_boot("children_that_died_meanwhile_are_reconciled") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let args = host_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_with(dir.path(), &args);
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();
    for k in ["a", "b"] {
        let create = serde_json::json!({
            "instance_id": format!("i-{k}"), "image": "test-guest", "vcpus": 1, "memory_mib": 64,
        });
        ok(&d, "POST", "/v1/instances", &create.to_string());
        let vol = format!("vol-{k}");
        let body = serde_json::json!({"volume_id": vol, "sealed_key": sealed_b64(&host, &vol, 3)});
        ok(
            &d,
            "POST",
            &format!("/v1/instances/i-{k}/volumes"),
            &body.to_string(),
        );
    }
    // A second controller while this one runs: refused before it touches anything.
    let (code, err) = start_expecting_exit(dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("held by another running controller"), "{err}");

    let hvs = kept(keeper, "bulkhead-hypervisor");
    let card_b: Vec<i32> = kept(keeper, "vol-b.img");
    let card_a: Vec<i32> = kept(keeper, "vol-a.img");
    assert_eq!((hvs.len(), card_a.len(), card_b.len()), (2, 1, 1));
    // Which hypervisor is i-a's: the first one started.
    let hv_a = *hvs.iter().min().unwrap();
    d.kill9_controller_only();
    for p in [hv_a, card_b[0]] {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    let mut d = Daemon::start_with(dir.path(), &args);
    assert_eq!(d.ready["adopted"]["instances"], 2, "{}", d.ready);
    let recs = d.audit();
    let code_of = |id: &str| {
        recs.iter()
            .find(|r| {
                r["entry"]["op"] == "AdoptInstance"
                    && r["entry"]["resources"][0] == format!("instance:{id}")
            })
            .map(|r| r["entry"]["code"].as_str().unwrap().to_string())
    };
    assert_eq!(code_of("i-a").as_deref(), Some("hypervisor_gone"));
    assert_eq!(code_of("i-b").as_deref(), Some("card_gone"));
    let a = ok(&d, "GET", "/v1/instances/i-a", "");
    assert_eq!(a.json["state"], "stopped", "{}", a.json);
    assert_eq!(a.json["volumes"], serde_json::json!(["vol-a"]));
    let b = ok(&d, "GET", "/v1/instances/i-b", "");
    assert_eq!(b.json["volumes"], serde_json::json!([]), "{}", b.json);
    assert_eq!(kept(keeper, "vol-a.img"), card_a, "i-a's card kept running");
    // i-a boots afresh on a new hypervisor, its volume re-plugged from the same card.
    ok(&d, "POST", "/v1/instances/i-a/start", "");
    let a = ok(&d, "GET", "/v1/instances/i-a", "");
    assert_eq!(a.json["state"], "running", "{}", a.json);
    let now = kept(keeper, "bulkhead-hypervisor");
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&hv_a));
    for k in ["a", "b"] {
        ok(&d, "POST", &format!("/v1/instances/i-{k}/terminate"), "");
    }
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    d.kill9_controller_only();
    wait_for("the keeper to exit", Duration::from_secs(10), || {
        !alive(keeper)
    });
}

/// A controller killed -9 in the middle of an AttachVolume (held by its fault hook right after
/// the block card keyed the volume, before the disk is plugged): the keeper kills the card that
/// holds the key (it was never in the host record) and keeps the instance's hypervisor; the next
/// controller undoes the attach it never acknowledged (`attach_rolled_back`), the instance is
/// there without the volume, and the volume attaches again.
#[test]
fn an_unacknowledged_attach_is_rolled_back_on_restart() {
    if !can_boot("an_unacknowledged_attach_is_rolled_back_on_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let args = host_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_env(
        dir.path(),
        &args,
        &[("BULKHEAD_FAULT", "attach:after_card_keyed:stall")],
    );
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();
    let create = serde_json::json!({
        "instance_id": "i-mid", "image": "test-guest", "vcpus": 1, "memory_mib": 64,
    });
    ok(&d, "POST", "/v1/instances", &create.to_string());
    let hv = kept(keeper, "bulkhead-hypervisor");
    assert_eq!(hv.len(), 1);
    let body =
        serde_json::json!({"volume_id": "vol-mid", "sealed_key": sealed_b64(&host, "vol-mid", 5)})
            .to_string();
    let token = d.mint("customer", HOST, CUSTOMER_OPS, MIN10);
    let client = d.client("customer");
    let attach = std::thread::spawn(move || {
        client.request(
            "POST",
            "/v1/instances/i-mid/volumes",
            Some(&token),
            body.as_bytes(),
        )
    });
    // The card is keyed and the controller is held before the plug.
    wait_for("the keyed card", Duration::from_secs(60), || {
        kept(keeper, "vol-mid.img").len() == 1
    });
    let card = kept(keeper, "vol-mid.img")[0];
    // The card answers `Attached` after keying; the hook then holds the attach before the plug,
    // where a hot-plug waits for the guest: with the instance's operation slot, not its lock.
    // A moment for the reply to arrive; then the attach is held there until the kill below.
    std::thread::sleep(Duration::from_secs(2));
    // Meanwhile the same instance is described, its console read and a Stop answered (refused:
    // it never started) at once; a second attach to it waits for the slot and starts no card.
    let t0 = std::time::Instant::now();
    let desc = ok(&d, "GET", "/v1/instances/i-mid", "");
    assert_eq!(desc.json["state"], "created", "{}", desc.json);
    assert_eq!(desc.json["volumes"], serde_json::json!([]));
    console(&d, "i-mid");
    let stop = call(&d, "POST", "/v1/instances/i-mid/stop", "");
    assert_eq!(stop.status, 409, "{}", String::from_utf8_lossy(&stop.body));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "calls on the instance waited for the pending attach: {:?}",
        t0.elapsed()
    );
    let body2 =
        serde_json::json!({"volume_id": "vol-two", "sealed_key": sealed_b64(&host, "vol-two", 5)})
            .to_string();
    let token2 = d.mint("customer", HOST, CUSTOMER_OPS, MIN10);
    let client2 = d.client("customer");
    let second = std::thread::spawn(move || {
        client2.request(
            "POST",
            "/v1/instances/i-mid/volumes",
            Some(&token2),
            body2.as_bytes(),
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        kept(keeper, "vol-two.img").is_empty(),
        "a second attach ran beside the pending one"
    );
    d.kill9_controller_only();
    let r = attach.join().unwrap();
    let r2 = second.join().unwrap();
    assert!(
        r2.as_ref().map_or(true, |r| r.status >= 500),
        "the queued attach was acknowledged: {r2:?}"
    );
    assert!(
        r.as_ref().map_or(true, |r| r.status >= 500),
        "the interrupted attach was acknowledged: {r:?}"
    );
    // The key-holding card dies with the controller; the hypervisor does not.
    wait_for(
        "the unrecorded card to die",
        Duration::from_secs(10),
        || !alive(card),
    );
    assert_eq!(kept(keeper, "bulkhead-hypervisor"), hv);

    let d = Daemon::start_with(dir.path(), &args);
    let rolled = d
        .audit()
        .into_iter()
        .find(|r| r["entry"]["op"] == "AdoptInstance")
        .map(|r| r["entry"]["code"].as_str().unwrap().to_string());
    assert_eq!(rolled.as_deref(), Some("attach_rolled_back"));
    let desc = ok(&d, "GET", "/v1/instances/i-mid", "");
    assert_eq!(desc.json["state"], "created", "{}", desc.json);
    assert_eq!(desc.json["volumes"], serde_json::json!([]));
    assert_eq!(kept(keeper, "bulkhead-hypervisor"), hv);
    // The volume attaches again (a fresh card).
    let body =
        serde_json::json!({"volume_id": "vol-mid", "sealed_key": sealed_b64(&host, "vol-mid", 5)});
    ok(&d, "POST", "/v1/instances/i-mid/volumes", &body.to_string());
    let desc = ok(&d, "GET", "/v1/instances/i-mid", "");
    assert_eq!(desc.json["volumes"], serde_json::json!(["vol-mid"]));
    ok(&d, "POST", "/v1/instances/i-mid/terminate", "");
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
}
