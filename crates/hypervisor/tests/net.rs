//! virtio-net: the hypervisor's vhost-user-net frontend on virtio-pci, cold-plugged with
//! `run --net` and hot-plugged with `AttachNet`/`DetachNet`, driven the way the controller
//! drives it.
//!
//! * `net_attach_refusals_are_typed_and_slots_are_shared` (no boot): handshake failures reach
//!   the channel as typed errors and plug nothing; ids, kinds and slots are shared with disks.
//! * `net_hot_plug_unplug_and_cards_that_stop_answering` (one boot): in turn, a test-only
//!   card that never answers the handshake is refused as `Unresponsive` within the bound
//!   (`support/mute_peer.rs`); the real card, `bulkhead-netcard vhost`, is hot-plugged, the
//!   guest's stock drivers see eth0 with the card's MAC and MTU and get a DHCP lease from it
//!   (both rings, the kick ioeventfds and the call irqfds), and the unplug (the guest resets the
//!   device, the card stops its rings) removes eth0; a test-only card that hangs when the guest
//!   resets the device makes the detach end with `OpStatus::Failed(Unresponsive)` within the
//!   bound while `Stats` keeps answering, its connection is shut down, the guest finishes its
//!   reset and runs on, and the slot takes a card again. Offloads and multi-queue it offers
//!   are never acked.
//! * `net_cold_plug_with_the_net_card` (one boot): `bulkhead-netcard vhost` (the real card) on
//!   `run --net`: the guest boots with eth0, the card's MAC, a network-class PCI function, and
//!   a DHCP lease from the card (BULKHEAD-NET-UP).
//! * `a_net_card_is_reconnected_in_place_and_handed_over_in_a_live_update` (one boot): the real
//!   card is killed -9 under a guest that ARPs for its gateway in a loop; answers stop; the same
//!   card started again takes over the NIC with `ReconnectNet` (no reset, no hot-plug, no DHCP
//!   again, rings resumed at the guest's used index) and answers resume in the same loop; the
//!   card is then handed over to a new hypervisor process twice (the card process is the same,
//!   the loop goes on); a card with another MAC is refused typed and changes nothing; an unplug
//!   afterwards is answered.
//! * `tcp_survives_net_cards_killed_and_reconnected` (two boots): one TCP connection between
//!   two guests outlives both cards being killed and reconnected.

mod common;
#[path = "support/mute_peer.rs"]
mod mute_peer;
#[path = "support/net_peer.rs"]
mod net_peer;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use bulkhead_channel::{BackendFailure, Command, CommandError, DeviceId, OpStatus, Reply, VmState};
use bulkhead_hypervisor_client::{ClientError, Hypervisor, VmSpec};
use common::*;
use mute_peer::{Mute, MutePeer};
use net_peer::{NetPeer, PeerSpec};

/// Generous: two guests booting at once on this software KVM take ~30 s each when the machine is
/// idle, several minutes when other guests and builds share its two cores.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("id")
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn counts(hv: &mut Hypervisor) -> (u32, u32) {
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, .. } => (stats.block_devices, stats.net_devices),
        other => panic!("{other:?}"),
    }
}

fn attach_net(hv: &mut Hypervisor, peer: &NetPeer, dev: &DeviceId) -> Result<Reply, ClientError> {
    let s = peer.connect();
    let r = hv.call(Command::AttachNet { id: dev.clone() }, Some(s.as_raw_fd()));
    drop(s);
    r
}

fn spec(kernel: PathBuf, initrd: PathBuf, cmdline: String) -> VmSpec {
    VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        cmdline,
        memory_mib: 128,
        vcpus: 1,
        pin: vec![],
        run_as: None,
    }
}

/// Reads the console until `needle` appears after BULKHEAD-GUEST-READY (or the timeout).
fn wait_console(hv: &mut Hypervisor, seen: &mut String, cursor: &mut u64, needle: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let after_ready = |s: &str| {
        s.split_once("BULKHEAD-GUEST-READY")
            .is_some_and(|(_, after)| after.contains(needle))
    };
    while !after_ready(seen) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; console so far:\n{seen}"
        );
        match hv.call(
            Command::ReadConsole {
                cursor: *cursor,
                max: 16384,
            },
            None,
        ) {
            Ok(Reply::Console { data, next, .. }) => {
                seen.push_str(&String::from_utf8_lossy(&data));
                *cursor = next;
            }
            other => panic!("read console: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn net_attach_refusals_are_typed_and_slots_are_shared() {
    let Some((kernel, initrd)) = guest_or_skip("net_attach_refusals_are_typed") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mac = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x05];
    let good = NetPeer::start(dir.path(), "good.sock", PeerSpec::good(mac));
    let mut no_mac = PeerSpec::good(mac);
    no_mac.features &= !net_peer::NET_F_MAC;
    let no_mac = NetPeer::start(dir.path(), "nomac.sock", no_mac);
    let mut no_config = PeerSpec::good(mac);
    no_config.config = false;
    let no_config = NetPeer::start(dir.path(), "noconfig.sock", no_config);
    let multicast = NetPeer::start(
        dir.path(),
        "mcast.sock",
        PeerSpec::good([0x03, 0, 0, 0, 0, 1]),
    );
    let mut legacy = PeerSpec::good(mac);
    legacy.features &= !net_peer::VERSION_1;
    let legacy = NetPeer::start(dir.path(), "legacy.sock", legacy);

    let mut hv = Hypervisor::spawn(&spec(kernel, initrd, GUEST_ARGS.to_string())).expect("spawn");
    let nic = id("eni-1");
    // Each refusal is typed and leaves nothing plugged.
    for (peer, want, what) in [
        (
            &no_mac,
            BackendFailure::FeatureMismatch,
            "no VIRTIO_NET_F_MAC",
        ),
        (&no_config, BackendFailure::FeatureMismatch, "no CONFIG"),
        (&legacy, BackendFailure::FeatureMismatch, "no VERSION_1"),
        (&multicast, BackendFailure::Config, "multicast MAC"),
    ] {
        match attach_net(&mut hv, peer, &nic) {
            Err(ClientError::Refused(CommandError::Backend(got))) => {
                assert_eq!(got, want, "{what}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(counts(&mut hv), (0, 0), "{what}: nothing plugged");
    }
    // Something that is not a vhost-user backend at all: the handshake fails.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    drop(theirs);
    assert!(matches!(
        hv.call(
            Command::AttachNet { id: nic.clone() },
            Some(ours.as_raw_fd())
        ),
        Err(ClientError::Refused(CommandError::Backend(
            BackendFailure::Handshake
        )))
    ));
    // No fd at all.
    assert!(matches!(
        hv.channel()
            .exchange(Command::AttachNet { id: nic.clone() }, None),
        Err(ClientError::Refused(CommandError::MissingFd))
    ));

    // A good card before boot: present at boot, not yet acknowledged.
    assert_eq!(
        attach_net(&mut hv, &good, &nic).expect("attach"),
        Reply::Device {
            state: VmState::Created,
            guest_acknowledged: false
        }
    );
    assert_eq!(counts(&mut hv), (0, 1));
    // The id is taken (by a NIC, also for a disk), and the kinds are not interchangeable.
    assert!(matches!(
        attach_net(&mut hv, &good, &nic),
        Err(ClientError::Refused(CommandError::DeviceExists))
    ));
    assert!(matches!(
        hv.call(Command::DetachBlock { id: nic.clone() }, None),
        Err(ClientError::Refused(CommandError::WrongDeviceKind))
    ));
    assert_eq!(counts(&mut hv), (0, 1), "a DetachBlock must not pull a NIC");

    // Disks and NICs share the four root-port slots.
    let Some(disk) = QsdDisk::new("net_attach_refusals_are_typed", 4, 1) else {
        return;
    };
    let vol = id("vol-1");
    let s = disk.connect();
    hv.call(
        Command::AttachBlock {
            id: vol.clone(),
            read_only: false,
        },
        Some(s.as_raw_fd()),
    )
    .expect("attach disk");
    drop(s);
    assert!(matches!(
        hv.call(Command::DetachNet { id: vol.clone() }, None),
        Err(ClientError::Refused(CommandError::WrongDeviceKind))
    ));
    for n in ["eni-2", "eni-3"] {
        attach_net(&mut hv, &good, &id(n)).expect("attach");
    }
    assert_eq!(counts(&mut hv), (1, 3));
    assert!(matches!(
        attach_net(&mut hv, &good, &id("eni-4")),
        Err(ClientError::Refused(CommandError::NoFreeSlot))
    ));
    // Freed by a NIC, the slot takes a NIC again.
    assert_eq!(
        hv.call(Command::DetachNet { id: nic.clone() }, None)
            .expect("detach"),
        Reply::Device {
            state: VmState::Created,
            guest_acknowledged: true
        }
    );
    assert_eq!(counts(&mut hv), (1, 2));
    attach_net(&mut hv, &good, &id("eni-4")).expect("attach into the freed slot");
    assert!(matches!(
        hv.call(Command::DetachNet { id: id("eni-9") }, None),
        Err(ClientError::Refused(CommandError::NoSuchDevice))
    ));
    hv.shutdown().expect("shutdown");
}

fn failed(hv: &mut Hypervisor) -> u32 {
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, .. } => stats.failed_devices,
        other => panic!("{other:?}"),
    }
}

/// Longest the hypervisor may take to give up on a silent card (its bound is 5 s per request
/// sequence; this leaves room for a slow CI host).
const GIVE_UP: Duration = Duration::from_secs(15);

/// One boot, three cards hot-plugged in turn into a running guest: one that never answers the
/// handshake (refused, bounded), the real card (eth0, lease, unplug), and one that hangs when
/// the guest resets the device (the unplug fails typed, within the bound, while the command
/// loop keeps answering).
#[test]
fn net_hot_plug_unplug_and_cards_that_stop_answering() {
    let test = "net_hot_plug_unplug_and_cards_that_stop_answering";
    let Some((kernel, initrd)) = guest_or_skip(test) else {
        return;
    };
    let Some(bin) = netcard_bin() else {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: bulkhead-netcard with `vhost` mode is not built next to the hypervisor \
             (cargo build --release -p bulkhead-netcard)"
        ));
        return;
    };
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let card = start_card(&bin, dir.path(), "02:00:0a:00:01:2a", "10.0.1.42/24", 1);
    let mac = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x33];
    let features = PeerSpec::good(mac).features;
    let silent = MutePeer::start(dir.path(), "silent.sock", mac, features, Mute::FromStart);
    let hangs = MutePeer::start(dir.path(), "hangs.sock", mac, features, Mute::AtRingStop);
    // The guest waits for eth0, reports it, gets a lease from the real card (both rings and
    // both eventfds), waits for eth0 to go; then waits for the second NIC (the card that
    // hangs), reports it, waits for it to go, and counts. Shell builtins otherwise.
    let script = "echo nh-waiting\n\
        while [ ! -e /sys/class/net/eth0/address ]; do :; done\n\
        read -r a </sys/class/net/eth0/address; echo nh-mac:$a\n\
        read -r m </sys/class/net/eth0/mtu; echo nh-mtu:$m\n\
        for d in /sys/bus/pci/devices/*; do read -r v <$d/vendor; read -r c <$d/class; echo nh-pci:$v:$c; done\n\
        udhcpc -i eth0 -f -q -n -t 4 -T 3 -s /etc/udhcpc.script >/dev/null 2>&1\n\
        l=none; [ ! -e /tmp/bulkhead-net ] || read -r l </tmp/bulkhead-net; echo nh-lease:$l\n\
        while [ -e /sys/class/net/eth0 ]; do :; done\n\
        echo nh-gone\n\
        while [ ! -e /sys/class/net/eth0/address ]; do :; done\n\
        read -r a </sys/class/net/eth0/address; echo ms-mac:$a\n\
        echo ms-bound\n\
        while [ -e /sys/class/net/eth0 ]; do :; done\n\
        echo ms-gone\n\
        n=0; while :; do n=$((n+1)); echo ms-alive-$n; read -r x </proc/uptime; sleep 1; done\n";
    let cmdline = format!(
        "{} bulkhead.nonet {}",
        GUEST_ARGS.replace(" quiet", ""),
        run_arg(script)
    );
    let mut hv = Hypervisor::spawn(&spec(kernel, initrd, cmdline)).expect("spawn");
    let (mut seen, mut cursor) = (String::new(), 0u64);
    hv.call(Command::Start, None).expect("start");
    wait_console(&mut hv, &mut seen, &mut cursor, "nh-waiting");
    assert_eq!(counts(&mut hv), (0, 0));

    // A card that never answers the handshake: refused, typed, bounded, nothing plugged.
    let t = Instant::now();
    let s = silent.connect();
    let r = hv.call(
        Command::AttachNet { id: id("eni-mute") },
        Some(s.as_raw_fd()),
    );
    drop(s);
    assert!(
        matches!(
            r,
            Err(ClientError::Refused(CommandError::Backend(
                BackendFailure::Unresponsive
            )))
        ),
        "{r:?}"
    );
    assert!(t.elapsed() < GIVE_UP, "gave up after {:?}", t.elapsed());
    assert_eq!(counts(&mut hv), (0, 0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !silent.cut() {
        assert!(
            Instant::now() < deadline,
            "the silent card's connection was not shut down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The real card, hot-plugged.
    let nic = id("eni-hot");
    let s = std::os::unix::net::UnixStream::connect(&card.sock).expect("connect to the card");
    let r = hv
        .call(Command::AttachNet { id: nic.clone() }, Some(s.as_raw_fd()))
        .expect("attach");
    drop(s);
    assert_eq!(
        r,
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "the guest's virtio-net driver did not bind; console:\n{seen}"
    );
    assert_eq!(counts(&mut hv), (0, 1));
    wait_console(&mut hv, &mut seen, &mut cursor, "nh-lease:");
    assert!(
        seen.contains("nh-mac:02:00:0a:00:01:2a"),
        "the guest's eth0 must carry the card's MAC:\n{seen}"
    );
    assert!(seen.contains("nh-mtu:1400"), "the card's MTU:\n{seen}");
    assert!(
        seen.contains("nh-pci:0x1af4:0x020000"),
        "a virtio network-class PCI function:\n{seen}"
    );
    assert!(
        seen.contains("nh-lease:up 10.0.1.42/24"),
        "no DHCP lease from the hot-plugged card (RX and TX through guest memory):\n{seen}"
    );

    // While plugged: kinds are not interchangeable.
    assert!(matches!(
        hv.call(Command::DetachBlock { id: nic.clone() }, None),
        Err(ClientError::Refused(CommandError::WrongDeviceKind))
    ));
    // Unplug: the guest's driver resets the NIC (the card stops its rings and answers) and
    // eth0 disappears.
    let t = Instant::now();
    assert_eq!(
        hv.call(Command::DetachNet { id: nic.clone() }, None)
            .expect("detach"),
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "console:\n{seen}"
    );
    eprintln!("detach took {:?}", t.elapsed());
    wait_console(&mut hv, &mut seen, &mut cursor, "nh-gone");
    assert_eq!(counts(&mut hv), (0, 0));
    assert_eq!(failed(&mut hv), 0, "a card that answered is not failed");
    drop(card);

    // A card that answers until the guest resets the device, then hangs.
    let nic = id("eni-mute");
    let s = hangs.connect();
    let r = hv
        .call(Command::AttachNet { id: nic.clone() }, Some(s.as_raw_fd()))
        .expect("attach");
    drop(s);
    assert_eq!(
        r,
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "console:\n{seen}"
    );
    wait_console(&mut hv, &mut seen, &mut cursor, "ms-bound");
    assert!(
        seen.contains(&format!("ms-mac:{}", mac_text(mac))),
        "{seen}"
    );
    // What the frontend set on the card: VERSION_1 and MAC, never an offload, the control
    // queue or multi-queue (all offered by the card).
    let acked = hangs.acked_features();
    assert_ne!(acked & net_peer::VERSION_1, 0, "{acked:#x}");
    assert_ne!(acked & net_peer::NET_F_MAC, 0, "{acked:#x}");
    for (bit, name) in [
        (net_peer::NET_F_CSUM, "CSUM"),
        (net_peer::NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (net_peer::NET_F_HOST_TSO4, "HOST_TSO4"),
        (net_peer::NET_F_CTRL_VQ, "CTRL_VQ"),
        (net_peer::NET_F_MQ, "MQ"),
    ] {
        assert_eq!(acked & bit, 0, "{name} reached the card: {acked:#x}");
    }
    assert!(!hangs.muted());

    // Unplug: the guest resets the device, the card never answers GET_VRING_BASE. The command
    // loop keeps answering meanwhile, the operation ends within the bound with a typed
    // failure, and the card is out.
    let t = Instant::now();
    let op = hv
        .channel()
        .submit(Command::DetachNet { id: nic.clone() }, None)
        .expect("detach accepted");
    let status = loop {
        let q = Instant::now();
        let stats = hv.channel().exchange(Command::Stats, None);
        assert!(
            matches!(
                stats,
                Ok(Reply::Stats {
                    state: VmState::Running,
                    ..
                })
            ),
            "{stats:?}"
        );
        assert!(
            q.elapsed() < Duration::from_secs(2),
            "Stats took {:?} while the card hung",
            q.elapsed()
        );
        match hv.channel().op_status(op).expect("op status") {
            OpStatus::Pending => {}
            done => break done,
        }
        assert!(
            t.elapsed() < GIVE_UP,
            "detach still pending after {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("detach of a hung card ended after {:?}", t.elapsed());
    assert!(hangs.muted(), "the card never got GET_VRING_BASE");
    assert_eq!(
        status,
        OpStatus::Failed {
            state: VmState::Running,
            failure: BackendFailure::Unresponsive
        }
    );
    assert!(hangs.cut(), "the hung card's connection was not shut down");
    assert_eq!(counts(&mut hv), (0, 0));
    assert_eq!(failed(&mut hv), 0, "the failed card is out");
    // The guest finished its reset and runs on.
    wait_console(&mut hv, &mut seen, &mut cursor, "ms-gone");
    wait_console(&mut hv, &mut seen, &mut cursor, "ms-alive-3");
    // And the slot takes a card again.
    let s = hangs.connect();
    let r = hv.call(
        Command::AttachNet {
            id: id("eni-again"),
        },
        Some(s.as_raw_fd()),
    );
    drop(s);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(counts(&mut hv), (0, 1));
    hv.shutdown().expect("shutdown");
}

/// The real net card, `bulkhead-netcard vhost`, built next to the hypervisor.
fn netcard_bin() -> Option<PathBuf> {
    let bin = hypervisor().parent()?.join("bulkhead-netcard");
    let ok = Proc::new(&bin)
        .args(["vhost", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

struct Card {
    child: Child,
    sock: PathBuf,
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a card serving `mac`/`ip` with a development key file and waits for its vhost-user
/// socket.
fn start_card(bin: &Path, dir: &Path, mac: &str, ip: &str, port_offset: u32) -> Card {
    let key = dir.join("epoch.key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let sock = dir.join("card.sock");
    let control = dir.join("card.ctl");
    let port = 40000 + (std::process::id() % 20000) + port_offset;
    let child = Proc::new(bin)
        .arg("vhost")
        .arg("--vhost-socket")
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--vpc", "7", "--card-id", "1", "--epoch", "1"])
        .arg("--key-file")
        .arg(&key)
        .arg("--seq-state")
        .arg(dir.join("card.seq"))
        .args(["--mac", mac, "--ip", ip, "--mtu", "1400"])
        .args(["--uid", "65534", "--gid", "65534"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn bulkhead-netcard");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&control).is_err() {
        assert!(Instant::now() < deadline, "the card never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Card { child, sock }
}

#[test]
fn net_cold_plug_with_the_net_card() {
    let Some(_) = guest_or_skip("net_cold_plug_with_the_net_card") else {
        return;
    };
    let Some(bin) = netcard_bin() else {
        bulkhead_testkit::skip_or_fail(
            "net_cold_plug_with_the_net_card: bulkhead-netcard with `vhost` mode is not built \
             next to the hypervisor (cargo build --release -p bulkhead-netcard)",
        );
        return;
    };
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let card = start_card(&bin, dir.path(), "02:00:0a:00:01:05", "10.0.1.5/24", 0);
    let script = "read -r a </sys/class/net/eth0/address; echo nc-mac:$a\n\
        read -r m </sys/class/net/eth0/mtu; echo nc-mtu:$m\n\
        for d in /sys/bus/pci/devices/*; do read -r v <$d/vendor; read -r c <$d/class; echo nc-pci:$v:$c; done\n";
    let sock = card.sock.to_str().expect("utf-8 path").to_owned();
    let (code, out, err) = run_guest(&["--net", &sock], Some(script), STEP_TIMEOUT);
    drop(card);
    let after = out
        .split_once("BULKHEAD-GUEST-READY")
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("guest never got to /init: {out}\n{err}"));
    assert!(
        after.contains("BULKHEAD-NET-UP=10.0.1.5/24"),
        "no DHCP lease from the card:\n{out}\n{err}"
    );
    assert!(after.contains("nc-mac:02:00:0a:00:01:05"), "{out}");
    assert!(after.contains("nc-mtu:1400"), "{out}");
    assert!(after.contains("nc-pci:0x1af4:0x020000"), "{out}");
    assert!(after.contains("BULKHEAD-RUN-EXIT=0"), "{out}\n{err}");
    assert_eq!(code, Some(0), "{err}");
}

/// Lines of the console after byte `from` that start with `prefix`.
fn lines_after<'a>(seen: &'a str, from: usize, prefix: &'a str) -> impl Iterator<Item = &'a str> {
    seen.get(from..)
        .unwrap_or("")
        .lines()
        .filter(move |l| l.starts_with(prefix))
}

/// Reads the console until `n` lines starting with `prefix` appeared after byte `from`.
fn wait_lines(
    hv: &mut Hypervisor,
    seen: &mut String,
    cursor: &mut u64,
    from: usize,
    prefix: &str,
    n: usize,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while lines_after(seen, from, prefix).count() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} {prefix:?} lines after byte {from}; console so far:\n{seen}"
        );
        match hv.call(
            Command::ReadConsole {
                cursor: *cursor,
                max: 16384,
            },
            None,
        ) {
            Ok(Reply::Console { data, next, .. }) => {
                seen.push_str(&String::from_utf8_lossy(&data));
                *cursor = next;
            }
            other => panic!("console read: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads the console up to what the guest printed so far.
fn drain(hv: &mut Hypervisor, seen: &mut String, cursor: &mut u64) {
    loop {
        match hv.call(
            Command::ReadConsole {
                cursor: *cursor,
                max: 16384,
            },
            None,
        ) {
            Ok(Reply::Console { data, next, .. }) => {
                seen.push_str(&String::from_utf8_lossy(&data));
                *cursor = next;
                if data.is_empty() {
                    return;
                }
            }
            other => panic!("console read: {other:?}"),
        }
    }
}

fn reconnect(hv: &mut Hypervisor, nic: &DeviceId, sock: &Path) -> Result<Reply, ClientError> {
    let s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the card");
    let r = hv.call(
        Command::ReconnectNet { id: nic.clone() },
        Some(s.as_raw_fd()),
    );
    drop(s);
    r
}

/// One boot, the real net card cold-plugged under a guest that asks the card for the gateway's
/// MAC in a loop (ARP through both rings, kicks and interrupts):
/// * the card killed -9 and started again with the same configuration (MAC, address, key,
///   sequence state) takes over the NIC in place (`ReconnectNet`): answers stop while no card
///   runs and resume after the reconnect, without a reset, a hot-plug event or DHCP again;
///   unknown ids and a missing fd are refused;
/// * the reconnected card (same process, same connection, rings never stopped) is then handed
///   over to a new hypervisor process twice by live update, and the same loop goes on;
/// * a card with another MAC is refused (`IdentityMismatch`) and the NIC keeps working with the
///   card it has; an unplug by the last process (which never connected the card) is answered.
#[test]
fn a_net_card_is_reconnected_in_place_and_handed_over_in_a_live_update() {
    let test = "a_net_card_is_reconnected_in_place_and_handed_over_in_a_live_update";
    let Some((kernel, initrd)) = guest_or_skip(test) else {
        return;
    };
    let Some(bin) = netcard_bin() else {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: bulkhead-netcard with `vhost` mode is not built next to the hypervisor \
             (cargo build --release -p bulkhead-netcard)"
        ));
        return;
    };
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (mac, ip) = ("02:00:0a:00:01:33", "10.0.1.51/24");
    let mut card = start_card(&bin, dir.path(), mac, ip, 5);
    // After /init's DHCP: ask for the gateway's MAC (the card answers) forever, one line per
    // try. `arping` is one exec per try: about a second each on this guest.
    let script = "n=0\n\
        while :; do\n\
        if busybox arping -q -f -c 1 -w 1 -I eth0 10.0.1.1; then n=$((n+1)); echo rc-ok:$n; else echo rc-miss; fi\n\
        done\n";
    let cmdline = format!("{} {}", GUEST_ARGS.replace(" quiet", ""), run_arg(script));
    let mut hv = Hypervisor::spawn(&spec(kernel, initrd, cmdline)).expect("spawn");
    let nic = id("eni-re");
    let s = std::os::unix::net::UnixStream::connect(&card.sock).expect("connect to the card");
    hv.call(Command::AttachNet { id: nic.clone() }, Some(s.as_raw_fd()))
        .expect("cold-plug the card");
    drop(s);
    let (mut seen, mut cursor) = (String::new(), 0u64);
    hv.call(Command::Start, None).expect("start");
    let long = Duration::from_secs(300);
    wait_lines(
        &mut hv,
        &mut seen,
        &mut cursor,
        0,
        "rc-ok:",
        2,
        STEP_TIMEOUT,
    );
    assert!(
        seen.contains(&format!("BULKHEAD-NET-UP={ip}")),
        "no lease:\n{seen}"
    );

    // Refusals change nothing.
    assert!(matches!(
        reconnect(&mut hv, &id("eni-none"), &card.sock),
        Err(ClientError::Refused(CommandError::NoSuchDevice))
    ));
    assert!(matches!(
        hv.channel()
            .exchange(Command::ReconnectNet { id: nic.clone() }, None),
        Err(ClientError::Refused(CommandError::MissingFd))
    ));

    // kill -9: the guest's ARP requests go unanswered.
    let _ = card.child.kill();
    let _ = card.child.wait();
    let killed_at = seen.len();
    wait_lines(
        &mut hv,
        &mut seen,
        &mut cursor,
        killed_at,
        "rc-miss",
        2,
        long,
    );

    // The same card again (same directory: key, sequence state, sockets), reconnected in place.
    let mut card2 = start_card(&bin, dir.path(), mac, ip, 5);
    let card_pid = card2.child.id();
    let t = Instant::now();
    let r = reconnect(&mut hv, &nic, &card2.sock).expect("reconnect");
    eprintln!("reconnect took {:?}", t.elapsed());
    assert_eq!(
        r,
        Reply::Done {
            state: VmState::Running
        }
    );
    let reconnected_at = seen.len();
    wait_lines(
        &mut hv,
        &mut seen,
        &mut cursor,
        reconnected_at,
        "rc-ok:",
        3,
        long,
    );
    assert_eq!(counts(&mut hv), (0, 1), "still one NIC, no new device");
    assert_eq!(failed(&mut hv), 0);

    // Live update twice: the card's connection moves to each new process.
    let mut pauses = Vec::new();
    for _ in 0..2 {
        drain(&mut hv, &mut seen, &mut cursor);
        let old_pid = hv.pid();
        let at = seen.len();
        let pause = hv.live_update(&hypervisor(), None).expect("live update");
        assert_ne!(hv.pid(), old_pid);
        assert!(
            !Path::new(&format!("/proc/{old_pid}")).exists(),
            "the old hypervisor lingers"
        );
        pauses.push(pause);
        wait_lines(&mut hv, &mut seen, &mut cursor, at, "rc-ok:", 3, long);
        assert!(matches!(card2.child.try_wait(), Ok(None)), "the card died");
        assert_eq!(card2.child.id(), card_pid);
    }
    assert_eq!(counts(&mut hv), (0, 1), "still one NIC, no new device");
    assert_eq!(failed(&mut hv), 0);

    // A card with another MAC may not stand in for this NIC.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = start_card(&bin, other_dir.path(), "02:00:0a:00:01:34", ip, 6);
    assert!(
        matches!(
            reconnect(&mut hv, &nic, &other.sock),
            Err(ClientError::Refused(CommandError::Backend(
                BackendFailure::IdentityMismatch
            )))
        ),
        "another MAC"
    );
    drop(other);
    let refused_at = seen.len();
    wait_lines(
        &mut hv,
        &mut seen,
        &mut cursor,
        refused_at,
        "rc-ok:",
        2,
        long,
    );
    assert_eq!(counts(&mut hv), (0, 1));

    let after = seen.get(killed_at..).unwrap_or("");
    assert!(
        !after.contains("BULKHEAD-NET-UP") && !after.contains("BULKHEAD-GUEST-READY"),
        "no DHCP again, no reboot:\n{after}"
    );
    assert_eq!(seen.matches("BULKHEAD-GUEST-READY").count(), 1, "no reboot");
    // The guest's counter ran on: the same shell loop, not a new one.
    let oks: Vec<u64> = lines_after(&seen, 0, "rc-ok:")
        .filter_map(|l| l.trim_start_matches("rc-ok:").trim().parse().ok())
        .collect();
    assert!(
        oks.windows(2).all(|w| w[1] == w[0] + 1),
        "one loop: {oks:?}"
    );
    // The last process drives the card it never connected: the unplug's ring stop is answered.
    let r = hv.call(Command::DetachNet { id: nic.clone() }, None);
    assert_eq!(
        r.map_err(|e| format!("{e:?}")),
        Ok(Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        }),
        "detach after the updates"
    );
    let _ = hv.shutdown();
    drop(card2);
    println!(
        "net card reconnected, then live-updated twice: pauses {pauses:?} us; {} ARP round \
         trips through the card in one loop, card pid {card_pid} unchanged by the updates",
        oks.len()
    );
}

/// A card of VPC 7 with id `card_id` on UDP `port`, with `--route`s and `--allow`s; its key
/// file, sequence state and sockets live in `dir` (restart it with the same arguments).
fn start_vpc_card(
    bin: &Path,
    dir: &Path,
    (mac, ip, card_id, port): (&str, &str, u32, u16),
    routes: &[String],
    allow: &[&str],
) -> Card {
    let key = dir.join("epoch.key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let sock = dir.join("card.sock");
    let control = dir.join("card.ctl");
    let mut cmd = Proc::new(bin);
    cmd.arg("vhost")
        .arg("--vhost-socket")
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--vpc",
            "7",
            "--card-id",
            &card_id.to_string(),
            "--epoch",
            "1",
        ])
        .arg("--key-file")
        .arg(&key)
        .arg("--seq-state")
        .arg(dir.join("card.seq"))
        .args(["--mac", mac, "--ip", ip, "--mtu", "1400"])
        .args(["--uid", "65534", "--gid", "65534"]);
    for r in routes {
        cmd.args(["--route", r]);
    }
    for a in allow {
        cmd.args(["--allow", a]);
    }
    let _ = std::fs::remove_file(&control);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn bulkhead-netcard");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&control).is_err() {
        assert!(Instant::now() < deadline, "the card never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Card { child, sock }
}

/// The `tcp-N` numbers guest A printed after byte `from`.
fn tcp_numbers(seen: &str, from: usize) -> Vec<u64> {
    lines_after(seen, from, "tcp-")
        .filter_map(|l| l.trim_start_matches("tcp-").trim().parse().ok())
        .collect()
}

/// The claim, end to end: two guests, each with its own real card, hold one TCP
/// connection (B sends a numbered line a second to A through both cards, sealed). B's card and
/// then A's card are killed -9, started again with the same configuration and reconnected in
/// place: the same connection carries on (A's numbers continue one by one, B's `nc` never
/// exits), with neither guest re-plugging or re-running DHCP.
#[test]
fn tcp_survives_net_cards_killed_and_reconnected() {
    let Some((kernel, initrd)) = guest_or_skip("tcp_survives_net_cards_killed_and_reconnected")
    else {
        return;
    };
    let Some(bin) = netcard_bin() else {
        bulkhead_testkit::skip_or_fail(
            "tcp_survives_net_cards_killed_and_reconnected: bulkhead-netcard with `vhost` mode \
             is not built next to the hypervisor (cargo build --release -p bulkhead-netcard)",
        );
        return;
    };
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let base = u16::try_from(30000 + (std::process::id() % 9000) * 2).expect("port");
    let (pa, pb) = (base, base + 1);
    let a = ("02:00:0a:00:01:3d", "10.0.1.61/24", 11, pa);
    let b = ("02:00:0a:00:01:3e", "10.0.1.62/24", 12, pb);
    let route_to_a = vec![format!("10.0.1.61=11@127.0.0.1:{pa}")];
    let route_to_b = vec![format!("10.0.1.62=12@127.0.0.1:{pb}")];
    let allow = ["tcp:7000:10.0.0.0/16"];
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut card_a = start_vpc_card(&bin, dir_a.path(), a, &route_to_b, &allow);
    let mut card_b = start_vpc_card(&bin, dir_b.path(), b, &route_to_a, &[]);
    let script_a = "while :; do nc -l -p 7000; echo nc-listen-exit; done\n";
    let script_b = "while :; do\n\
        (i=0; while :; do i=$((i+1)); echo tcp-$i; sleep 1; done) | nc 10.0.1.61 7000\n\
        echo nc-exit; sleep 1\n\
        done\n";
    let boot = |script: &str, card: &Card| {
        let cmdline = format!("{} {}", GUEST_ARGS.replace(" quiet", ""), run_arg(script));
        let mut hv =
            Hypervisor::spawn(&spec(kernel.clone(), initrd.clone(), cmdline)).expect("spawn");
        let s = std::os::unix::net::UnixStream::connect(&card.sock).expect("connect");
        hv.call(Command::AttachNet { id: id("eni-0") }, Some(s.as_raw_fd()))
            .expect("cold-plug the card");
        drop(s);
        hv.call(Command::Start, None).expect("start");
        hv
    };
    let mut hv_a = boot(script_a, &card_a);
    let mut hv_b = boot(script_b, &card_b);
    let (mut seen_a, mut cur_a) = (String::new(), 0u64);
    let (mut seen_b, mut cur_b) = (String::new(), 0u64);
    let long = Duration::from_secs(300);
    wait_lines(
        &mut hv_a,
        &mut seen_a,
        &mut cur_a,
        0,
        "tcp-",
        3,
        STEP_TIMEOUT,
    );

    for (victim, which) in [("B", 0), ("A", 1)] {
        let (card, dir, me, routes, allow): (&mut Card, &Path, _, &[String], &[&str]) =
            if which == 0 {
                (&mut card_b, dir_b.path(), b, &route_to_a, &[])
            } else {
                (&mut card_a, dir_a.path(), a, &route_to_b, &allow)
            };
        let _ = card.child.kill();
        let _ = card.child.wait();
        let killed_at = seen_a.len();
        std::thread::sleep(Duration::from_secs(3));
        *card = start_vpc_card(&bin, dir, me, routes, allow);
        let hv = if which == 0 { &mut hv_b } else { &mut hv_a };
        let r = reconnect(hv, &id("eni-0"), &card.sock)
            .unwrap_or_else(|e| panic!("reconnect {victim}'s card: {e}"));
        assert_eq!(
            r,
            Reply::Done {
                state: VmState::Running
            }
        );
        wait_lines(
            &mut hv_a,
            &mut seen_a,
            &mut cur_a,
            killed_at,
            "tcp-",
            3,
            long,
        );
    }
    // One connection all along: A's numbers run on one by one, B's nc never ended.
    let nums = tcp_numbers(&seen_a, 0);
    assert!(
        nums.first() == Some(&1) && nums.windows(2).all(|w| w[1] == w[0] + 1),
        "the TCP stream restarted or lost data: {nums:?}\n{seen_a}"
    );
    wait_lines(
        &mut hv_b,
        &mut seen_b,
        &mut cur_b,
        0,
        "BULKHEAD-NET-UP",
        1,
        long,
    );
    drain(&mut hv_b, &mut seen_b, &mut cur_b);
    drain(&mut hv_a, &mut seen_a, &mut cur_a);
    // (The scripts' text is in the kernel command line the console echoes: look at lines.)
    assert_eq!(
        lines_after(&seen_b, 0, "nc-exit").count(),
        0,
        "B's connection broke:\n{seen_b}"
    );
    assert_eq!(
        lines_after(&seen_a, 0, "nc-listen-exit").count(),
        0,
        "A's connection broke:\n{seen_a}"
    );
    for (hv, seen) in [(&mut hv_a, &seen_a), (&mut hv_b, &seen_b)] {
        assert_eq!(counts(hv), (0, 1), "one NIC each");
        assert_eq!(failed(hv), 0);
        assert_eq!(
            seen.matches("BULKHEAD-NET-UP").count(),
            1,
            "DHCP once:\n{seen}"
        );
    }
    hv_a.shutdown().expect("shutdown");
    hv_b.shutdown().expect("shutdown");
    drop((card_a, card_b));
}
