//! Whole-core isolation in the running system (issue 17): the real controller (dev mode,
//! `--backend host --core-isolation dedicated`, host cores = the core of CPU 0) starts a real
//! guest; every thread of the running processes is read from `/proc/<pid>/task/*/status`
//! (`Cpus_allowed_list`) and `/proc/<pid>/task/*/stat` (the CPU it last ran on):
//!
//! * the hypervisor's vCPU threads may run only on the instance's whole cores, none of them a
//!   host core, and did run there; its other threads (command loop, watchdog) stay on the host
//!   cores;
//! * the block card, the net card, the keeper (launcher) and the controller run only on the host
//!   cores;
//! * a second instance on this host is refused with `no_free_cores` while the first holds the
//!   only free core, also by a controller restarted meanwhile (the allocation is in the host
//!   record), and placed on that core once the first is terminated.
//!
//! On this two-core machine: the host keeps core 0, one 1-vCPU instance gets core 1, a second
//! is refused. On a bigger host the same assertions hold with more cores. Needs what
//! `tests/host_backend.rs` needs plus at least two cores; without them a loud skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bulkhead_controller::cores::{parse_cpu_list, HostTopology, SYSFS_CPU};
use bulkhead_netcard::control::seal_epoch_key;
use bulkhead_netcard::encap::{KeyEpoch, VpcId};
use bulkhead_sealing::seal_volume_key;
use bulkhead_tokens::Operation;
use common::*;

const OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::DescribeInstance,
    Operation::StartInstance,
    Operation::TerminateInstance,
    Operation::AttachVolume,
    Operation::GetConsole,
    Operation::AttachNetwork,
];

struct KeeperGuard(PathBuf);

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        kill_keeper(&self.0);
    }
}

fn call(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let t = d.mint("customer", HOST, OPS, MIN10);
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

/// One thread of a process: its name, the CPUs it may run on, the CPU it last ran on.
#[derive(Debug)]
struct Thread {
    tid: i32,
    name: String,
    allowed: BTreeSet<usize>,
    last_cpu: Option<usize>,
}

fn threads(pid: i32) -> Vec<Thread> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Some(tid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        // Field 39 of stat ("processor"), counted after the ')' that ends the name.
        let last_cpu = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(36).map(str::to_string))
            })
            .and_then(|c| c.parse().ok());
        out.push(Thread {
            tid,
            name: field("Name:"),
            allowed: parse_cpu_list(&field("Cpus_allowed_list:")).expect("cpu list"),
            last_cpu,
        });
    }
    assert!(!out.is_empty(), "process {pid} has no threads");
    out
}

/// Every thread of `pid` may run only on `host`.
fn assert_on_host_cores(what: &str, pid: i32, host: &BTreeSet<usize>) {
    for t in threads(pid) {
        assert!(
            !t.allowed.is_empty() && t.allowed.is_subset(host),
            "{what} (pid {pid}) thread {} {:?} may run on {:?}, outside the host cores {host:?}",
            t.tid,
            t.name,
            t.allowed
        );
    }
}

fn procs_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd =
                String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).to_string();
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (cmd.contains(needle) && !zombie).then_some(pid)
        })
        .collect()
}

/// The keeper's live child whose command line contains `what` (exactly one).
fn kept_one(keeper: i32, what: &str) -> i32 {
    let mine: BTreeSet<i32> = children_of(keeper).into_iter().collect();
    let found: Vec<i32> = procs_with(what)
        .into_iter()
        .filter(|p| mine.contains(p))
        .collect();
    assert_eq!(found.len(), 1, "{what}: {found:?}");
    found[0]
}

fn args() -> Vec<String> {
    let base = 20000 + (std::process::id() % 20000) + 300;
    vec![
        "--backend".into(),
        "host".into(),
        "--guest-dir".into(),
        guest_dir().display().to_string(),
        "--core-isolation".into(),
        "dedicated".into(),
        "--net-host-ip".into(),
        "127.0.0.1".into(),
        "--net-port-base".into(),
        base.to_string(),
    ]
}

fn create(id: &str, net_card: u32) -> String {
    serde_json::json!({
        "instance_id": id, "image": "test-guest", "vcpus": 1, "memory_mib": 128,
        "network": {"vpc": 7, "card_id": net_card, "mac": format!("02:00:00:00:07:0{net_card}"),
                    "ip": format!("10.7.0.{}", 4 + net_card), "prefix": 24,
                    "allow": [], "routes": []},
    })
    .to_string()
}

#[test]
fn instances_get_whole_cores_and_the_host_keeps_its_own() {
    if !can_boot_with(
        "instances_get_whole_cores_and_the_host_keeps_its_own",
        &[
            "bulkhead-hypervisor",
            "bulkhead-blockcard",
            "bulkhead-netcard",
        ],
    ) {
        return;
    }
    let topo = HostTopology::from_sysfs(Path::new(SYSFS_CPU)).unwrap();
    if topo.cores().len() < 2 {
        bulkhead_testkit::skip_or_fail(
            "instances_get_whole_cores_and_the_host_keeps_its_own: needs at least two cores",
        );
        return;
    }
    // The host keeps the core of CPU 0 (the default); a 1-vCPU instance gets the next core.
    let host: BTreeSet<usize> = topo
        .cores()
        .iter()
        .find(|c| c.cpus.contains(&0))
        .unwrap()
        .cpus
        .iter()
        .copied()
        .collect();
    let first_free: Vec<usize> = topo
        .cores()
        .iter()
        .find(|c| !c.cpus.iter().any(|x| host.contains(x)))
        .unwrap()
        .cpus
        .clone();
    let instance_cores = topo.cores().len() - 1;

    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let hk = host_key(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let a = args();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut d = Daemon::start_with(dir.path(), &a);
    let ready_host: BTreeSet<usize> = d.ready["host_cpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| usize::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(ready_host, host, "{}", d.ready);
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();

    // One instance with an encrypted volume (block card) and a VPC interface (net card).
    ok(&d, "POST", "/v1/instances", &create("i-a", 1));
    let blob = seal_volume_key(hk.public(), "vol-a", &volume_key(5)).unwrap();
    let body = serde_json::json!({
        "volume_id": "vol-a",
        "sealed_key": base64::engine::general_purpose::STANDARD.encode(blob),
    });
    ok(&d, "POST", "/v1/instances/i-a/volumes", &body.to_string());
    let mut k = [0u8; 32];
    bulkhead_sealing::fill_random(&mut k).unwrap();
    let sealed = hex::encode(seal_epoch_key(hk.public(), VpcId(7), KeyEpoch(1), &k).unwrap());
    ok(
        &d,
        "POST",
        "/v1/instances/i-a/network",
        &serde_json::json!({"epoch": 1, "sealed_epoch_key": sealed}).to_string(),
    );
    ok(&d, "POST", "/v1/instances/i-a/start", "");
    let hv = kept_one(keeper, "bulkhead-hypervisor");
    let card = kept_one(keeper, "bulkhead-blockcard");
    let net = kept_one(keeper, "bulkhead-netcard");

    // The guest runs (its vCPU has executed: the console has the boot's first lines).
    let t = Instant::now();
    loop {
        let out = ok(&d, "GET", "/v1/instances/i-a/console", "").json["output"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if out.contains("BULKHEAD-GUEST-READY") {
            break;
        }
        assert!(
            t.elapsed() < boot_timeout(),
            "guest not up after {:?}:\n{out}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // The hypervisor: vCPU threads on the instance's core only (and they ran there); every
    // other thread on the host cores.
    let ts = threads(hv);
    let vcpus: Vec<&Thread> = ts.iter().filter(|t| t.name.starts_with("vcpu")).collect();
    assert_eq!(vcpus.len(), 1, "{ts:?}");
    let instance: BTreeSet<usize> = first_free.iter().copied().collect();
    for v in &vcpus {
        assert_eq!(v.allowed.len(), 1, "a vCPU is pinned to one CPU: {v:?}");
        assert!(v.allowed.is_subset(&instance), "{v:?} not on {instance:?}");
        assert!(v.allowed.is_disjoint(&host), "{v:?} on a host core");
        assert!(
            v.last_cpu.is_some_and(|c| instance.contains(&c)),
            "{v:?} last ran outside the instance's core"
        );
    }
    for t in ts.iter().filter(|t| !t.name.starts_with("vcpu")) {
        // KVM's own per-VM kernel worker (`kvm-nx-lpage-recovery`) is started from the first
        // vCPU's KVM_RUN and inherits its CPU: it works for this VM only, on this VM's core.
        let vm_worker = t.name.starts_with("kvm-") && t.allowed.is_subset(&instance);
        assert!(
            t.allowed.is_subset(&host) || vm_worker,
            "hypervisor thread {t:?} may run outside the host cores {host:?}"
        );
    }
    eprintln!(
        "hypervisor {hv}: {} threads; vcpu0 on {:?}; others on {host:?}",
        ts.len(),
        vcpus[0].allowed
    );
    // The cards, the keeper and the controller: host cores only.
    assert_on_host_cores("block card", card, &host);
    assert_on_host_cores("net card", net, &host);
    assert_on_host_cores("keeper", keeper, &host);
    assert_on_host_cores("controller", i32::try_from(d.child.id()).unwrap(), &host);

    // The allocation is in the host record.
    let cpus_of = |id: &str| -> Vec<usize> {
        bulkhead_controller::record::HostRecord::load(&dir.path().join("host-record"))
            .unwrap()
            .instances
            .into_iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("{id} not in the host record"))
            .cpus
    };
    assert_eq!(cpus_of("i-a"), first_free);
    let r = call(&d, "POST", "/v1/instances", &create("i-b", 2));
    if instance_cores > 1 {
        // A bigger host: the second instance gets other whole cores.
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let b: BTreeSet<usize> = cpus_of("i-b").into_iter().collect();
        assert!(b.is_disjoint(&instance) && b.is_disjoint(&host), "{b:?}");
        ok(&d, "POST", "/v1/instances/i-b/terminate", "");
        ok(&d, "POST", "/v1/instances/i-a/terminate", "");
        return;
    }
    // This machine: no whole core is left, so the second instance is refused, typed.
    assert_eq!(
        (r.status, r.code()),
        (409, "no_free_cores"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // (One more request: its durable record commits the refusal's queued outcome record
    // before the kill below.)
    ok(&d, "GET", "/v1/instances/i-a", "");
    // A restarted controller keeps the allocation (from the host record).
    d.kill9_controller_only();
    d = Daemon::start_with(dir.path(), &a);
    assert_eq!(d.ready["adopted"]["instances"], 1, "{}", d.ready);
    assert_eq!(kept_one(keeper, "bulkhead-hypervisor"), hv);
    assert_on_host_cores(
        "restarted controller",
        i32::try_from(d.child.id()).unwrap(),
        &host,
    );
    let r = call(&d, "POST", "/v1/instances", &create("i-b", 2));
    assert_eq!((r.status, r.code()), (409, "no_free_cores"));
    // Terminated, the core goes back: the second instance now gets exactly it.
    ok(&d, "POST", "/v1/instances/i-a/terminate", "");
    ok(&d, "POST", "/v1/instances", &create("i-b", 2));
    assert_eq!(cpus_of("i-b"), first_free);
    ok(&d, "POST", "/v1/instances/i-b/terminate", "");
    // Both refusals were audited (outcome records are group-committed with later records).
    let t = Instant::now();
    loop {
        let refused = d
            .audit()
            .into_iter()
            .filter(|x| {
                x["entry"]["op"] == "CreateInstance"
                    && x["entry"]["kind"] == "outcome"
                    && x["entry"]["code"] == "no_free_cores"
            })
            .count();
        if refused == 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{refused} no_free_cores outcomes audited, want 2"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
