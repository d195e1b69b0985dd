//! The net card in vhost-user-net mode, against real frontends: two `bulkhead-netcard vhost`
//! processes (one VPC, sealed epoch keys, loopback UDP between them, sandboxed as uid 65534).
//!
//! * `frontends_exchange_frames_and_survive_bad_chains`: a vhost-user frontend written with the
//!   `vhost` crate (guest memory in a memfd, rings laid out by hand) plays each guest: feature
//!   and GET_CONFIG negotiation, ARP answered by the card, ICMP 1 → 2 → 1 through both cards,
//!   adversarial TX chains (outside guest memory, header too short, oversized, device-writable,
//!   looping, head index beyond the queue) each returned to the used ring and counted while
//!   the queue keeps working, the RX backlog (frames held while the guest has no buffer, the
//!   excess counted), `routes` and `rules` replaced over the control socket, a frontend
//!   disconnect and reconnect with the card's state kept, and a clean SIGTERM exit with the
//!   key pages wiped and no seccomp trap.
//! * `qemu_guests_dhcp_ping_and_tcp`: QEMU is the frontend (`-netdev vhost-user`,
//!   `virtio-net-pci`) booting the test guest under TCG: guest 1 gets its DHCP lease from its
//!   card, the guests ping each other and pass a TCP marker with `nc`; an oversized frame from
//!   the guest is counted and the card keeps running.

#![allow(clippy::cast_possible_truncation)]

mod common;
#[path = "common/frontend.rs"]
mod frontend;
#[path = "common/vu_proxy.rs"]
mod vu_proxy;

use bulkhead_netcard::control::seal_epoch_key;
use bulkhead_netcard::encap::{KeyEpoch, VpcId};
use bulkhead_sealing::HostKey;
use bulkhead_testkit::skip_or_fail;
use frontend::{NetFrontend, F_NEXT, F_WRITE, TX};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-netcard");
const VPC: u32 = 9;
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn mac_of(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, 1, i as u8]
}
fn ip_of(i: usize) -> [u8; 4] {
    [10, 0, 1, 10 + i as u8]
}
fn ip_text(i: usize) -> String {
    let a = ip_of(i);
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}
fn mac_text(i: usize) -> String {
    mac_of(i)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Card {
    child: Child,
    lines: mpsc::Receiver<String>,
    control: PathBuf,
    vhost: PathBuf,
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    dir: tempfile::TempDir,
    ports: [u16; 2],
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // One host: one host key; epoch 1 sealed to it as the KMS does.
        let hk = HostKey::generate().expect("host key");
        let p = dir.path().join("host.key");
        std::fs::write(&p, hk.to_file_bytes().expect("encode").as_ref()).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut k);
        let blob = seal_epoch_key(hk.public(), VpcId(VPC), KeyEpoch(1), &k).expect("seal");
        std::fs::write(dir.path().join("epoch1.sealed"), blob).expect("write");
        World {
            dir,
            ports: [free_udp_port(), free_udp_port()],
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn route(&self, j: usize) -> String {
        format!("{}={j}@127.0.0.1:{}", ip_text(j), self.ports[j - 1])
    }

    /// Starts card `i` (1 or 2) in vhost mode; returns once its control socket answers.
    fn start(&self, i: usize, mtu: u16) -> Card {
        let control = self.path(&format!("card{i}.ctl"));
        let vhost = self.path(&format!("card{i}.vhost"));
        let j = 3 - i;
        let mut child = Command::new(BIN)
            .arg("vhost")
            .arg("--vhost-socket")
            .arg(&vhost)
            .arg("--control")
            .arg(&control)
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i - 1])])
            .args(["--vpc", &VPC.to_string(), "--epoch", "1"])
            .args(["--card-id", &i.to_string()])
            .arg("--host-key")
            .arg(self.path("host.key"))
            .arg("--sealed-key")
            .arg(self.path("epoch1.sealed"))
            .arg("--seq-state")
            .arg(self.path(&format!("card{i}.seq")))
            .args(["--mac", &mac_text(i), "--ip", &format!("{}/24", ip_text(i))])
            .args(["--mtu", &mtu.to_string()])
            .args([
                "--allow",
                "icmp:10.0.1.0/24",
                "--allow",
                "tcp:7000:10.0.1.0/24",
            ])
            .args(["--route", &self.route(j)])
            .args(["--uid", "65534", "--gid", "65534"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn card");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let card = Card {
            child,
            lines: rx,
            control,
            vhost,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&card.control).is_err() {
            assert!(Instant::now() < deadline, "card {i} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        card
    }
}

fn control(card: &Card, req: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(&card.control).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("{req}\n").as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

fn counters(card: &Card) -> serde_json::Value {
    control(card, serde_json::json!({"op": "counters"}))
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no counter {k} in {v}"))
}

/// SIGTERM, then the exit line: exit status 0, key pages wiped, no seccomp trap.
fn stop(mut card: Card) -> serde_json::Value {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(card.child.id() as i32, libc::SIGTERM) };
    let status = card.child.wait().expect("wait");
    assert!(status.success(), "card exit: {status:?}");
    let mut last = None;
    while let Ok(l) = card.lines.recv_timeout(Duration::from_secs(2)) {
        last = Some(l);
    }
    let v: serde_json::Value =
        serde_json::from_str(last.as_deref().unwrap_or("{}")).expect("exit counters");
    assert!(n(&v, "key_pages_wiped") >= 1, "{v}");
    assert_eq!(n(&v, "seccomp_traps"), 0, "{v}");
    v
}

fn csum(data: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        s += u32::from(w);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(i: usize, target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac_of(i));
    a.extend_from_slice(&ip_of(i));
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth([0xff; 6], mac_of(i), 0x0806, &a)
}

/// ICMP echo (type 8) or echo reply (type 0) from guest `i` to guest `j`.
fn icmp(i: usize, j: usize, ty: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0x12, 0x34];
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + m.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&ip_of(i));
    ip.extend_from_slice(&ip_of(j));
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&m);
    eth(GW_MAC, mac_of(i), 0x0800, &ip)
}

fn is_icmp_from(f: &[u8], i: usize, j: usize, ty: u8, payload: &[u8]) -> bool {
    f.len() >= 42
        && f[..6] == mac_of(j)
        && f[12..14] == [8, 0]
        && f[26..30] == ip_of(i)
        && f[30..34] == ip_of(j)
        && f[34] == ty
        && f.ends_with(payload)
}

/// One echo request from `a`'s guest to `b`'s; true if `b` received it.
fn ping(fa: &mut NetFrontend, fb: &mut NetFrontend, i: usize, j: usize, seq: u16) -> bool {
    let payload = format!("bulkhead-vhost-{seq}");
    let head = fa.send(&icmp(i, j, 8, seq, payload.as_bytes()));
    assert_eq!(fa.wait_tx(head), 0, "TX used length");
    fb.recv(1, Duration::from_secs(3))
        .iter()
        .any(|f| is_icmp_from(f, i, j, 8, payload.as_bytes()))
}

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn frontends_exchange_frames_and_survive_bad_chains() {
    if !root() {
        skip_or_fail("vhost card test needs root (the card drops to uid 65534)");
        return;
    }
    let w = World::new();
    let c1 = w.start(1, 1400);
    let c2 = w.start(2, 1400);

    // Negotiation and the config space: the card decides the MAC.
    let mut f1 = NetFrontend::connect(&c1.vhost);
    let want = frontend::VERSION_1 | frontend::MAC | frontend::MTU | frontend::STATUS;
    assert_eq!(f1.offered & want, want, "offered {:#x}", f1.offered);
    assert!(f1.offered & frontend::EVENT_IDX != 0);
    // No checksum/GSO offloads (bits 0, 1, 6..=15) and no MQ (22).
    assert_eq!(
        f1.offered & 0x0040_ffc3,
        0,
        "offloads offered: {:#x}",
        f1.offered
    );
    assert_eq!(&f1.config[..6], &mac_of(1));
    assert_eq!(&f1.config[6..8], &[1, 0], "status LINK_UP");
    assert_eq!(&f1.config[8..10], &[1, 0], "one queue pair");
    assert_eq!(u16::from_le_bytes([f1.config[10], f1.config[11]]), 1400);
    let mut f2 = NetFrontend::connect(&c2.vhost);
    assert_eq!(&f2.config[..6], &mac_of(2));
    f1.post_rx(0, 16);
    f2.post_rx(0, 16);

    // ARP for the peer is answered by the card with the gateway MAC.
    let h = f1.send(&arp_request(1, ip_of(2)));
    f1.wait_tx(h);
    let got = f1.recv(1, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "no ARP reply");
    let r = &got[0];
    assert_eq!(&r[..6], &mac_of(1));
    assert_eq!(&r[12..14], &[8, 6]);
    assert_eq!(&r[20..22], &[0, 2], "ARP reply");
    assert_eq!(&r[22..28], &GW_MAC);
    assert_eq!(&r[28..32], &ip_of(2));

    // ICMP through both cards, both ways.
    assert!(ping(&mut f1, &mut f2, 1, 2, 1), "1 → 2");
    let h = f2.send(&icmp(2, 1, 0, 1, b"reply-1"));
    f2.wait_tx(h);
    assert!(
        f1.recv(1, Duration::from_secs(3))
            .iter()
            .any(|f| is_icmp_from(f, 2, 1, 0, b"reply-1")),
        "2 → 1 reply"
    );

    // Adversarial TX chains: each comes back on the used ring and is counted.
    let before = counters(&c1);
    let a = f1.tx_area(40);
    f1.mem_zero(a, 64);
    let beyond = frontend::MEM_SIZE as u64 + 0x1000;
    // (descriptors as (addr, len, flags, next), counter)
    type Chain = Vec<(u64, u32, u16, u16)>;
    let cases: Vec<(Chain, &str)> = vec![
        (vec![(beyond, 100, 0, 0)], "tx_bad_chain"),
        (
            vec![(a, 12, F_NEXT, 201), (beyond, 60, 0, 0)],
            "tx_bad_chain",
        ),
        (vec![(u64::MAX - 8, 64, 0, 0)], "tx_bad_chain"),
        (vec![(a, 8, 0, 0)], "tx_short_header"),
        (vec![(a, 12 + 3000, 0, 0)], "tx_oversized"),
        (
            vec![(a, 12, F_NEXT, 201), (a, 0x10_0000, 0, 0)],
            "tx_oversized",
        ),
        (vec![(a, 60, F_WRITE, 0)], "tx_bad_chain"),
        // A descriptor that points at itself: a loop the parser cuts off.
        (vec![(a, 0, F_NEXT, 200)], "tx_bad_chain"),
    ];
    let mut want_delta = std::collections::HashMap::<&str, u64>::new();
    for (chain, ctr) in &cases {
        for (k, (addr, len, flags, next)) in chain.iter().enumerate() {
            f1.write_desc(TX, 200 + k as u16, *addr, *len, *flags, *next);
        }
        f1.publish(TX, 200);
        f1.kick(TX);
        assert_eq!(f1.wait_tx(200), 0);
        *want_delta.entry(ctr).or_default() += 1;
    }
    // A head index beyond the queue: nothing to return it to; counted, queue goes on.
    f1.publish(TX, 999);
    f1.kick(TX);
    *want_delta.entry("tx_bad_chain").or_default() += 1;
    std::thread::sleep(Duration::from_millis(300));
    let after = counters(&c1);
    for (k, d) in &want_delta {
        assert_eq!(n(&after, k) - n(&before, k), *d, "{k}: {before} → {after}");
    }
    assert_eq!(n(&after, "io_errors"), 0, "{after}");
    assert!(
        ping(&mut f1, &mut f2, 1, 2, 2),
        "queue works after bad chains"
    );

    // RX backlog: 16 buffers posted, 20 frames sent: 4 wait in the card until buffers come
    // back; then a flood beyond the backlog is counted as dropped.
    for s in 0..20u16 {
        let h = f2.send(&icmp(2, 1, 0, 100 + s, b"backlog"));
        f2.wait_tx(h);
    }
    std::thread::sleep(Duration::from_millis(300));
    let got = f1.recv(20, Duration::from_secs(5));
    assert_eq!(got.len(), 20, "backlogged frames delivered after RX kick");
    assert_eq!(n(&counters(&c1), "rx_no_buffer"), 0);
    let flood = 16 + 256 + 40;
    for s in 0..flood {
        let h = f2.send(&icmp(2, 1, 0, 1000 + s, b"flood"));
        f2.wait_tx(h);
    }
    std::thread::sleep(Duration::from_millis(500));
    let v = counters(&c1);
    assert!(n(&v, "rx_no_buffer") >= 30, "{v}");
    let got = f1.recv(400, Duration::from_secs(3));
    assert!(got.len() >= 16 + 200, "{} delivered", got.len());

    // rules: without an ICMP rule card 2 drops echo requests; restored, they pass.
    let r = control(
        &c2,
        serde_json::json!({"op": "rules", "allow": ["tcp:7000:10.0.1.0/24"]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let d0 = n(&counters(&c2), "dropped_secgroup_in");
    assert!(
        !ping(&mut f1, &mut f2, 1, 2, 3),
        "ICMP passed without a rule"
    );
    assert_eq!(n(&counters(&c2), "dropped_secgroup_in"), d0 + 1);
    let bad = control(
        &c2,
        serde_json::json!({"op": "rules", "allow": ["tcp:nope"]}),
    );
    assert_eq!(bad["ok"], false, "{bad}");
    let r = control(
        &c2,
        serde_json::json!({"op": "rules", "allow": ["icmp:10.0.1.0/24"]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        ping(&mut f1, &mut f2, 1, 2, 4),
        "ICMP after the rule is back"
    );

    // routes: card 2 removed from card 1's table (its keys dropped), then added back (keys
    // derived again from the kept epoch key, no new sealed blob).
    let r = control(
        &c1,
        serde_json::json!({"op": "routes", "routes": ["10.0.1.50=7@127.0.0.1:9"]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let u0 = n(&counters(&c1), "unknown_destination");
    assert!(!ping(&mut f1, &mut f2, 1, 2, 5));
    assert_eq!(n(&counters(&c1), "unknown_destination"), u0 + 1);
    let bad = control(
        &c1,
        serde_json::json!({"op": "routes", "routes": ["10.0.1.60=1@127.0.0.1:9"]}),
    );
    assert_eq!(bad["ok"], false, "a route to the card itself: {bad}");
    let r = control(
        &c1,
        serde_json::json!({"op": "routes", "routes": [w.route(2)]}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(ping(&mut f1, &mut f2, 1, 2, 6), "after the route came back");

    // The frontend goes away and a new one connects: same card, same keys and windows.
    drop(f1);
    std::thread::sleep(Duration::from_millis(200));
    let mut f1 = NetFrontend::connect(&c1.vhost);
    f1.post_rx(0, 16);
    assert!(ping(&mut f1, &mut f2, 1, 2, 7), "after reconnect, 1 → 2");
    assert!(ping(&mut f2, &mut f1, 2, 1, 8), "after reconnect, 2 → 1");
    let v = counters(&c2);
    assert_eq!(
        n(&v, "replayed") + n(&v, "forged") + n(&v, "too_old"),
        0,
        "{v}"
    );

    let v1 = stop(c1);
    let v2 = stop(c2);
    // Echo requests 1, 2, 3 (dropped by card 2's rules), 4, 6, 7 left card 1 (5 had no
    // route); card 2 delivered all but 3.
    assert_eq!(n(&v1, "tx_packets"), 6, "{v1}");
    assert_eq!(n(&v2, "rx_packets"), 5, "{v2}");
}

// ---- QEMU as the frontend, booting the test guest ----

fn guest_dir() -> Option<PathBuf> {
    let d = std::env::var_os("BULKHEAD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    (d.join("vmlinux").exists() && d.join("initramfs.cpio").exists()).then_some(d)
}

fn encode_run(script: &str) -> String {
    script
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'_'
            | b'.'
            | b'/'
            | b','
            | b':'
            | b'='
            | b'+'
            | b'-' => char::from(b).to_string(),
            _ => format!("\\0{b:03o}"),
        })
        .collect()
}

fn cmdline() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/cmdline");
    std::fs::read_to_string(p)
        .expect("guest/cmdline")
        .trim()
        .to_owned()
}

/// Starts QEMU with the guest and the card's vhost-user socket; console lines go to a channel.
/// QEMU 7.2 reaches the card through [`vu_proxy`] (see there: it sends SET_VRING_ENABLE
/// before SET_FEATURES, which the vhost crate refuses).
fn qemu(
    guest: &Path,
    card: &Card,
    i: usize,
    script: &str,
    log: &Path,
) -> (Child, mpsc::Receiver<String>) {
    // Guest 1's device has no VIRTIO_NET_F_MTU (so its driver lets the script raise the MTU
    // and send a frame larger than the card's 1400); guest 2's has host_mtu=1400.
    // vectors=0: QEMU 7.2 segfaults in msix_set_vector_notifiers when a vhost-user device
    // starts under TCG with MSI-X; INTx avoids that path.
    let mtu = if i == 2 { ",host_mtu=1400" } else { "" };
    let sock = card.vhost.with_extension("qemu");
    vu_proxy::start(&sock, card.vhost.clone()).expect("relay");
    let append = format!("{} bulkhead.run={}", cmdline(), encode_run(script));
    let mut child = Command::new(
        std::env::var("BULKHEAD_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
    )
    .args(["-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1"])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(guest.join("vmlinux"))
    .arg("-initrd")
    .arg(guest.join("initramfs.cpio"))
    .args(["-append", &append])
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=c0,path={}", sock.display()))
    .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
    .args([
        "-device",
        &format!(
            "virtio-net-pci,netdev=n0,mac={}{mtu},vectors=0",
            mac_text(i)
        ),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("qemu");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let mut logf = std::fs::File::create(log).expect("log");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = writeln!(logf, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu-stderr: {line}")).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collects console lines until `BULKHEAD-RUN-EXIT=` (or the deadline).
fn console_until_exit(rx: &mpsc::Receiver<String>, deadline: Instant) -> Vec<String> {
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.contains("BULKHEAD-RUN-EXIT=");
                lines.push(l);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    lines
}

#[test]
fn qemu_guests_dhcp_ping_and_tcp() {
    if !root() {
        skip_or_fail("QEMU vhost test needs root");
        return;
    }
    let Some(guest) = guest_dir() else {
        skip_or_fail("no test guest in target/guest (make guest)");
        return;
    };
    let w = World::new();
    let c1 = w.start(1, 1400);
    let c2 = w.start(2, 1400);
    // Guest 1: serves one TCP connection on 7000 and prints what it got; then sends one
    // oversized frame (MTU raised above the card's 1400: the card must drop and count it).
    let s1 = format!(
        "p=0\n\
         while [ $p -lt 30 ]; do ping -c 1 -W 1 {peer} >/dev/null && echo PING-OK && break; sleep 1; p=$((p+1)); done\n\
         nc -l -p 7000 -w 60 >/tmp/got\n\
         read -r got </tmp/got\n\
         echo \"GOT=$got\"\n\
         ip link set eth0 mtu 4000\n\
         ping -c 1 -W 1 -s 3000 {peer} >/dev/null\n\
         echo OVERSIZED-SENT\n",
        peer = ip_text(2)
    );
    // Guest 2: pings guest 1, then connects until guest 1 listens.
    let s2 = format!(
        "p=0\n\
         while [ $p -lt 30 ]; do ping -c 1 -W 1 {peer} >/dev/null && echo PING-OK && break; sleep 1; p=$((p+1)); done\n\
         i=0\n\
         while [ $i -lt 40 ]; do\n\
           echo BULKHEAD-VHOST-MARKER | nc -w 2 {peer} 7000 && break\n\
           sleep 1; i=$((i+1))\n\
         done\n\
         echo SENT=$i\n",
        peer = ip_text(1)
    );
    let (mut q1, r1) = qemu(&guest, &c1, 1, &s1, &w.path("guest1.log"));
    let (mut q2, r2) = qemu(&guest, &c2, 2, &s2, &w.path("guest2.log"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let h2 = std::thread::spawn(move || console_until_exit(&r2, deadline));
    let l1 = console_until_exit(&r1, deadline);
    let l2 = h2.join().expect("console 2");
    let _ = q1.kill();
    let _ = q2.kill();
    let _ = q1.wait();
    let _ = q2.wait();
    let has = |l: &[String], s: &str| l.iter().any(|x| x.contains(s));
    let show = |l: &[String]| l.join("\n");
    assert!(
        has(&l1, "BULKHEAD-GUEST-READY"),
        "guest 1 did not boot:\n{}",
        show(&l1)
    );
    assert!(
        has(&l2, "BULKHEAD-GUEST-READY"),
        "guest 2 did not boot:\n{}",
        show(&l2)
    );
    let v1 = counters(&c1);
    if !has(&l1, "BULKHEAD-NET-UP=") && !has(&l1, "BULKHEAD-NET-DOWN") {
        // A guest without networking (no CONFIG_VIRTIO_NET yet): only the negotiation and the
        // boot are checked.
        skip_or_fail("the test guest has no networking yet (no BULKHEAD-NET-UP/DOWN)");
        return;
    }
    assert!(
        has(&l1, &format!("BULKHEAD-NET-UP={}/24", ip_text(1))),
        "guest 1 lease:\n{}\ncard 1: {v1}",
        show(&l1)
    );
    assert!(n(&v1, "dhcp_replies") >= 2, "{v1}");
    assert!(has(&l1, "PING-OK"), "guest 1 ping:\n{}\n{v1}", show(&l1));
    assert!(has(&l2, "PING-OK"), "guest 2 ping:\n{}", show(&l2));
    assert!(
        has(&l1, "GOT=BULKHEAD-VHOST-MARKER"),
        "TCP marker:\n{}\n---\n{}",
        show(&l1),
        show(&l2)
    );
    assert!(has(&l1, "OVERSIZED-SENT"), "{}", show(&l1));
    let v1 = counters(&c1);
    assert!(n(&v1, "tx_oversized") >= 1, "{v1}");
    let v1 = stop(c1);
    let v2 = stop(c2);
    assert!(
        n(&v1, "rx_packets") >= 3 && n(&v2, "rx_packets") >= 3,
        "{v1} {v2}"
    );
}
