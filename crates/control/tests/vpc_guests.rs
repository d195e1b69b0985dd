//! Claim 4 end to end, every part real: two tenants' instances boot real guests under
//! `bulkhead-hypervisor` on the two hosts of a `bulkhead up` cluster (network namespaces joined
//! by a data network), each with its own `bulkhead-netcard` launched by its controller with a
//! VPC epoch key that the KMS sealed to the host's attested key. The guests configure themselves
//! by DHCP from their cards and talk over TCP across the hosts, while `tcpdump` captures the
//! hosts' links. Then, against that running system:
//! * the capture holds no plaintext marker, and an independent decryptor (Python
//!   `cryptography`, scripts/vpc-decrypt.py) given the VPC key opens every datagram and finds
//!   the marker in the guest's frames, and no (key, nonce) is used twice;
//! * a port without an ingress rule is blocked, and opens once the customer authorizes it,
//!   without restarting anything;
//! * a guest sending with a forged source address has those frames dropped and counted;
//! * another tenant's guest, on the same hosts with the very same addresses, reaches nothing;
//! * a captured datagram replayed into the host network, one with a flipped bit and a truncated
//!   one are dropped and counted by the receiving card, and the guests keep talking;
//! * the operator can mint no token for a network operation, and the counters it may read are
//!   numbers only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_devcluster::cluster::{self, Cluster, ReplicaOptions, StartOptions};
use serde_json::{json, Value};

mod common;
use common::*;

const MARKER: &str = "VPC-MARKER-7f3a91";
const LATE: &str = "LATE-PORT-OPENED-2b8c";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn str_at(v: &Value, path: &[&str]) -> String {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_str()
        .unwrap_or_else(|| panic!("{path:?} in {v}"))
        .to_string()
}

/// `tcpdump -w` on one bridge end of the data network.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

fn capture(c: &Cluster, link: &str, file: &Path) -> Capture {
    let f = c.fabric.as_ref().unwrap();
    let child = Command::new("ip")
        .args([
            "netns", "exec", &f.ns, "tcpdump", "-i", link, "-s", "0", "-U", "-w",
        ])
        .arg(file)
        .arg("udp")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Capture {
        child,
        file: file.to_path_buf(),
    }
}

impl Capture {
    fn stop(mut self) -> std::path::PathBuf {
        // SAFETY: kill(2) on our own child's pid; SIGINT lets tcpdump flush its file.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        self.file
    }
}

/// The counters a host's controller shows the operator for one instance's interface.
fn net_counters(
    c: &Cluster,
    host: &str,
    instance: &str,
) -> std::collections::BTreeMap<String, u64> {
    let op = client_as(c, "operator");
    let (st, t) = post(
        &op,
        &c.token_addr,
        "/v1/Mint",
        None,
        &json!({"hosts": [host], "operations": ["GetMetrics"], "ttl_secs": 60}),
    );
    assert_eq!(st, 200, "{t}");
    let addr = &c.host_addrs.iter().find(|(h, _)| h == host).unwrap().1;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let auth = format!("Bearer {}", t["token"].as_str().unwrap());
    let r = rt
        .block_on(op.request(
            addr,
            "GET",
            "/v1/metrics",
            &[("authorization", &auth)],
            Vec::new(),
        ))
        .unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).to_string();
    let prefix = format!("bulkhead_netcard{{instance=\"{instance}\",counter=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn counter(m: &std::collections::BTreeMap<String, u64>, name: &str) -> u64 {
    m.get(name).copied().unwrap_or(0)
}

/// Tenant `a`'s epoch key for `vpc`, learned the only legitimate way: as the control plane, with
/// a fresh RunInstances signed by `a`, the KMS seals it to the host that runs `instance` (on a
/// quote bound to that instance), and the host key opens it.
fn vpc_key(c: &Cluster, a: &Customer, vpc: &str, instance: &str) -> (u32, u32, Vec<u8>) {
    let db = rusqlite::Connection::open(c.dir.join("control/control.db")).unwrap();
    let (number, epoch): (u32, u32) = db
        .query_row(
            "SELECT vpc_number, epoch FROM vpcs WHERE vpc_id = ?1",
            [vpc],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let host: String = db
        .query_row(
            "SELECT host_id FROM instances WHERE instance_id = ?1",
            [instance],
            |r| r.get(0),
        )
        .unwrap();
    let host_dir = c.dir.join(&host);
    let body = json!({
        "customer_request": a.forwarded("RunInstances", json!({"ImageId": "test-guest"})),
        "vpc_id": vpc,
        "epoch": epoch,
        "instance_id": instance,
        "host_id": host,
        "host_public_key": base64_std(&std::fs::read(host_dir.join("host.pub")).unwrap()),
        "evidence": evidence(c, &host, instance),
    });
    let (st, v) = post(
        &as_control_plane(c),
        &c.kms_addr,
        "/v1/SealVpcKey",
        None,
        &body,
    );
    assert_eq!(st, 200, "{v}");
    let sealed = hex::decode(v["sealed_epoch_key"].as_str().unwrap()).unwrap();
    let host_key = bulkhead_sealing::HostKey::read_file(&host_dir.join("host.key")).unwrap();
    let id = format!("netcard-vpc-{number}-epoch-{epoch}");
    let opened = bulkhead_sealing::open_volume_key(&host_key, &id, &sealed).unwrap();
    (number, epoch, opened.as_ref()[..32].to_vec())
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Sends each attack file as one UDP datagram from `src:sport` to `dst:dport` over a raw
/// socket (an attacker on the host network, posing as the sender card's host).
const SENDER: &str = r#"
import json, socket, struct, sys
meta = json.load(open(sys.argv[1]))
src, dst = socket.inet_aton(meta["src"]), socket.inet_aton(meta["dst"])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for f in sys.argv[2:]:
    body = open(f, "rb").read()
    udp = struct.pack(">HHHH", meta["sport"], meta["dport"], 8 + len(body), 0) + body
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    raw.sendto(ip + udp, (meta["dst"], 0))
"#;

#[test]
fn two_tenants_vpcs_across_two_hosts_with_real_guests_and_net_cards() {
    let Some(guest) = guest_dir_or_skip("two_tenants_vpcs_across_two_hosts") else {
        return;
    };
    for tool in ["tcpdump", "python3"] {
        if !have(tool) {
            bulkhead_testkit::skip_or_fail(&format!("{tool} is missing (scripts/install-deps.sh)"));
            return;
        }
    }
    let mut dir = tempfile::tempdir().unwrap();
    // BULKHEAD_KEEP_TEST_DIR=1 keeps the cluster's directory (logs, captures) for a post-mortem.
    if std::env::var_os("BULKHEAD_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let b = bins();
    let c = cluster::start_replicated(
        dir.path(),
        &StartOptions {
            hosts: 2,
            controller_args: vec![
                "--backend".into(),
                "host".into(),
                "--guest-dir".into(),
                guest.display().to_string(),
            ],
            bins: b,
            record: false,
            poll_interval_ms: 500,
            database_url: None,
            attest: None,
            netns: None,
        },
        // Two one-vCPU guests per host: placement spreads A1 and A2 over the two hosts and
        // puts B1 beside A1.
        &ReplicaOptions {
            host_cores: Some(2),
            ..ReplicaOptions::default()
        },
    )
    .unwrap();
    ran_fully(&c, 2);
    let Some(fabric) = c.fabric.clone() else {
        bulkhead_testkit::skip_or_fail("the hosts have no data network (no namespaces here)");
        return;
    };
    let a = customer(&c, "tenant-a");
    let bt = customer(&c, "tenant-b");

    // Tenant A: a VPC, a subnet, a group letting in TCP 7000 and ICMP from the VPC.
    let vpc = str_at(
        &a.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    let subnet = str_at(
        &a.ok(
            "CreateSubnet",
            json!({"VpcId": vpc, "CidrBlock": "10.0.1.0/24"}),
        ),
        &["Subnet", "SubnetId"],
    );
    let sg = str_at(
        &a.ok(
            "CreateSecurityGroup",
            json!({"GroupName": "app", "VpcId": vpc, "Description": "app tier"}),
        ),
        &["GroupId"],
    );
    let rule = |port: Option<i32>, proto: &str| {
        json!({"GroupId": sg, "IpPermissions": [{
            "IpProtocol": proto, "FromPort": port, "ToPort": port,
            "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]})
    };
    a.ok("AuthorizeSecurityGroupIngress", rule(Some(7000), "tcp"));
    a.ok("AuthorizeSecurityGroupIngress", rule(None, "icmp"));

    let captures: Vec<Capture> = fabric
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| capture(&c, l, &dir.path().join(format!("fabric-{i}.pcap"))))
        .collect();

    // A1 listens on 7000 (allowed) and 7001 (not yet allowed); busybox `nc -l` serves one
    // connection and prints what it received, so each listener runs in a loop (a connection
    // that a slow first handshake left half-open must not end the test's listener).
    let listener = "(while :; do nc -l -p 7001; done) &\n\
        while :; do nc -l -p 7000; done\n";
    let run = |t: &Customer, script: &str, subnet: &str, groups: &[&str]| -> (String, String) {
        let v = t.ok(
            "RunInstances",
            json!({"ImageId": "test-guest", "VcpuCount": 1, "UserData": script,
                   "SubnetId": subnet, "SecurityGroupIds": groups}),
        );
        let i = &v["Instances"][0];
        (str_at(i, &["InstanceId"]), str_at(i, &["PrivateIpAddress"]))
    };
    let (a1, ip1) = run(&a, listener, &subnet, &[&sg]);
    // A2 pings A1, sends the marker, tries 7001 until it opens, then sends from a forged
    // source address.
    let sender = format!(
        "ping -c 2 -W 3 {ip1} && echo A2-PING-OK\n\
         i=0; until echo {MARKER} | nc -w 10 {ip1} 7000; do i=$((i+1)); [ $i -gt 40 ] && break; sleep 1; done\n\
         echo A2-SENT-$i\n\
         if echo early | nc -w 3 {ip1} 7001; then echo A2-7001-OPEN; else echo A2-7001-BLOCKED; fi\n\
         until echo {LATE} | nc -w 10 {ip1} 7001; do sleep 1; done\n\
         echo A2-7001-OK\n\
         ip addr add 10.0.1.250/32 dev eth0\n\
         ping -c 3 -W 1 -I 10.0.1.250 {ip1} || echo A2-SPOOF-UNANSWERED\n\
         while :; do sleep 1000; done\n"
    );
    let (a2, ip2) = run(&a, &sender, &subnet, &[&sg]);
    assert_ne!(ip1, ip2);

    a.wait_console(&a1, "BULKHEAD-NET-UP=");
    let out2 = a.wait_console(&a2, "BULKHEAD-NET-UP=");
    assert!(
        out2.contains(&format!("BULKHEAD-NET-UP={ip2}/24")),
        "{out2}"
    );
    a.wait_console(&a1, MARKER);
    a.wait_console(&a2, "A2-PING-OK");
    // The group has no rule for 7001: blocked, counted by A1's card.
    let out2 = a.wait_console(&a2, "A2-7001-");
    assert!(
        out2.contains("A2-7001-BLOCKED"),
        "7001 passed without a rule:\n{out2}"
    );
    a.ok("AuthorizeSecurityGroupIngress", rule(Some(7001), "tcp"));
    a.wait_console(&a1, LATE);
    a.wait_console(&a2, "A2-SPOOF-UNANSWERED");

    // Hosts of the two instances, from the control plane's view.
    let described = a.ok("DescribeInstances", json!({}));
    let host_of = |id: &str| -> String {
        let db = rusqlite::Connection::open(c.dir.join("control/control.db")).unwrap();
        db.query_row(
            "SELECT host_id FROM instances WHERE instance_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (h1, h2) = (host_of(&a1), host_of(&a2));
    assert_ne!(
        h1, h2,
        "placement spreads the two instances over the hosts: {described}"
    );
    let m1 = net_counters(&c, &h1, &a1);
    let m2 = net_counters(&c, &h2, &a2);
    assert!(
        counter(&m1, "dropped_secgroup_in") > 0,
        "A1's card counted no security-group drop: {m1:?}"
    );
    assert!(
        counter(&m2, "spoofed") > 0,
        "A2's forged source was not dropped and counted: {m2:?}"
    );
    assert!(
        counter(&m1, "rx_packets") > 0 && counter(&m2, "tx_packets") > 0,
        "{m1:?} {m2:?}"
    );

    // Tenant B, on the same hosts, with the same addresses in its own VPC: reaches nothing.
    let vpc_b = str_at(
        &bt.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    let subnet_b = str_at(
        &bt.ok(
            "CreateSubnet",
            json!({"VpcId": vpc_b, "CidrBlock": "10.0.1.0/24"}),
        ),
        &["Subnet", "SubnetId"],
    );
    let sg_b = str_at(
        &bt.ok(
            "CreateSecurityGroup",
            json!({"GroupName": "open", "VpcId": vpc_b}),
        ),
        &["GroupId"],
    );
    let intruder = format!(
        "me=${{lease#up }}; me=${{me%/*}}\n\
         for t in {ip1} {ip2}; do\n\
           [ \"$t\" = \"$me\" ] && continue\n\
           if ping -c 2 -W 2 $t; then echo B-PING-OK-$t; else echo B-PING-FAIL-$t; fi\n\
           if echo intrude | nc -w 3 $t 7000; then echo B-TCP-OK-$t; else echo B-TCP-FAIL-$t; fi\n\
         done\n\
         echo B-DONE\n\
         while :; do sleep 1000; done\n"
    );
    let (b1, _) = run(&bt, &intruder, &subnet_b, &[&sg_b]);
    let outb = bt.wait_console(&b1, "B-DONE");
    assert!(
        !outb.contains("B-PING-OK") && !outb.contains("B-TCP-OK"),
        "tenant B reached tenant A:\n{outb}"
    );
    assert!(
        outb.contains("B-PING-FAIL-") && outb.contains("B-TCP-FAIL-"),
        "{outb}"
    );
    assert_eq!(host_of(&b1), h1, "B1 shares a host with A1");
    // A1 printed nothing of B.
    let out1 = a.ok("GetConsoleOutput", json!({"InstanceId": a1}));
    assert!(!out1["Output"].as_str().unwrap_or("").contains("intrude"));

    // The wire: stop the captures, open them with an independent decryptor.
    let pcaps: Vec<_> = captures.into_iter().map(Capture::stop).collect();
    let (number, epoch, key) = vpc_key(&c, &a, &vpc, &a1);
    let db = rusqlite::Connection::open(c.dir.join("control/control.db")).unwrap();
    let cards: Vec<String> = {
        let mut st = db
            .prepare("SELECT card_id FROM interfaces WHERE vpc_id = ?1")
            .unwrap();
        st.query_map([&vpc], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|x| x.unwrap().to_string())
            .collect()
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vpc-decrypt.py");
    let attack = dir.path().join("attack");
    std::fs::create_dir_all(&attack).unwrap();
    let mut total = 0;
    for (i, p) in pcaps.iter().enumerate() {
        let raw = std::fs::read(p).unwrap();
        assert!(
            !raw.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext marker on the host link {}",
            fabric.links[i]
        );
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--pcap")
            .arg(p)
            .args(["--key", &format!("{number}:{epoch}:{}", hex::encode(&key))])
            .args(["--cards", &cards.join(","), "--marker", MARKER]);
        if i == 0 {
            cmd.arg("--attack-dir").arg(&attack);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["failed"], 0,
            "a datagram did not open with tenant A's key: {v}"
        );
        assert_eq!(v["repeated_nonces"], 0, "{v}");
        assert_eq!(v["plaintext_marker_in_capture"], false, "{v}");
        total += v["opened"].as_u64().unwrap();
        if v["marker_found"] == true {
            total += 1_000_000;
        }
    }
    assert!(
        total > 1_000_000,
        "the decryptor found the marker in no captured frame"
    );

    // Replayed, bit-flipped and truncated datagrams into the host network: dropped, counted.
    let meta: Value =
        serde_json::from_slice(&std::fs::read(attack.join("meta.json")).unwrap()).unwrap();
    let dst = meta["dst"].as_str().unwrap().to_string();
    // Host N of the cluster is the Nth namespace.
    let n = c
        .nets
        .iter()
        .position(|x| x.fabric_ip.as_deref() == Some(dst.as_str()))
        .unwrap();
    let victim_host = format!("host-{}", n + 1);
    let victim = if victim_host == h1 {
        a1.clone()
    } else {
        a2.clone()
    };
    let before = net_counters(&c, &victim_host, &victim);
    // Injected from the sending host's side of the data network (what root there, or anyone
    // on that wire, can do), with the sender card's own source address and port.
    let src = meta["src"].as_str().unwrap();
    let attacker = c
        .nets
        .iter()
        .find(|x| x.fabric_ip.as_deref() == Some(src))
        .unwrap();
    let send = Command::new("ip")
        .args(["netns", "exec", &attacker.ns, "python3", "-c", SENDER])
        .arg(attack.join("meta.json"))
        .arg(attack.join("replay"))
        .arg(attack.join("flip"))
        .arg(attack.join("trunc"))
        .output()
        .unwrap();
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let m = net_counters(&c, &victim_host, &victim);
        let grew = |k: &str| counter(&m, k) > counter(&before, k);
        if (grew("replayed") || grew("too_old")) && grew("forged") && grew("truncated") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "attack datagrams not all counted on {victim}: before {before:?} after {m:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(counter(&after, "rx_packets") >= counter(&before, "rx_packets"));

    // The operator can mint nothing that touches the network of an instance.
    let op = client_as(&c, "operator");
    for operation in ["AttachNetwork", "SetNetworkRoutes", "SetNetworkRules"] {
        let (st, v) = post(
            &op,
            &c.token_addr,
            "/v1/Mint",
            None,
            &json!({"hosts": [h1], "operations": [operation], "ttl_secs": 60}),
        );
        assert_eq!(
            (st, code(&v)),
            (403, "mint_plane_violation"),
            "{operation}: {v}"
        );
    }

    for (t, i) in [(&a, &a1), (&a, &a2), (&bt, &b1)] {
        t.ok("TerminateInstances", json!({"InstanceIds": [i]}));
    }
}
