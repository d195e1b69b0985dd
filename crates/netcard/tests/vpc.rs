//! One VPC, three real net cards in TAP mode: cards 1 and 2 on host A (same host), card 3 on
//! host B; host A and host B are network namespaces joined by a veth pair, and each card's TAP
//! is moved into its own "guest" namespace (so the guests' kernels talk only through the
//! cards). Keys are HPKE-sealed to each host's key with `bulkhead-sealing` (as the KMS does);
//! no plaintext key is ever written to disk.
//!
//! Checks: ping between all guests, same-host included; a destination with no route is
//! dropped and counted; a datagram from an address other than the sender card's pinned one is
//! counted as `forged_source`; a key rotation (install epoch 2 over the control sockets, switch
//! the senders one at a time, retire epoch 1) while one TCP connection exchanges lines, with no
//! line lost and no datagram dropped; card 1 killed -9 and restarted: its peers accept it (no
//! replay drop) and a capture of both the host link and host A's loopback (the same-host path)
//! opened by an independent Python decryptor shows no plaintext, every datagram authentic, and
//! no (key, nonce) pair used twice. Needs root; skips loudly otherwise.

mod common;

use bulkhead_netcard::control::seal_epoch_key;
use bulkhead_netcard::encap::{KeyEpoch, VpcId};
use bulkhead_sealing::HostKey;
use bulkhead_testkit::skip_or_fail;
use common::{have, in_ns, ok, run};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-netcard");
const MARKER: &str = "BULKHEAD-VPC-MARKER-93c2";
const VPC: u32 = 9;

/// Card `i` (1..=3): its host namespace index, UDP address, guest IP and MAC.
fn host_of(i: usize) -> usize {
    if i == 3 {
        1
    } else {
        0
    }
}
fn udp_of(i: usize) -> String {
    match i {
        1 => "192.168.215.1:4789".into(),
        2 => "192.168.215.1:4790".into(),
        _ => "192.168.215.2:4789".into(),
    }
}
fn ip_of(i: usize) -> String {
    format!("10.0.1.{}", 10 + i)
}

struct World {
    hosts: [String; 2],
    guests: [String; 3],
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.hosts.iter().chain(&self.guests) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

struct Card {
    child_index: usize,
    pid: i32,
    lines: mpsc::Receiver<String>,
    control: PathBuf,
}

impl World {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let w = World {
            hosts: [format!("ncvh{id}a"), format!("ncvh{id}b")],
            guests: [1, 2, 3].map(|i| format!("ncvg{id}{i}")),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for ns in w.hosts.iter().chain(&w.guests) {
            ok(&["ip", "netns", "add", ns]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let veth = [format!("ncvv{id}a"), format!("ncvv{id}b")];
        ok(&[
            "ip", "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ]);
        for (h, v) in veth.iter().enumerate() {
            ok(&["ip", "link", "set", v, "netns", &w.hosts[h]]);
            ok(&[
                "ip",
                "-n",
                &w.hosts[h],
                "link",
                "set",
                v,
                "name",
                "hostlink",
            ]);
            let addr = format!("192.168.215.{}/24", h + 1);
            ok(&[
                "ip",
                "-n",
                &w.hosts[h],
                "addr",
                "add",
                &addr,
                "dev",
                "hostlink",
            ]);
            ok(&["ip", "-n", &w.hosts[h], "link", "set", "hostlink", "up"]);
        }
        w
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts card `i` on TAP `vtapI` in its host namespace, then moves the TAP into the
    /// card's guest namespace and configures the "guest".
    fn start_card(&mut self, i: usize, epoch: u32) -> Card {
        let h = host_of(i);
        let host = self.hosts[h].clone();
        let tap = format!("vtap{i}");
        let control = self.path(&format!("card{i}.sock"));
        let _ = std::fs::remove_file(&control);
        ok(&[
            "ip", "-n", &host, "tuntap", "add", "dev", &tap, "mode", "tap",
        ]);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host, BIN, "tap", "--tap", &tap])
            .args(["--listen", &udp_of(i)])
            .args(["--vpc", &VPC.to_string(), "--epoch", &epoch.to_string()])
            .args(["--card-id", &i.to_string()])
            .arg("--host-key")
            .arg(self.path(&format!("host{h}.key")))
            .arg("--sealed-key")
            .arg(self.path(&format!("epoch{epoch}.host{h}.sealed")))
            .arg("--control")
            .arg(&control)
            .arg("--seq-state")
            .arg(self.path(&format!("card{i}.seq")))
            .args(["--mac", &format!("02:00:00:00:01:{i:02x}")])
            .args(["--ip", &format!("{}/24", ip_of(i))])
            .args([
                "--allow",
                "icmp:10.0.1.0/24",
                "--allow",
                "tcp:7000:10.0.1.0/24",
            ])
            .args(["--uid", "65534", "--gid", "65534"]);
        for j in (1..=3).filter(|j| *j != i) {
            cmd.args(["--route", &format!("{}={j}@{}", ip_of(j), udp_of(j))]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn card");
        let pid = i32::try_from(child.id()).expect("pid");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.children.push(child);
        // The control socket exists once the TAP is attached and the keys are derived.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(control.exists(), "card {i} did not start");
        let g = &self.guests[i - 1];
        ok(&["ip", "-n", &host, "link", "set", &tap, "netns", g]);
        let _ = in_ns(
            g,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{tap}.disable_ipv6=1"),
            ],
        );
        let mac = format!("02:00:00:00:01:{i:02x}");
        ok(&[
            "ip", "-n", g, "link", "set", &tap, "address", &mac, "mtu", "1400", "up",
        ]);
        ok(&[
            "ip",
            "-n",
            g,
            "addr",
            "add",
            &format!("{}/24", ip_of(i)),
            "dev",
            &tap,
        ]);
        Card {
            child_index: self.children.len() - 1,
            pid,
            lines: rx,
            control,
        }
    }
}

/// One control request, one reply.
fn control(card: &Card, req: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(&card.control).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("{req}\n").as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

fn must(card: &Card, req: serde_json::Value) -> serde_json::Value {
    let r = control(card, req.clone());
    assert_eq!(r["ok"], true, "{req} → {r}");
    r
}

fn counters(card: &Card) -> serde_json::Value {
    control(card, serde_json::json!({"op": "counters"}))
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no counter {k} in {v}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TCP_SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(4); s.settimeout(30)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept(); c.settimeout(15)
    f = c.makefile("rb")
    for line in f:
        c.sendall(b"ACK " + line)
    c.close()
"#;

/// One TCP connection: sends `count` lines `interval` apart, checks every echo.
const TCP_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), timeout=10)
f = s.makefile("rb")
count, interval, marker = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
for i in range(count):
    msg = f"{marker}-{i}\n".encode()
    s.sendall(msg)
    assert f.readline() == b"ACK " + msg, i
    time.sleep(interval)
print("OK", count)
"#;

/// Independent decryptor over both captures: the direction keys by HKDF-SHA256, AESGCM per
/// datagram; the receiver card from the destination address; reports epochs seen, same-host
/// datagrams, whether any (epoch, sender, receiver, seq) repeats, and whether the marker is in
/// clear anywhere.
const DECRYPTOR: &str = r#"
import json, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes
pcaps, keys, marker = sys.argv[1].split(","), json.loads(sys.argv[2]), sys.argv[3].encode()
cards = {("192.168.215.1", 4789): 1, ("192.168.215.1", 4790): 2, ("192.168.215.2", 4789): 3}
label = b"bulkhead-netcard v1"
def key(vpc, epoch, s, r):
    info = label + struct.pack(">IIII", vpc, epoch, s, r)
    return AESGCM(HKDF(hashes.SHA256(), 32, label, info).derive(bytes.fromhex(keys[str(epoch)])))
dgrams, clear = [], False
for p in pcaps:
    raw = open(p, "rb").read()
    clear = clear or marker in raw
    endian = "<" if struct.unpack("<I", raw[:4])[0] in (0xa1b2c3d4, 0xa1b23c4d) else ">"
    assert struct.unpack(endian + "I", raw[20:24])[0] == 1
    off = 24
    while off + 16 <= len(raw):
        _, _, incl, _ = struct.unpack(endian + "IIII", raw[off:off+16]); off += 16
        pkt = raw[off:off+incl]; off += incl
        if pkt[12:14] != b"\x08\x00" or pkt[23] != 17: continue
        ihl = (pkt[14] & 15) * 4
        udp = pkt[14+ihl:]
        sport, dport = struct.unpack(">HH", udp[:4])
        src = (".".join(map(str, pkt[26:30])), sport); dst = (".".join(map(str, pkt[30:34])), dport)
        if src in cards and dst in cards:
            dgrams.append((cards[src], cards[dst], udp[8:]))
opened, epochs, same_host, seen, reused = 0, set(), 0, set(), 0
for s, r, d in dgrams:
    ver, kind, _, vpc, epoch, sender, seq = struct.unpack(">BBHIIIQ", d[:24])
    assert sender == s, (sender, s)
    pt = key(vpc, epoch, sender, r).decrypt(struct.pack(">IQ", epoch, seq), d[24:], d[:24])
    opened += 1
    epochs.add(epoch)
    if {s, r} == {1, 2}: same_host += 1
    k = (epoch, s, r, seq)
    if k in seen: reused += 1
    seen.add(k)
print(json.dumps({"datagrams": len(dgrams), "opened": opened, "epochs": sorted(epochs),
                  "same_host": same_host, "nonce_reuse": reused, "plaintext_marker": clear}))
"#;

const FORGED: &str = r#"
import socket, struct
hdr = struct.pack(">BBHIIIQ", 1, 1, 0, 9, 1, 1, 1 << 62)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(hdr + b"\0" * 64, ("192.168.215.2", 4789))
"#;

fn ping(w: &World, from: usize, to: usize) -> bool {
    in_ns(
        &w.guests[from - 1],
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", &ip_of(to)],
    )
    .status
    .success()
}

#[test]
fn three_cards_one_vpc_routing_sealed_keys_rotation_and_restart() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("the VPC test needs root (network namespaces, TAP devices)");
        return;
    }
    for tool in ["ip", "tcpdump", "ping", "python3"] {
        if !have(tool) {
            skip_or_fail(&format!(
                "{tool} is not installed (scripts/install-deps.sh)"
            ));
            return;
        }
    }
    if !run(&["python3", "-c", "import cryptography"])
        .status
        .success()
    {
        skip_or_fail("python3 has no `cryptography` (scripts/install-deps.sh)");
        return;
    }
    let started = Instant::now();
    let mut w = World::new();
    let dir = w.dir.path().to_str().expect("utf8").to_owned();
    for (name, body) in [
        ("server.py", TCP_SERVER),
        ("client.py", TCP_CLIENT),
        ("decrypt.py", DECRYPTOR),
        ("forged.py", FORGED),
    ] {
        std::fs::write(w.path(name), body).expect("script");
    }

    // Each host's key (0600, root's, as the controller keeps it); the KMS's two epoch keys
    // sealed to each host. The epoch keys themselves stay in this process's memory.
    let mut epoch_keys = serde_json::Map::new();
    let mut raw_keys = Vec::new();
    let mut sealed = std::collections::HashMap::new();
    let hosts = [
        HostKey::generate().expect("host key"),
        HostKey::generate().expect("host key"),
    ];
    for (h, hk) in hosts.iter().enumerate() {
        let p = w.path(&format!("host{h}.key"));
        std::fs::write(&p, hk.to_file_bytes().expect("encode").as_ref()).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    for epoch in [1u32, 2] {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut k);
        epoch_keys.insert(epoch.to_string(), hex(&k).into());
        raw_keys.push(k);
        for (h, hk) in hosts.iter().enumerate() {
            let blob = seal_epoch_key(hk.public(), VpcId(VPC), KeyEpoch(epoch), &k).expect("seal");
            std::fs::write(w.path(&format!("epoch{epoch}.host{h}.sealed")), blob).expect("write");
            sealed.insert((epoch, h), hex(&blob));
        }
    }

    // Captures: the host link (cross-host) and host A's loopback (same-host).
    let mut pcaps = Vec::new();
    for (name, iface) in [("link.pcap", "hostlink"), ("lo.pcap", "lo")] {
        let pcap = w.path(name);
        let t = Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.hosts[0],
                "tcpdump",
                "-i",
                iface,
                "-U",
                "-n",
                "-w",
            ])
            .arg(&pcap)
            .args(["udp", "portrange", "4789-4790"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        pcaps.push((i32::try_from(t.id()).expect("pid"), pcap));
        w.children.push(t);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pcaps.iter().any(|(_, p)| !p.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut cards = vec![w.start_card(1, 1), w.start_card(2, 1), w.start_card(3, 1)];
    std::thread::sleep(Duration::from_millis(300));

    // Routing: same host (1↔2) and across hosts (1↔3, 3↔2).
    assert!(
        ping(&w, 1, 2),
        "guest 1 → guest 2 (same host, through both cards)"
    );
    assert!(ping(&w, 1, 3), "guest 1 → guest 3 (across hosts)");
    assert!(ping(&w, 3, 2), "guest 3 → guest 2");

    // A destination in the subnet that no card owns: dropped by card 1 and counted.
    let before = counters(&cards[0]);
    assert!(!in_ns(
        &w.guests[0],
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.0.1.50"]
    )
    .status
    .success());
    let after = counters(&cards[0]);
    assert!(
        n(&after, "unknown_destination") >= n(&before, "unknown_destination") + 2,
        "{after}"
    );

    // A datagram naming card 1 from an address that is not card 1's: forged_source at card 3.
    let before = counters(&cards[2]);
    let o = in_ns(&w.hosts[0], &["python3", &format!("{dir}/forged.py")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(200));
    let after = counters(&cards[2]);
    assert_eq!(
        n(&after, "forged_source"),
        n(&before, "forged_source") + 1,
        "{after}"
    );

    // Rotation while one TCP connection (guest 1 → guest 3) exchanges lines.
    let server = Command::new("ip")
        .args(["netns", "exec", &w.guests[2], "python3"])
        .arg(w.path("server.py"))
        .args([&ip_of(3), "3"])
        .spawn()
        .expect("server");
    w.children.push(server);
    std::thread::sleep(Duration::from_millis(400));
    let client = Command::new("ip")
        .args(["netns", "exec", &w.guests[0], "python3"])
        .arg(w.path("client.py"))
        .args([&ip_of(3), "60", "0.05", MARKER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    std::thread::sleep(Duration::from_millis(400));
    // A blob sealed to the other host's key does not open.
    let r = control(
        &cards[0],
        serde_json::json!({"op": "install", "epoch": 2, "sealed": sealed[&(2, 1)]}),
    );
    assert_eq!(r["ok"], false, "host B's blob opened on host A: {r}");
    for (i, card) in cards.iter().enumerate() {
        let h = host_of(i + 1);
        let r = must(
            card,
            serde_json::json!({"op": "install", "epoch": 2, "sealed": sealed[&(2, h)]}),
        );
        assert_eq!(r["live"], serde_json::json!([1, 2]), "{r}");
    }
    let r = control(&cards[0], serde_json::json!({"op": "retire", "epoch": 1}));
    assert_eq!(r["ok"], false, "the send epoch was retired: {r}");
    std::thread::sleep(Duration::from_millis(300));
    must(&cards[0], serde_json::json!({"op": "send", "epoch": 2}));
    std::thread::sleep(Duration::from_millis(600));
    for card in &cards[1..] {
        must(card, serde_json::json!({"op": "send", "epoch": 2}));
    }
    std::thread::sleep(Duration::from_millis(300));
    for card in &cards {
        let r = must(card, serde_json::json!({"op": "retire", "epoch": 1}));
        assert_eq!(r["live"], serde_json::json!([2]), "{r}");
    }
    let out = client.wait_with_output().expect("client");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK 60",
        "TCP connection across the rotation: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for card in &cards {
        let c = counters(card);
        for k in ["unknown_epoch", "forged", "replayed", "too_old", "no_key"] {
            assert_eq!(n(&c, k), 0, "{k} during the rotation: {c}");
        }
        assert_eq!(n(&c, "key_retires"), 1, "{c}");
        assert!(
            n(&c, "key_pages_wiped") >= 2,
            "retired epoch's two peer pages wiped: {c}"
        );
    }

    // kill -9 card 1 and restart it (the controller's job) on the current epoch. Its TAP goes
    // back to the host namespace for the new card to attach (the guest sees link down/up).
    // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
    assert_eq!(unsafe { libc::kill(cards[0].pid, libc::SIGKILL) }, 0);
    let _ = w.children[cards[0].child_index].wait();
    ok(&["ip", "-n", &w.guests[0], "link", "del", "vtap1"]);
    let before3 = counters(&cards[2]);
    cards[0] = w.start_card(1, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ping(&w, 1, 3), "guest 1 → guest 3 after card 1's restart");
    assert!(ping(&w, 1, 2), "guest 1 → guest 2 after card 1's restart");
    let o = in_ns(
        &w.guests[0],
        &[
            "python3",
            &format!("{dir}/client.py"),
            &ip_of(3),
            "5",
            "0.01",
            MARKER,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK 5");
    let after3 = counters(&cards[2]);
    for k in ["replayed", "too_old", "forged"] {
        assert_eq!(
            n(&after3, k),
            n(&before3, k),
            "{k} after the restart: {after3}"
        );
    }

    // The captures: all ciphertext, all authentic, epochs 1 and 2, same-host traffic sealed
    // too, and no (key, nonce) pair twice — the restarted card did not reuse its numbers.
    std::thread::sleep(Duration::from_millis(300));
    let list: Vec<&str> = pcaps
        .iter()
        .map(|(_, p)| p.to_str().expect("utf8"))
        .collect();
    let dec = run(&[
        "python3",
        &format!("{dir}/decrypt.py"),
        &list.join(","),
        &serde_json::Value::Object(epoch_keys).to_string(),
        MARKER,
    ]);
    assert!(
        dec.status.success(),
        "decryptor: {}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&dec.stdout).expect("json");
    eprintln!("independent decryptor: {report}");
    assert!(n(&report, "datagrams") >= 100, "{report}");
    assert_eq!(n(&report, "opened"), n(&report, "datagrams"), "{report}");
    assert_eq!(report["epochs"], serde_json::json!([1, 2]), "{report}");
    assert!(n(&report, "same_host") >= 4, "{report}");
    assert_eq!(n(&report, "nonce_reuse"), 0, "{report}");
    assert_eq!(report["plaintext_marker"], false, "{report}");

    // No plaintext key on disk: only sealed blobs, host keys, sequence floors.
    for e in std::fs::read_dir(w.dir.path())
        .expect("dir")
        .map_while(Result::ok)
    {
        let body = std::fs::read(e.path()).unwrap_or_default();
        for key in &raw_keys {
            assert!(
                !body.windows(32).any(|win| win == key.as_slice()),
                "{:?} holds an epoch key",
                e.path()
            );
        }
    }

    for card in &cards {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(card.pid, libc::SIGTERM) }, 0);
        let last = card
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("final counters");
        let v: serde_json::Value = serde_json::from_str(&last).expect("json");
        assert!(n(&v, "key_pages_wiped") >= 2, "{v}");
        assert_eq!(n(&v, "seccomp_traps"), 0, "{v}");
        let status = w.children[card.child_index].wait().expect("wait card");
        assert!(status.success(), "card exit: {status}");
    }
    for (pid, _) in &pcaps {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    eprintln!("VPC test took {:?}", started.elapsed());
}
