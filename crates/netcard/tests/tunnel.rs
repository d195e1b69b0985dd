//! Two real net cards in TAP mode, one in each of two network namespaces joined by a veth pair
//! (the "host network"). The kernels of the namespaces stand in for the guests.
//!
//! Checks: busybox `udhcpc` gets its lease from the card; ping and a TCP exchange pass through
//! the cards; a port without an ingress rule is blocked and counted; frames with a forged
//! source address are dropped and counted; `tcpdump` on the veth sees no plaintext marker, and
//! an independent decryptor (Python `cryptography`, given the key) recovers it from the
//! captured datagrams; a captured datagram replayed, one with a bit flipped and a truncated one
//! (sent with the source spoofed to the pinned peer address) are dropped and counted, and one
//! from an unpinned source is counted as `forged_source`, while the exchange still works; at exit each card wipes its key
//! page. Needs root (namespaces, TAP); skips loudly otherwise.

mod common;

use bulkhead_testkit::skip_or_fail;
use common::{have, in_ns, ok, run};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-netcard");
const PORT: u16 = 4789;
const MARKER: &str = "BULKHEAD-NETCARD-MARKER-7d41";

/// Namespaces, card processes and tcpdump, torn down on drop (also when the test fails).
struct World {
    ns: [String; 2],
    veth: [String; 2],
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.ns {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

struct Card {
    child_index: usize,
    pid: i32,
    lines: mpsc::Receiver<String>,
}

impl World {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let w = World {
            ns: [format!("nct{id}a"), format!("nct{id}b")],
            veth: [format!("nctv{id}a"), format!("nctv{id}b")],
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for ns in &w.ns {
            ok(&["ip", "netns", "add", ns]);
        }
        ok(&[
            "ip", "link", "add", &w.veth[0], "type", "veth", "peer", "name", &w.veth[1],
        ]);
        for i in 0..2 {
            let (ns, veth) = (&w.ns[i], &w.veth[i]);
            let host = format!("192.168.213.{}/24", i + 1);
            let guest = format!("10.0.1.{}/24", 11 + i);
            let mac = format!("02:00:00:00:00:1{}", i + 1);
            ok(&["ip", "link", "set", veth, "netns", ns]);
            ok(&["ip", "-n", ns, "addr", "add", &host, "dev", veth]);
            ok(&["ip", "-n", ns, "link", "set", veth, "up"]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            ok(&[
                "ip", "-n", ns, "tuntap", "add", "dev", "nctap", "mode", "tap",
            ]);
            let _ = in_ns(ns, &["sysctl", "-qw", "net.ipv6.conf.nctap.disable_ipv6=1"]);
            ok(&[
                "ip", "-n", ns, "link", "set", "nctap", "address", &mac, "mtu", "1400", "up",
            ]);
            ok(&["ip", "-n", ns, "addr", "add", &guest, "dev", "nctap"]);
        }
        w
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_card(&mut self, i: usize, key: &Path) -> Card {
        let me = format!("192.168.213.{}:{PORT}", i + 1);
        let peer = format!("192.168.213.{}:{PORT}", 2 - i);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns[i], BIN, "tap", "--tap", "nctap"])
            .args(["--listen", &me, "--peer", &peer])
            .arg("--key-file")
            .arg(key)
            .args(["--vpc", "7", "--epoch", "1"])
            .args(["--card-id", &(i + 1).to_string()])
            .args(["--peer-card-id", &(2 - i).to_string()])
            .args(["--mac", &format!("02:00:00:00:00:1{}", i + 1)])
            .args(["--ip", &format!("10.0.1.{}/24", 11 + i)])
            .args([
                "--allow",
                "icmp:10.0.1.0/24",
                "--allow",
                "tcp:7000:10.0.1.0/24",
            ])
            .args(["--uid", "65534", "--gid", "65534"])
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
        Card {
            child_index: self.children.len() - 1,
            pid,
            lines: rx,
        }
    }
}

/// `ip netns exec` forks the card as its own child (exec, same pid), so signals reach it.
fn counters(card: &Card) -> serde_json::Value {
    // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
    assert_eq!(unsafe { libc::kill(card.pid, libc::SIGUSR1) }, 0);
    let line = card
        .lines
        .recv_timeout(Duration::from_secs(5))
        .expect("counters line after SIGUSR1");
    serde_json::from_str(&line).expect("counters are JSON")
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no counter {k} in {v}"))
}

const TCP_SERVER: &str = r#"
import socket, sys
out = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.1.12", int(sys.argv[2]))); s.listen(4); s.settimeout(20)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept(); c.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    open(out, "ab").write(data)
    c.sendall(b"ACK " + data)
    c.close()
"#;

const TCP_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("10.0.1.12", int(sys.argv[1])), timeout=float(sys.argv[3]))
s.sendall(sys.argv[2].encode() + b"\n")
reply = b""
while not reply.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    reply += chunk
print(reply.decode().strip())
"#;

/// Independent decryptor: reads the pcap, derives the direction keys with HKDF-SHA256 and
/// opens every captured datagram with AESGCM. Also writes three attack datagrams: the last
/// captured A→B datagram verbatim (replay), the same with one bit of its sequence number
/// flipped (forgery), and its first 30 bytes (truncated).
const DECRYPTOR: &str = r#"
import json, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes
pcap, keyfile, marker, attack_dir = sys.argv[1], sys.argv[2], sys.argv[3].encode(), sys.argv[4]
raw = open(pcap, "rb").read()
master = open(keyfile, "rb").read()
assert len(master) == 32
label = b"bulkhead-netcard v1"
def key(vpc, epoch, sender, receiver):
    info = label + struct.pack(">IIII", vpc, epoch, sender, receiver)
    return AESGCM(HKDF(hashes.SHA256(), 32, label, info).derive(master))
magic = struct.unpack("<I", raw[:4])[0]
endian = "<" if magic in (0xa1b2c3d4, 0xa1b23c4d) else ">"
linktype = struct.unpack(endian + "I", raw[20:24])[0]
assert linktype == 1, linktype
off, dgrams = 24, []
while off + 16 <= len(raw):
    _, _, incl, _ = struct.unpack(endian + "IIII", raw[off:off+16]); off += 16
    pkt = raw[off:off+incl]; off += incl
    if pkt[12:14] != b"\x08\x00": continue
    ihl = (pkt[14] & 15) * 4
    if pkt[23] != 17: continue
    udp = pkt[14+ihl:]
    dport = struct.unpack(">H", udp[2:4])[0]
    if dport != 4789: continue
    dst = pkt[30:34]
    dgrams.append((dst, udp[8:]))
opened, found, last_a_to_b = 0, False, None
for dst, d in dgrams:
    ver, kind, _, vpc, epoch, sender, seq = struct.unpack(">BBHIIIQ", d[:24])
    receiver = 2 if sender == 1 else 1
    pt = key(vpc, epoch, sender, receiver).decrypt(struct.pack(">IQ", epoch, seq), d[24:], d[:24])
    opened += 1
    found = found or marker in pt
    if sender == 1: last_a_to_b = d
flip = bytearray(last_a_to_b); flip[18] ^= 0x10
open(attack_dir + "/replay", "wb").write(last_a_to_b)
open(attack_dir + "/flip", "wb").write(bytes(flip))
open(attack_dir + "/trunc", "wb").write(last_a_to_b[:30])
print(json.dumps({"datagrams": len(dgrams), "opened": opened, "marker_found": found,
                  "plaintext_marker_in_capture": marker in raw}))
"#;

/// The host-network attacker: sends each file as a UDP datagram whose source is spoofed to card
/// A's pinned address (raw socket, so the receiver's source pin does not stop it and the crypto
/// and replay window must), then the first file once more from an ordinary socket (an
/// unpinned source: `forged_source`).
const SENDER: &str = r#"
import socket, struct, sys
src, dst = socket.inet_aton("192.168.213.1"), socket.inet_aton("192.168.213.2")
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for f in sys.argv[1:]:
    body = open(f, "rb").read()
    udp = struct.pack(">HHHH", 4789, 4789, 8 + len(body), 0) + body
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    raw.sendto(ip + udp, ("192.168.213.2", 0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(open(sys.argv[1], "rb").read(), ("192.168.213.2", 4789))
"#;

const DHCP_SCRIPT: &str = "#!/bin/sh\necho \"$1 ip=$ip subnet=$subnet router=$router mtu=$mtu\" >> \"$(dirname \"$0\")/lease.txt\"\n";

#[test]
fn two_cards_tunnel_tcp_and_ping_with_ciphertext_on_the_wire() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("the net card tunnel test needs root (network namespaces, TAP devices)");
        return;
    }
    for tool in ["ip", "tcpdump", "ping", "python3", "busybox"] {
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
    let key = w.path("vpc7.key");
    let mut k = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut k);
    std::fs::write(&key, k).expect("key");
    for (name, body) in [
        ("server.py", TCP_SERVER),
        ("client.py", TCP_CLIENT),
        ("decrypt.py", DECRYPTOR),
        ("send.py", SENDER),
        ("udhcpc.sh", DHCP_SCRIPT),
    ] {
        std::fs::write(w.path(name), body).expect("script");
    }
    ok(&["chmod", "755", w.path("udhcpc.sh").to_str().expect("utf8")]);
    let dir = w.dir.path().to_str().expect("utf8").to_owned();

    // The capture on the host network, started before any card sends.
    let pcap = w.path("veth.pcap");
    let tcpdump = Command::new("ip")
        .args([
            "netns", "exec", &w.ns[0], "tcpdump", "-i", &w.veth[0], "-U", "-n", "-w",
        ])
        .arg(&pcap)
        .args(["udp", "port", &PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    let tcpdump_pid = i32::try_from(tcpdump.id()).expect("pid");
    w.children.push(tcpdump);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pcap.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));

    let a = w.start_card(0, &key);
    let b = w.start_card(1, &key);
    std::thread::sleep(Duration::from_millis(500));

    // DHCP: busybox udhcpc on A's TAP gets address, mask, router and MTU from card A.
    let dhcp = in_ns(
        &w.ns[0],
        &[
            "busybox",
            "udhcpc",
            "-i",
            "nctap",
            "-n",
            "-q",
            "-f",
            "-t",
            "4",
            "-T",
            "1",
            "-s",
            &format!("{dir}/udhcpc.sh"),
        ],
    );
    let lease = std::fs::read_to_string(w.path("lease.txt")).unwrap_or_default();
    assert!(
        lease.contains("bound ip=10.0.1.11 subnet=255.255.255.0 router=10.0.1.1 mtu=1400"),
        "udhcpc lease: {lease:?}, udhcpc: {}",
        String::from_utf8_lossy(&dhcp.stderr)
    );

    // Ping through the cards.
    let ping = in_ns(
        &w.ns[0],
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.1.12"],
    );
    assert!(
        ping.status.success(),
        "ping A→B through the cards: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // TCP: two exchanges on the allowed port (the second after the attacks below).
    let recv = w.path("received.txt");
    let server = Command::new("ip")
        .args(["netns", "exec", &w.ns[1], "python3"])
        .arg(w.path("server.py"))
        .arg(&recv)
        .args(["7000", "2"])
        .spawn()
        .expect("server");
    w.children.push(server);
    let blocked_server = Command::new("ip")
        .args(["netns", "exec", &w.ns[1], "python3"])
        .arg(w.path("server.py"))
        .arg(w.path("blocked.txt"))
        .args(["7001", "1"])
        .spawn()
        .expect("server 7001");
    w.children.push(blocked_server);
    std::thread::sleep(Duration::from_millis(500));
    let client = |port: &str, msg: &str, timeout: &str| {
        in_ns(
            &w.ns[0],
            &["python3", &format!("{dir}/client.py"), port, msg, timeout],
        )
    };
    let first = client("7000", &format!("{MARKER}-1"), "10");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("ACK {MARKER}-1"),
        "TCP exchange through the cards: {}",
        String::from_utf8_lossy(&first.stderr)
    );

    // A port without an ingress rule: the SYN is dropped by card B's security group.
    let before_b = counters(&b);
    let blocked = client("7001", "should-not-arrive", "2");
    assert!(
        !blocked.status.success(),
        "port 7001 has no ingress rule but connected"
    );
    let after_b = counters(&b);
    assert!(
        n(&after_b, "dropped_secgroup_in") > n(&before_b, "dropped_secgroup_in"),
        "blocked SYNs counted: {after_b}"
    );

    // Anti-spoofing: A's kernel sends from an address that is not the interface's own.
    let before_a = counters(&a);
    ok(&[
        "ip",
        "-n",
        &w.ns[0],
        "addr",
        "add",
        "10.0.1.99/24",
        "dev",
        "nctap",
    ]);
    let spoof = in_ns(
        &w.ns[0],
        &[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.0.1.99",
            "10.0.1.12",
        ],
    );
    ok(&[
        "ip",
        "-n",
        &w.ns[0],
        "addr",
        "del",
        "10.0.1.99/24",
        "dev",
        "nctap",
    ]);
    assert!(
        !spoof.status.success(),
        "ping from a forged source address got through"
    );
    let after_a = counters(&a);
    assert!(
        n(&after_a, "spoofed") > n(&before_a, "spoofed"),
        "spoofed frames counted: {after_a}"
    );

    // The capture so far: no plaintext marker; the independent decryptor finds it.
    std::thread::sleep(Duration::from_millis(300));
    let dec = run(&[
        "python3",
        &format!("{dir}/decrypt.py"),
        pcap.to_str().expect("utf8"),
        key.to_str().expect("utf8"),
        MARKER,
        &dir,
    ]);
    assert!(
        dec.status.success(),
        "decryptor failed: {}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&dec.stdout).expect("decryptor prints JSON");
    eprintln!("independent decryptor: {report}");
    assert!(n(&report, "datagrams") >= 10, "{report}");
    assert_eq!(n(&report, "opened"), n(&report, "datagrams"), "{report}");
    assert_eq!(report["marker_found"], true, "{report}");
    assert_eq!(report["plaintext_marker_in_capture"], false, "{report}");

    // Attacks from the host network: replay, bit flip, truncation. All dropped and counted.
    let before_b = counters(&b);
    let sent = in_ns(
        &w.ns[0],
        &[
            "python3",
            &format!("{dir}/send.py"),
            &format!("{dir}/replay"),
            &format!("{dir}/flip"),
            &format!("{dir}/trunc"),
        ],
    );
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let after_b = counters(&b);
    for (counter, what) in [
        ("replayed", "replayed datagram"),
        ("forged", "bit-flipped datagram"),
        ("truncated", "truncated datagram"),
    ] {
        assert_eq!(
            n(&after_b, counter),
            n(&before_b, counter) + 1,
            "{what} dropped and counted: {after_b}"
        );
    }
    assert_eq!(
        n(&after_b, "forged_source"),
        n(&before_b, "forged_source") + 1,
        "datagram from an unpinned source dropped and counted: {after_b}"
    );
    assert_eq!(
        n(&after_b, "rx_packets"),
        n(&before_b, "rx_packets"),
        "none of the attack datagrams reached the guest"
    );

    // The exchange still works.
    let second = client("7000", &format!("{MARKER}-2"), "10");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        format!("ACK {MARKER}-2")
    );
    let got = std::fs::read_to_string(&recv).unwrap_or_default();
    assert!(got.contains(&format!("{MARKER}-1")) && got.contains(&format!("{MARKER}-2")));
    assert!(!w.path("blocked.txt").exists(), "port 7001 received data");

    // Orderly stop: each card prints its final counters with its key page wiped.
    for card in [&a, &b] {
        // SAFETY: as in `counters`.
        assert_eq!(unsafe { libc::kill(card.pid, libc::SIGTERM) }, 0);
        let last = card
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("final counters");
        let v: serde_json::Value = serde_json::from_str(&last).expect("json");
        assert_eq!(n(&v, "key_pages_wiped"), 1, "{v}");
        assert_eq!(n(&v, "seccomp_traps"), 0, "{v}");
        let status = w.children[card.child_index].wait().expect("wait card");
        assert!(status.success(), "card exit: {status}");
    }
    // SAFETY: as above; tcpdump flushes on SIGTERM.
    unsafe { libc::kill(tcpdump_pid, libc::SIGTERM) };
    eprintln!("tunnel test took {:?}", started.elapsed());
}
