//! Live update of a VM whose disk is a real `bulkhead-blockcard` process (AES-256-XTS with an
//! ephemeral key) attached as a vhost-user card: the card is handed over to the new hypervisor
//! without noticing (same process, same connection, its rings never stopped), with I/O
//! running; a hand-over whose card section is corrupted is refused, or whose new process dies
//! after taking the card over, fails, and the guest keeps its disk on the old process.
//!
//! The guest writes a counter to the disk and reads it back in a loop (shell builtins only):
//! `echo D=$i >/dev/vda` (the last close of the block device writes the page back and drops
//! it from the page cache, so each write and each read reaches the card), then prints
//! `W=<i> R=<what it read>`. Needs /dev/kvm, the test guest and `bulkhead-blockcard` built
//! next to the hypervisor (`cargo build --release -p bulkhead-blockcard`).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use bulkhead_card_proto::{
    self as proto, AttachSpec, ControlRequest, ControlResponse, CryptoSectorSize, KeySource,
    VolumeId,
};
use bulkhead_channel::{
    Command, CommandError, DeviceId, LiveUpdateFailure, Reply, StateRefusal, VmState,
};
use bulkhead_hypervisor::live_update::wire::{self, Msg};
use bulkhead_hypervisor_client::{spawn_incoming, ClientError, Hypervisor, VmSpec};
use common::*;
use sha2::{Digest, Sha256};

const SCRIPT: &str = "while [ ! -b /dev/vda ]; do read -r u x </proc/uptime; done\n\
echo DISK-UP\n\
i=0\n\
while [ $i -lt 1000000 ]; do\n\
i=$((i+1))\n\
echo D=$i >/dev/vda || echo IOERR-W=$i\n\
v=\n\
read -r v </dev/vda || echo IOERR-R=$i\n\
echo W=$i R=$v\n\
done\n";

/// The card process, killed and reaped when dropped.
struct Card {
    child: Child,
    control: UnixStream,
    vhost: PathBuf,
    log: PathBuf,
}

impl Card {
    fn start(dir: &Path) -> Card {
        let bin = hypervisor().with_file_name("bulkhead-blockcard");
        let backing = dir.join("volume.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(16 << 20))
            .expect("backing file");
        let control = dir.join("card.ctl");
        let vhost = dir.join("card.sock");
        let log = dir.join("card.log");
        let child = Process::new(bin)
            .arg("--control-socket")
            .arg(&control)
            .arg("--vhost-socket")
            .arg(&vhost)
            .arg("--backing")
            .arg(&backing)
            .args(["--queues", "1", "--uid", "65534", "--gid", "65534"])
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("card log"))
            .spawn()
            .expect("spawn bulkhead-blockcard");
        let until = Instant::now() + Duration::from_secs(20);
        let control = loop {
            if let Ok(s) = UnixStream::connect(&control) {
                break s;
            }
            assert!(
                Instant::now() < until,
                "the card's control socket never came up"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        control
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut card = Card {
            child,
            control,
            vhost,
            log,
        };
        let r = card.call(&ControlRequest::Attach(AttachSpec {
            volume_id: VolumeId::new("vol-live-update").expect("volume id"),
            sector_size: CryptoSectorSize::S4096,
            key: KeySource::Ephemeral,
        }));
        assert!(
            matches!(r, ControlResponse::Attached { .. }),
            "attach: {r:?}"
        );
        card
    }

    fn call(&mut self, req: &ControlRequest) -> ControlResponse {
        proto::call(&mut self.control, req).expect("card control call")
    }

    fn metric(&mut self, name: &str) -> u64 {
        match self.call(&ControlRequest::GetMetrics) {
            ControlResponse::Metrics(v) => v
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| *v)
                .expect("metric"),
            other => panic!("metrics: {other:?}"),
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every round trip once, in order, each reading back what it wrote; no I/O error anywhere.
/// Returns the number of round trips.
fn check_disk_io(text: &str) -> u64 {
    assert_eq!(
        text.matches("BULKHEAD-GUEST-READY").count(),
        1,
        "the guest rebooted"
    );
    for e in IO_ERRORS {
        assert!(!text.contains(e), "the guest saw {e:?}:\n{}", tail(text));
    }
    let mut prev = 0u64;
    for l in text.lines().filter(|l| l.starts_with("W=")) {
        let (w, r) = l.split_once(' ').expect("W= R=");
        let n: u64 = w[2..].parse().expect("counter");
        assert_eq!(n, prev + 1, "round trip {prev} was followed by {n}");
        assert_eq!(r, format!("R=D={n}"), "round trip {n} read back {r:?}");
        prev = n;
    }
    prev
}

/// What the relay does to the state blob's card section (the blob ends with it: the last card's
/// device configuration, 60 bytes for a block card, after its 4-byte length).
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flip a byte of the card's device configuration: the digest no longer matches.
    FlipACardByte,
    /// Make the card's device-configuration length absurd and the digest right again: a
    /// well-sealed but malformed card section.
    ResealedBadLength,
    /// Nothing: the new process takes the card over (binds its interrupt eventfds), restores,
    /// and is killed -9 before the old one hears of it; the old one binds them again.
    KillNewAfterRestore,
}

/// Relays a hand-over from `old` to `new`, tampering with the card section as told. The card's
/// fds (which follow the state) are received and dropped: the new process refuses before it
/// would read them.
fn relay(old: UnixStream, new: UnixStream, tamper: Tamper, mut victim: Child) -> Child {
    let soon = || Instant::now() + Duration::from_secs(20);
    let (hello, memfd) = wire::recv(&old, soon()).expect("hello");
    wire::send(&new, &hello, memfd.as_ref().map(|f| f.as_raw_fd())).expect("hello on");
    drop(memfd);
    let (ready, _) = wire::recv(&new, soon()).expect("ready");
    wire::send(&old, &ready, None).expect("ready on");
    let (Msg::State(mut blob), _) = wire::recv(&old, soon()).expect("state") else {
        panic!("no state");
    };
    assert_eq!(u16::from_le_bytes([blob[4], blob[5]]), 2, "state format 2");
    let n = blob.len();
    match tamper {
        Tamper::FlipACardByte => blob[n - 10] ^= 0x01,
        Tamper::ResealedBadLength => {
            blob[n - 64..n - 60].copy_from_slice(&0xffffu32.to_le_bytes());
            let digest = Sha256::digest(&blob[44..]);
            blob[12..44].copy_from_slice(&digest);
        }
        Tamper::KillNewAfterRestore => {}
    }
    wire::send(&new, &Msg::State(blob), None).expect("state on");
    let fds = wire::recv_card_fds(&old, soon()).expect("the card's fds");
    assert_eq!(fds.len(), 3, "connection, kick, call");
    if let Tamper::KillNewAfterRestore = tamper {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        wire::send_fds(&new, &Msg::CardFds { count: 3 }, &raw).expect("fds on");
        drop(fds);
        let (answer, _) = wire::recv(&new, soon()).expect("answer");
        assert_eq!(answer, Msg::Restored);
        victim.kill().expect("kill the new hypervisor");
        let _ = victim.wait();
        return victim;
    }
    drop(fds);
    let (answer, _) = wire::recv(&new, soon()).expect("answer");
    wire::send(&old, &answer, None).expect("answer on");
    victim
}

#[test]
fn live_update_with_a_block_card_keeps_the_disk_working() {
    let test = "live_update_with_a_block_card_keeps_the_disk_working";
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let Some((kernel, initrd)) = guest_or_skip(test) else {
        return;
    };
    if !hypervisor().with_file_name("bulkhead-blockcard").is_file() {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: bulkhead-blockcard is not built next to the hypervisor \
             (cargo build --release -p bulkhead-blockcard)"
        ));
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("bhlucard")
        .tempdir()
        .expect("tempdir");
    let mut card = Card::start(dir.path());
    let card_pid = card.child.id();

    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{GUEST_ARGS} {}", run_arg(SCRIPT)),
        memory_mib: 128,
        vcpus: 1,
        pin: Vec::new(),
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn hypervisor");
    // Cold-plugged: the card is in its slot when the guest enumerates PCI.
    let stream = UnixStream::connect(&card.vhost).expect("connect to the card");
    hv.call(
        Command::AttachBlock {
            id: DeviceId::new("vol-live-update").expect("id"),
            read_only: false,
        },
        Some(stream.as_raw_fd()),
    )
    .expect("attach the card");
    drop(stream);
    hv.channel().call(Command::Start, None).expect("start");
    let mut con = Console {
        cursor: 0,
        text: String::new(),
    };
    con.wait_io(&hv, 10, Duration::from_secs(600));
    let booted = started.elapsed();

    // Two live updates with I/O running.
    let mut pauses = Vec::new();
    for _ in 0..2 {
        con.drain(&hv);
        let old_pid = hv.pid();
        let writes_before = card.metric("writes");
        let pause_us = hv
            .live_update(&hypervisor(), None)
            .unwrap_or_else(|e| panic!("live update: {e:?}\ncard log:\n{}", card.log()));
        assert_ne!(hv.pid(), old_pid);
        assert!(!pid_alive(old_pid), "the old hypervisor lingers");
        pauses.push(pause_us);
        con.wait_io(&hv, 30, Duration::from_secs(300));
        assert!(card.alive(), "the card died:\n{}", card.log());
        assert_eq!(card.child.id(), card_pid);
        assert!(card.metric("writes") > writes_before + 20);
    }

    // Corrupted card sections: refused, the guest keeps its disk on the same process.
    let pid = hv.pid();
    for (tamper, want) in [
        (
            Tamper::FlipACardByte,
            LiveUpdateFailure::Refused(StateRefusal::Corrupted),
        ),
        (
            Tamper::ResealedBadLength,
            LiveUpdateFailure::Refused(StateRefusal::Malformed),
        ),
        (Tamper::KillNewAfterRestore, LiveUpdateFailure::PeerGone),
    ] {
        con.drain(&hv);
        let (child, _chan, new_end) = spawn_incoming(&hypervisor(), None).expect("incoming");
        let (old_end, relay_old) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || relay(relay_old, new_end, tamper, child));
        let r = hv
            .channel()
            .call(Command::LiveUpdate, Some(old_end.as_raw_fd()));
        drop(old_end);
        let mut child = t.join().expect("relay");
        match r {
            Err(ClientError::Refused(CommandError::LiveUpdate(got))) => {
                assert_eq!(got, want, "{tamper:?}")
            }
            other => panic!("{tamper:?}: {other:?}"),
        }
        let until = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < until,
                "{tamper:?}: the new hypervisor lingers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(hv.pid(), pid);
        con.wait_io(&hv, 20, Duration::from_secs(300));
        println!("{tamper:?}: refused as {want:?}; the disk works on in pid {pid}");
    }
    assert!(card.alive(), "the card died:\n{}", card.log());
    assert_eq!(card.child.id(), card_pid);

    // Every write reached the card once: none lost, none replayed by a hand-over (one may be
    // in flight while the counter is read).
    con.drain(&hv);
    let done_before = con.last();
    let writes = card.metric("writes");
    con.drain(&hv);
    let done_after = con.last();
    assert!(
        (done_before..=done_after + 1).contains(&writes),
        "the card saw {writes} writes for {done_before}..={done_after} round trips"
    );
    let trips = check_disk_io(&con.text);
    // The card saw one frontend the whole time: connected once, never disconnected.
    let log = card.log();
    assert_eq!(log.matches("frontend connected").count(), 1, "{log}");
    assert!(!log.contains("frontend disconnected"), "{log}");

    // The new process drives the card it never connected: a hot-unplug makes the guest reset
    // the device and the hypervisor stop the card's rings (the vhost crate's bookkeeping of the
    // taken-over connection brought up to date first); the card answers, is not declared dead,
    // sees its frontend go, and stays up for the next one.
    let r = hv.call(
        Command::DetachBlock {
            id: DeviceId::new("vol-live-update").expect("id"),
        },
        None,
    );
    assert_eq!(
        r.map_err(|e| format!("{e:?}")),
        Ok(Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        }),
        "detach after the updates; card log:\n{}",
        card.log()
    );
    let until = Instant::now() + Duration::from_secs(10);
    while !card.log().contains("frontend disconnected") {
        assert!(Instant::now() < until, "the card never saw its frontend go");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(card.alive(), "the card died:\n{}", card.log());
    hv.shutdown().expect("shutdown");
    println!(
        "block card live-updated twice: pauses {pauses:?} us; {trips} write+read-back round trips \
         all correct, card pid {card_pid} unchanged, {writes} card writes; boot {booted:?}, \
         whole test {:?}",
        started.elapsed()
    );
}
