//! virtio-net: the hypervisor's vhost-user-net frontend on virtio-pci, cold-plugged with
//! `run --net` and hot-plugged with `AttachNet`/`DetachNet`, driven the way the controller
//! drives it.
//!
//! * `net_attach_refusals_are_typed_and_slots_are_shared` (no boot): handshake failures reach
//!   the channel as typed errors and plug nothing; ids, kinds and slots are shared with disks.
//! * `net_hot_plug_and_unplug_in_a_running_guest` (one boot): a test-only vhost-user-net peer
//!   (`support/net_peer.rs`; the frontend is what is under test) is hot-plugged, the guest's
//!   stock drivers see eth0 with the peer's MAC and MTU, the guest's DHCP DISCOVER reaches the
//!   peer through guest memory (TX ring, kick ioeventfd), offloads and multi-queue offered by
//!   the peer are never acked, and the unplug removes eth0. (The RX ring and the call irqfd are
//!   proven by the cold-plug test: the guest gets its lease from the card.)
//! * `net_cold_plug_with_the_net_card` (one boot): `bulkhead-netcard vhost` (the real card) on
//!   `run --net`: the guest boots with eth0, the card's MAC, a network-class PCI function, and
//!   a DHCP lease from the card (BULKHEAD-NET-UP).

mod common;
#[path = "support/net_peer.rs"]
mod net_peer;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use bulkhead_channel::{BackendFailure, Command, CommandError, DeviceId, Reply, VmState};
use bulkhead_hypervisor_client::{ClientError, Hypervisor, VmSpec};
use common::*;
use net_peer::{NetPeer, PeerSpec};

const STEP_TIMEOUT: Duration = Duration::from_secs(300);

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

#[test]
fn net_hot_plug_and_unplug_in_a_running_guest() {
    let Some((kernel, initrd)) = guest_or_skip("net_hot_plug_and_unplug_in_a_running_guest") else {
        return;
    };
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let mac = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x2a];
    let peer = NetPeer::start(dir.path(), "peer.sock", PeerSpec::good(mac));
    // The guest waits for eth0, reports it, sends one DHCP DISCOVER (one exec), then waits for
    // eth0 to go. Shell builtins otherwise.
    let script = "echo nh-waiting\n\
        while [ ! -e /sys/class/net/eth0/address ]; do :; done\n\
        read -r a </sys/class/net/eth0/address; echo nh-mac:$a\n\
        read -r m </sys/class/net/eth0/mtu; echo nh-mtu:$m\n\
        for d in /sys/bus/pci/devices/*; do read -r v <$d/vendor; read -r c <$d/class; echo nh-pci:$v:$c; done\n\
        udhcpc -i eth0 -f -q -n -t 1 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1\n\
        echo nh-dhcp-tried\n\
        while [ -e /sys/class/net/eth0 ]; do :; done\n\
        echo nh-gone\n\
        while :; do read -r x </proc/uptime; done\n";
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

    let nic = id("eni-hot");
    let r = attach_net(&mut hv, &peer, &nic).expect("attach");
    assert_eq!(
        r,
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "the guest's virtio-net driver did not bind; console:\n{seen}"
    );
    assert_eq!(counts(&mut hv), (0, 1));
    wait_console(&mut hv, &mut seen, &mut cursor, "nh-dhcp-tried");
    assert!(
        seen.contains(&format!("nh-mac:{}", mac_text(mac))),
        "the guest's eth0 must carry the card's MAC:\n{seen}"
    );
    assert!(seen.contains("nh-mtu:1400"), "the card's MTU:\n{seen}");
    assert!(
        seen.contains("nh-pci:0x1af4:0x020000"),
        "a virtio network-class PCI function:\n{seen}"
    );

    // What the frontend set on the backend: VERSION_1 and MAC, never an offload, the control
    // queue or multi-queue (all offered by the peer).
    let acked = peer.acked_features();
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
    // TX: the guest's DISCOVER reached the peer through guest memory, from the card's MAC.
    let frames = peer.tx_frames();
    assert!(
        frames
            .iter()
            .any(|f| f.len() >= 14 && f[6..12] == mac && f[12..14] == [0x08, 0x00]),
        "no IPv4 frame from {}: {} frames; console:\n{seen}",
        mac_text(mac),
        frames.len()
    );

    // While plugged: kinds are not interchangeable.
    assert!(matches!(
        hv.call(Command::DetachBlock { id: nic.clone() }, None),
        Err(ClientError::Refused(CommandError::WrongDeviceKind))
    ));
    // Unplug: the guest's driver lets the NIC go and eth0 disappears.
    assert_eq!(
        hv.call(Command::DetachNet { id: nic.clone() }, None)
            .expect("detach"),
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "console:\n{seen}"
    );
    wait_console(&mut hv, &mut seen, &mut cursor, "nh-gone");
    assert_eq!(counts(&mut hv), (0, 0));
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
fn start_card(bin: &Path, dir: &Path, mac: &str, ip: &str) -> Card {
    let key = dir.join("epoch.key");
    std::fs::write(&key, [7u8; 32]).expect("key");
    let sock = dir.join("card.sock");
    let control = dir.join("card.ctl");
    let port = 40000 + (std::process::id() % 20000);
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
    let card = start_card(&bin, dir.path(), "02:00:0a:00:01:05", "10.0.1.5/24");
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
