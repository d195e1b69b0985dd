//! VPC interfaces end to end on one host: the real controller (`--backend host`) starts two
//! real guests, each with a real `bulkhead-netcard vhost` card launched by its launcher with a
//! sealed VPC epoch key and plugged in before boot (cold). The guests get DHCP leases from their
//! cards; guest 1 sends a marker over TCP to guest 2 through the sealed tunnel, guest 2 prints
//! it. Then the receiver's card is killed -9: the controller restarts it and the new card takes
//! over the running guest's NIC in place (`ReconnectNet`), so the sender's later messages
//! arrive again without a new NIC or a second DHCP. A second test (no boot needed) covers the card's lifecycle: the per-interface counters in
//! /v1/metrics, a card killed -9 restarted by the controller (audited, same port, current
//! routes), and terminate reaping every card and leaving no sealed key on disk.
//!
//! Needs /dev/kvm, the test guest with networking in `target/guest` and the release binaries of
//! the hypervisor and the net card next to the controller's (else `*** SKIPPED`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_netcard::control::seal_epoch_key;
use bulkhead_netcard::encap::{KeyEpoch, VpcId};
use bulkhead_tokens::Operation;
use common::*;

const MARK: &str = "VPCMARK-4c1e9a";

const OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::DescribeInstance,
    Operation::StartInstance,
    Operation::TerminateInstance,
    Operation::GetConsole,
    Operation::AttachNetwork,
    Operation::SetNetworkRoutes,
    Operation::SetNetworkRules,
];

fn can_run(test: &str) -> bool {
    can_boot_with(test, &["bulkhead-hypervisor", "bulkhead-netcard"])
}

struct Api<'a> {
    d: &'a Daemon,
    c: Client,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: &str) -> Resp {
        let t = self.d.mint("customer", HOST, OPS, MIN10);
        self.c
            .request(method, path, Some(&t), body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> Resp {
        let r = self.call(method, path, body);
        assert!(
            r.status == 200 || r.status == 201,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r
    }

    fn console(&self, id: &str) -> String {
        let r = self.ok("GET", &format!("/v1/instances/{id}/console"), "");
        r.json["output"].as_str().unwrap_or("").to_string()
    }
}

fn metrics(d: &Daemon) -> String {
    let t = d.mint("operator", HOST, &[Operation::GetMetrics], MIN10);
    let r = d
        .client("operator")
        .request("GET", "/v1/metrics", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).to_string()
}

/// Live (non-zombie) net card pids whose command line names `needle`.
fn netcard_pids(needle: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd =
                String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).to_string();
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (cmd.contains("bulkhead-netcard") && cmd.contains(needle) && !zombie).then_some(pid)
        })
        .collect()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < boot_timeout(), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn two_guests_in_one_vpc_talk_through_their_net_cards() {
    if !can_run("two_guests_in_one_vpc_talk_through_their_net_cards") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The release trust root pinned on this host (3 release keys, any 2 sign), for the deploy.
    let keys = host_with_release_root(dir.path());
    let host = host_key(dir.path());
    // A port range of its own per run (tests may run side by side).
    let base = 20000 + (std::process::id() % 20000) as u16;
    let g = guest_dir();
    let d = Daemon::start_with(
        dir.path(),
        &[
            "--backend",
            "host",
            "--guest-dir",
            g.to_str().unwrap(),
            "--net-host-ip",
            "127.0.0.1",
            "--net-port-base",
            &base.to_string(),
        ],
    );
    let api = Api {
        d: &d,
        c: d.client("customer"),
    };

    // The VPC's epoch key, sealed to this host as the KMS's SealVpcKey does.
    let mut epoch_key = [0u8; 32];
    bulkhead_sealing::fill_random(&mut epoch_key).unwrap();
    let sealed =
        hex::encode(seal_epoch_key(host.public(), VpcId(7), KeyEpoch(1), &epoch_key).unwrap());

    let guests = [
        (
            "i-send",
            1,
            "10.0.1.5",
            "02:00:00:00:01:05",
            format!(
                "echo BOOT=$(cat /proc/sys/kernel/random/boot_id);i=0;until echo {MARK}|nc -w 10 10.0.1.6 7000;do i=$((i+1));[ $i -gt 60 ]&&break;sleep 1;done;echo SENT=$i;n=0;while :;do n=$((n+1));echo AFTER-$n|nc -w 5 10.0.1.6 7000;sleep 1;done"
            ),
        ),
        (
            "i-recv",
            2,
            "10.0.1.6",
            "02:00:00:00:01:06",
            // One connection at a time, each printed to the console.
            "echo BOOT=$(cat /proc/sys/kernel/random/boot_id);while :;do nc -l -p 7000;done"
                .to_string(),
        ),
    ];
    let mut endpoints = Vec::new();
    for (id, card, ip, mac, script) in &guests {
        let body = serde_json::json!({
            "instance_id": id, "image": "test-guest", "vcpus": 1, "memory_mib": 256,
            "user_data": script,
            "network": {"vpc": 7, "card_id": card, "mac": mac, "ip": ip, "prefix": 24,
                        "allow": ["tcp:7000:10.0.0.0/16", "icmp:10.0.0.0/16"], "routes": []},
        });
        api.ok("POST", "/v1/instances", &body.to_string());
        let r = api.ok(
            "POST",
            &format!("/v1/instances/{id}/network"),
            &serde_json::json!({"epoch": 1, "sealed_epoch_key": sealed}).to_string(),
        );
        let ep = r.json["net_endpoint"].as_str().unwrap().to_string();
        assert!(ep.starts_with("127.0.0.1:"), "{ep}");
        endpoints.push(ep);
    }
    assert_ne!(endpoints[0], endpoints[1]);
    // No sealed key file outlives a card's start.
    let run: Vec<String> = std::fs::read_dir(dir.path().join("run"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!run.iter().any(|f| f.ends_with(".sealed")), "{run:?}");
    assert!(run.iter().any(|f| f == "net-i-send.seq"), "{run:?}");
    // Each card learns where the other is.
    api.ok(
        "PUT",
        "/v1/instances/i-send/network/routes",
        &serde_json::json!({"routes": [format!("10.0.1.6=2@{}", endpoints[1])]}).to_string(),
    );
    api.ok(
        "PUT",
        "/v1/instances/i-recv/network/routes",
        &serde_json::json!({"routes": [format!("10.0.1.5=1@{}", endpoints[0])]}).to_string(),
    );
    let r = api.ok("GET", "/v1/instances/i-recv", "");
    assert_eq!(r.json["net_endpoint"], endpoints[1].as_str());

    api.ok("POST", "/v1/instances/i-recv/start", "");
    api.ok("POST", "/v1/instances/i-send/start", "");
    let started = Instant::now();
    loop {
        let recv = api.console("i-recv");
        if recv.lines().any(|l| l.trim() == MARK) {
            let send = api.console("i-send");
            eprintln!("marker delivered after {:?}", started.elapsed());
            assert!(recv.contains("BULKHEAD-NET-UP=10.0.1.6/24"), "{recv}");
            assert!(send.contains("BULKHEAD-NET-UP=10.0.1.5/24"), "{send}");
            break;
        }
        assert!(
            started.elapsed() < boot_timeout(),
            "no marker after {:?}\n--- i-recv:\n{recv}\n--- i-send:\n{}",
            started.elapsed(),
            api.console("i-send")
        );
        std::thread::sleep(Duration::from_secs(3));
    }

    // kill -9 the receiver's card: the controller restarts it and the new card takes over the
    // running guest's NIC in place (ReconnectNet): the sender's later messages arrive again,
    // with no new NIC and no second DHCP in the receiver (a re-plugged NIC would come up
    // unconfigured and nothing would arrive).
    let mine = format!("{}/net-i-recv", dir.path().join("run").display());
    let old = netcard_pids(&mine);
    assert_eq!(old.len(), 1, "{old:?}");
    let before = after(&api.console("i-recv"));
    // SAFETY: kill has no memory-safety preconditions; `old[0]` is a net card of this test.
    unsafe { libc::kill(old[0], libc::SIGKILL) };
    wait_until("net card restart", || {
        let now = netcard_pids(&mine);
        now.len() == 1 && now[0] != old[0]
    });
    arrive_again(&api, before, "the card restart");

    deploy_applies_the_net_card(&d, &api, &keys, dir.path(), &mine);

    for id in ["i-send", "i-recv"] {
        api.ok("POST", &format!("/v1/instances/{id}/terminate"), "");
    }
}

/// Lines the sender sent after the receiver got its marker, as the receiver printed them.
fn after(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.trim().starts_with("AFTER-"))
        .count()
}

/// Waits until the receiver printed three more of the sender's messages than `before`; then
/// checks it still has its one NIC, configured once (no re-plug, no second DHCP), and one boot.
fn arrive_again(api: &Api<'_>, before: usize, what: &str) {
    let t = Instant::now();
    loop {
        let recv = api.console("i-recv");
        if after(&recv) >= before + 3 {
            eprintln!("messages arrive again {:?} after {what}", t.elapsed());
            assert_eq!(recv.matches("BULKHEAD-NET-UP").count(), 1, "{recv}");
            assert!(!recv.contains("eth1"), "{recv}");
            assert_eq!(recv.matches("BOOT=").count(), 1, "{recv}");
            break;
        }
        assert!(
            t.elapsed() < boot_timeout(),
            "no message after {what} ({before} before)\n--- i-recv:\n{recv}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The audit records of `step` (`DeployRelease:<step>`) about `release:v<v>`: (instance, code).
fn deploy_steps(d: &Daemon, step: &str, v: u64) -> Vec<(String, String)> {
    d.audit()
        .iter()
        .filter(|x| {
            x["entry"]["op"] == format!("DeployRelease:{step}").as_str()
                && x["entry"]["resources"][0] == format!("release:v{v}").as_str()
        })
        .map(|x| {
            (
                x["entry"]["resources"][1]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                x["entry"]["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// GetHealth's net cards: (instance, pid, release).
fn health_net_cards(d: &Daemon) -> Vec<(String, u64, Option<u64>)> {
    let mut v: Vec<_> = health(d)["net_cards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["instance_id"].as_str().unwrap().to_string(),
                c["pid"].as_u64().unwrap(),
                c["release"].as_u64(),
            )
        })
        .collect();
    v.sort();
    v
}

/// DeployRelease with a net card, on the two running guests: a 2-of-3 signed release carrying
/// a (stripped) hypervisor and net card moves both guests' cards to the release's binary in
/// place (new pids running the installed file, the receiver's messages arriving again with no
/// new NIC, DHCP or boot), audited and reported by GetHealth; then a release whose net card
/// cannot start is refused typed, and the cards serve on the previous release's binary; then
/// the same with the previous binary gone too: the card is down, typed, and started again by
/// the controller once the binary is back.
fn deploy_applies_the_net_card(
    d: &Daemon,
    api: &Api<'_>,
    keys: &[bulkhead_rot::release::ReleaseKey],
    dir: &Path,
    mine: &str,
) {
    let src = dir.join("release-src");
    let hv = stripped(&src, "bulkhead-hypervisor");
    let card = stripped(&src, "bulkhead-netcard");
    let configured = release_dir()
        .join("bulkhead-netcard")
        .canonicalize()
        .unwrap();
    let old = netcard_pids(mine);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(exe(old[0]), configured);
    let cards_before = health_net_cards(d);
    assert_eq!(cards_before.len(), 2, "{cards_before:?}");
    assert!(
        cards_before.iter().all(|c| c.2.is_none()),
        "{cards_before:?}"
    );
    upload(d, &[&hv, &card]);
    let signed = release(2, &[&hv, &card], &[&keys[0], &keys[2]]);
    let before = after(&api.console("i-recv"));
    let t = Instant::now();
    let r = deploy(d, "deployer", DEPLOY_OPS, &signed);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    eprintln!(
        "deployed v2 (two live updates, two net cards) in {:?}",
        t.elapsed()
    );
    let installed = dir.join("releases/v2/bulkhead-netcard");
    let moved = r.json["net_cards"].as_array().unwrap();
    assert_eq!(moved.len(), 2, "{}", r.json);
    let now = netcard_pids(mine);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], old[0], "the receiver's card was not replaced");
    assert!(!crate::common::alive(old[0]), "the old card still runs");
    assert_eq!(exe(now[0]), installed);
    let recv_moved = moved.iter().find(|m| m["instance_id"] == "i-recv").unwrap();
    assert_eq!(recv_moved["old_pid"].as_u64(), Some(old[0] as u64));
    assert_eq!(recv_moved["new_pid"].as_u64(), Some(now[0] as u64));
    eprintln!("receiver's network gap {} us", recv_moved["gap_us"]);
    for m in moved {
        assert_eq!(exe(m["new_pid"].as_u64().unwrap()), installed, "{m}");
    }
    let health = health_net_cards(d);
    assert!(health.iter().all(|c| c.2 == Some(2)), "{health:?}");
    let mut steps = deploy_steps(d, "netcard_update", 2);
    steps.sort();
    assert_eq!(
        steps,
        vec![
            ("instance:i-recv".to_string(), "ok".to_string()),
            ("instance:i-send".to_string(), "ok".to_string())
        ]
    );
    arrive_again(api, before, "the net card update to v2");
    assert_eq!(api.console("i-send").matches("BOOT=").count(), 1);

    // A release whose net card cannot start (it exits at once): refused typed; the card that
    // failed is started again on v2's binary and takes the NIC back, the hypervisors are moved
    // back, the host stays on v2.
    let bad_src = dir.join("bad-src");
    std::fs::create_dir_all(&bad_src).unwrap();
    let bad = bad_src.join("bulkhead-netcard");
    std::fs::write(&bad, b"#!/bin/sh\nexit 3\n").unwrap();
    upload(d, &[&bad]);
    let signed = release(3, &[&hv, &bad], &[&keys[1], &keys[2]]);
    let before = after(&api.console("i-recv"));
    let r = deploy(d, "deployer", DEPLOY_OPS, &signed);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "release_net_card_update_failed", "{}", r.json);
    let failed = deploy_steps(d, "netcard_update", 3);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].1, "net_card_refused", "{failed:?}");
    let health = health_net_cards(d);
    assert_eq!(health.len(), 2, "{health:?}");
    for (id, pid, release) in &health {
        assert_eq!(*release, Some(2), "{id}: {health:?}");
        assert_eq!(exe(pid), installed, "{id}");
    }
    assert_eq!(common::health(d)["release"], 2);
    arrive_again(api, before, "the refused net card update");

    // The card's previous binary cannot start either (v2's file moved away): the update fails
    // as net_card_old_card_gone, the receiver's card is down (no process, not in GetHealth)
    // but kept, and once the file is back the controller's poll starts it again on v2, in
    // place: the sender's messages arrive again.
    let aside = dir.join("netcard-v2-aside");
    std::fs::rename(&installed, &aside).unwrap();
    let signed = release(4, &[&hv, &bad], &[&keys[0], &keys[1]]);
    let before = after(&api.console("i-recv"));
    let r = deploy(d, "deployer", DEPLOY_OPS, &signed);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "release_net_card_update_failed", "{}", r.json);
    let failed = deploy_steps(d, "netcard_update", 4);
    assert_eq!(
        failed,
        vec![(
            "instance:i-recv".to_string(),
            "net_card_old_card_gone".to_string()
        )]
    );
    assert!(netcard_pids(mine).is_empty(), "{:?}", netcard_pids(mine));
    let health = health_net_cards(d);
    assert_eq!(health.len(), 1, "{health:?}");
    assert_eq!(health[0].0, "i-send", "{health:?}");
    std::fs::rename(&aside, &installed).unwrap();
    wait_until("the down card started again", || {
        health_net_cards(d).len() == 2
    });
    let now = netcard_pids(mine);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(exe(now[0]), installed);
    for (id, pid, release) in &health_net_cards(d) {
        assert_eq!(*release, Some(2), "{id}");
        assert_eq!(exe(pid), installed, "{id}");
    }
    wait_until("the restart audited", || {
        d.audit().iter().any(|x| {
            x["entry"]["op"] == "RestartNetCard"
                && x["entry"]["resources"][0] == "instance:i-recv"
                && x["entry"]["code"] == "ok"
        })
    });
    arrive_again(api, before, "the down card's restart");
    bulkhead_audit::verify(&dir.join("audit.log")).unwrap();
}

/// A host daemon with a fresh host key in its state directory, and an epoch-1 key of VPC 7
/// sealed to that host key (hex).
fn host_with_key(dir: &Path) -> (Daemon, String) {
    bulkhead_tokens::statedir::StateDir::new(dir)
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir);
    let base = 20000 + (std::process::id() % 20000) as u16 + 100;
    let g = guest_dir();
    let d = Daemon::start_with(
        dir,
        &[
            "--backend",
            "host",
            "--guest-dir",
            g.to_str().unwrap(),
            "--net-host-ip",
            "127.0.0.1",
            "--net-port-base",
            &base.to_string(),
        ],
    );
    let mut k = [0u8; 32];
    bulkhead_sealing::fill_random(&mut k).unwrap();
    let sealed = hex::encode(seal_epoch_key(host.public(), VpcId(7), KeyEpoch(1), &k).unwrap());
    (d, sealed)
}

/// The card's lifecycle without booting a guest: cold-plugged into a created VM, counted in
/// /v1/metrics, restarted after kill -9 with its port and current routes (audited), a key for
/// the wrong VPC refused by the card, and every card reaped at terminate.
#[test]
fn net_cards_are_restarted_counted_and_reaped() {
    if !can_run("net_cards_are_restarted_counted_and_reaped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (d, sealed) = host_with_key(dir.path());
    // Cards of this test only (the other test of this file runs cards of the same names).
    let run_dir = dir.path().join("run");
    let mine = |name: &str| format!("{}/net-{name}", run_dir.display());
    let api = Api {
        d: &d,
        c: d.client("customer"),
    };
    // A key sealed for this VPC opens only in this VPC's cards: an instance of VPC 8 given it
    // has no card (the card refuses the blob and never comes up).
    let body = serde_json::json!({
        "instance_id": "i-other", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
        "network": {"vpc": 8, "card_id": 1, "mac": "02:00:00:00:08:01", "ip": "10.8.0.5",
                    "prefix": 24, "allow": [], "routes": []},
    });
    api.ok("POST", "/v1/instances", &body.to_string());
    let r = api.call(
        "POST",
        "/v1/instances/i-other/network",
        &serde_json::json!({"epoch": 1, "sealed_epoch_key": sealed}).to_string(),
    );
    assert_eq!((r.status, r.code()), (400, "net_card_refused"));
    assert!(netcard_pids(&mine("i-other")).is_empty());
    // (This host has room for two instances.)
    api.ok("POST", "/v1/instances/i-other/terminate", "");
    let mut endpoints = Vec::new();
    for (id, card, ip) in [("i-send", 1, "10.0.1.5"), ("i-recv", 2, "10.0.1.6")] {
        let body = serde_json::json!({
            "instance_id": id, "image": "test-guest", "vcpus": 1, "memory_mib": 128,
            "network": {"vpc": 7, "card_id": card, "mac": format!("02:00:00:00:01:0{card}"),
                        "ip": ip, "prefix": 24, "allow": ["icmp:10.0.0.0/16"], "routes": []},
        });
        api.ok("POST", "/v1/instances", &body.to_string());
        let r = api.ok(
            "POST",
            &format!("/v1/instances/{id}/network"),
            &serde_json::json!({"epoch": 1, "sealed_epoch_key": sealed}).to_string(),
        );
        endpoints.push(r.json["net_endpoint"].as_str().unwrap().to_string());
    }
    // The routes/rules relay reaches the card and a refusal comes back typed.
    api.ok(
        "PUT",
        "/v1/instances/i-recv/network/routes",
        &serde_json::json!({"routes": [format!("10.0.1.5=1@{}", endpoints[0])]}).to_string(),
    );
    let r = api.call(
        "PUT",
        "/v1/instances/i-recv/network/routes",
        &serde_json::json!({"routes": [format!("10.0.1.7=2@{}", endpoints[0])]}).to_string(),
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "net_card_refused"),
        "a route to the card itself"
    );
    api.ok(
        "PUT",
        "/v1/instances/i-recv/network/rules",
        &serde_json::json!({"allow": ["tcp:7000:10.0.0.0/16"]}).to_string(),
    );

    // Counters, numbers only, per interface.
    let m = metrics(&d);
    for id in ["i-send", "i-recv"] {
        assert!(
            m.lines()
                .any(|l| l.starts_with(&format!("bulkhead_netcard{{instance=\"{id}\""))),
            "{m}"
        );
    }
    assert!(!m.contains("10.0.1."), "addresses in metrics");

    // kill -9 the receiver's card: the controller restarts it (same port) and audits it.
    let old = netcard_pids(&mine("i-recv"));
    assert_eq!(old.len(), 1, "{old:?}");
    // SAFETY: kill has no memory-safety preconditions; `old[0]` is a net card of this test.
    unsafe { libc::kill(old[0], libc::SIGKILL) };
    wait_until("net card restart", || {
        let now = netcard_pids(&mine("i-recv"));
        now.len() == 1 && now[0] != old[0]
    });
    wait_until("RestartNetCard audit", || {
        d.audit().iter().any(|r| {
            r["entry"]["op"] == "RestartNetCard"
                && r["entry"]["code"] == "ok"
                && r["entry"]["resources"][0] == "instance:i-recv"
        })
    });
    let new = netcard_pids(&mine("i-recv"));
    let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", new[0])).unwrap())
        .replace('\0', " ");
    assert!(cmd.contains(&format!("--listen={}", endpoints[1])), "{cmd}");
    assert!(
        cmd.contains(&format!("--route=10.0.1.5=1@{}", endpoints[0])),
        "{cmd}"
    );

    // Terminate: every card is reaped, nothing of them stays in the run directory.
    for id in ["i-send", "i-recv"] {
        api.ok("POST", &format!("/v1/instances/{id}/terminate"), "");
        let r = api.ok("GET", &format!("/v1/instances/{id}"), "");
        assert!(r.json.get("net_endpoint").is_none(), "{}", r.json);
    }
    wait_until("cards reaped", || netcard_pids(&mine("i-")).is_empty());
    let left: Vec<String> = std::fs::read_dir(dir.path().join("run"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".vhost") || f.ends_with(".ctl") || f.ends_with(".sealed"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The audit log holds no sealed key.
    let raw = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(!raw.contains(&sealed[..32]));
    // The counters said the card updated its tables.
    assert!(m.contains("counter=\"route_updates\"} 1"), "{m}");
}
