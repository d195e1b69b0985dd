//! Card update under a running guest (issue 14): the block card serving the guest's encrypted
//! disk (a real `bulkhead-blockcard`, AES-256-XTS with a KMS-sealed key) is replaced by a new
//! card process while the guest keeps appending to the disk. The old card hands the key to the
//! new one over a private socketpair (`HandOver` + `--receive-state-fd`), the hypervisor moves
//! the device's rings (`ReplaceBlock`), the old card erases its key and exits.
//!
//! One guest boot. Four refusals first, each leaving the guest on the old card: a new card
//! started with `--receive-state-fd` that died before taking the state; a new card told
//! `TakeOver` that took it and died before the hypervisor moved; a new card on a backing store
//! of another size, which refuses the state; a vhost-user peer that fails while taking the
//! rings (the old card gets them back). Then the update: a new card started as any card
//! and told `TakeOver`, as the controller would. The guest appends its counter to a log on the
//! disk
//! (`L= 1 2 3 ...`, rewritten whole each round, read back each round) and prints each round;
//! every 10 rounds it prints the whole log it read back and its boot id. Afterwards: the
//! counter on the console and in the on-disk log (as the guest reads it, and as an independent
//! AES-XTS decryption of the backing file shows it) has no gap and no repeat, the boot id never
//! changed, the old card is gone, and neither the key nor its hex is in any file the cards or
//! the hypervisor wrote. Needs /dev/kvm, the test guest, `bulkhead-blockcard` built next to the
//! hypervisor, and python3 with `cryptography` (the independent decryptor).

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use bulkhead_card_proto::{
    self as proto, AttachSpec, ControlRequest, ControlResponse, CryptoSectorSize, ErrorCode,
    KeySource, VolumeId,
};
use bulkhead_channel::{BackendFailure, Command, CommandError, DeviceId};
use bulkhead_hypervisor_client::{ClientError, Hypervisor, VmSpec};
use common::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const VOLUME: &str = "vol-card-update";

const SCRIPT: &str = "while [ ! -b /dev/vda ]; do read -r u x </proc/uptime; done\n\
b=none; read -r b </proc/sys/kernel/random/boot_id\n\
echo DISK-UP BOOT=$b\n\
i=0; log=\n\
while [ $i -lt 100000 ]; do\n\
i=$((i+1))\n\
log=\"$log $i\"\n\
echo \"L=$log\" >/dev/vda || echo IOERR-W=$i\n\
v=\n\
read -r v </dev/vda || echo IOERR-R=$i\n\
echo W=$i R=${v##* }\n\
if [ $((i % 10)) -eq 0 ]; then echo \"FULL=$v BOOT=$b\"; fi\n\
done\n";

/// A card process, killed and reaped when dropped.
struct Card {
    child: Child,
    ctl_path: PathBuf,
    vhost: PathBuf,
    log: PathBuf,
}

impl Card {
    /// Starts a card on `backing`; `receive` = the socketpair end it takes the state from
    /// (passed as fd 3), else it waits for `Attach`.
    fn spawn(
        dir: &Path,
        name: &str,
        backing: &Path,
        host_key: &Path,
        receive: Option<RawFd>,
    ) -> Card {
        let bin = hypervisor().with_file_name("bulkhead-blockcard");
        let ctl_path = dir.join(format!("{name}.ctl"));
        let vhost = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Process::new(bin);
        cmd.arg("--control-socket")
            .arg(&ctl_path)
            .arg("--vhost-socket")
            .arg(&vhost)
            .arg("--backing")
            .arg(backing)
            .args(["--queues", "1", "--uid", "65534", "--gid", "65534"])
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("card log"));
        match receive {
            Some(fd) => {
                cmd.args(["--receive-state-fd", "3"]);
                // SAFETY: between fork and exec only dup2/fcntl, which are async-signal-safe;
                // fd 3 ends up without CLOEXEC, so the card inherits it.
                unsafe {
                    cmd.pre_exec(move || {
                        let r = if fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, 3)
                        };
                        if r < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            None => {
                cmd.arg("--host-key").arg(host_key);
            }
        }
        let child = cmd.spawn().expect("spawn bulkhead-blockcard");
        Card {
            child,
            ctl_path,
            vhost,
            log,
        }
    }

    fn control(&self) -> UnixStream {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&self.ctl_path) {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                return s;
            }
            assert!(
                Instant::now() < until,
                "the card's control socket never came up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, req: &ControlRequest) -> ControlResponse {
        proto::call(&mut self.control(), req).expect("card control call")
    }

    /// `HandOver` with `end` beside the frame (what the controller does).
    fn hand_over(&self, end: &UnixStream) -> ControlResponse {
        let mut c = self.control();
        let frame = proto::frame(&ControlRequest::HandOver.encode()).expect("frame");
        c.send_with_fd(&frame[..], end.as_raw_fd())
            .expect("send HandOver");
        let body = proto::read_frame(&mut c).expect("answer").expect("a frame");
        ControlResponse::parse(&body).expect("parse")
    }

    /// Sends `TakeOver` with `end` beside it (what the controller does with a card it just
    /// started); the answer comes once the old card sent the state: read it with `answer`.
    fn take_over(&self, end: &UnixStream) -> UnixStream {
        let c = self.control();
        let frame = proto::frame(&ControlRequest::TakeOver.encode()).expect("frame");
        c.send_with_fd(&frame[..], end.as_raw_fd())
            .expect("send TakeOver");
        c
    }

    fn answer(mut c: UnixStream) -> ControlResponse {
        let body = proto::read_frame(&mut c).expect("answer").expect("a frame");
        ControlResponse::parse(&body).expect("parse")
    }

    fn metric(&self, name: &str) -> u64 {
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

    fn wait_vhost_socket(&self) -> UnixStream {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&self.vhost) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "the card's vhost socket never came up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// `L= 1 2 ... n` (or its `FULL=` form) → n, asserting every number once, in order.
fn contiguous_log(log: &str) -> u64 {
    let mut prev = 0u64;
    for w in log.split_whitespace() {
        let n: u64 = w.parse().unwrap_or_else(|_| panic!("log entry {w:?}"));
        assert_eq!(n, prev + 1, "the log on disk has {prev} followed by {n}");
        prev = n;
    }
    prev
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// A vhost-user-blk peer that looks like the card (same features, same volume shape) through
/// the handshake, then fails SET_MEM_TABLE and drops the connection: a new card that dies
/// while it takes the rings. The peer, not the card, is what this fault needs; what is under
/// test is the hypervisor giving the rings back to the old card.
mod failing_peer {
    use std::io;
    use std::path::Path;
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::Listener;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    #[derive(Clone)]
    struct Peer {
        capacity_sectors: u64,
    }

    impl VhostUserBackend for Peer {
        type Bitmap = ();
        type Vring = VringRwLock;
        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> usize {
            1024
        }
        fn features(&self) -> u64 {
            // SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, MQ, DISCARD, WRITE_ZEROES,
            // INDIRECT_DESC, EVENT_IDX, VERSION_1: what the block card offers.
            [1u64, 2, 6, 9, 10, 12, 13, 14, 28, 29, 32]
                .iter()
                .fold(0, |f, b| f | (1 << b))
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
            let mut c = [0u8; 60];
            c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
            c[20..24].copy_from_slice(&4096u32.to_le_bytes());
            c[34..36].copy_from_slice(&1u16.to_le_bytes());
            (0..size as usize)
                .map(|i| c.get(offset as usize + i).copied().unwrap_or(0))
                .collect()
        }
        fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
            Err(io::Error::other("this peer fails SET_MEM_TABLE"))
        }
        fn handle_event(
            &self,
            _device_event: u16,
            _evset: EventSet,
            _vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    /// Serves one connection on `sock` in a thread; the connection ends at SET_MEM_TABLE.
    pub fn start(sock: &Path, capacity_sectors: u64) {
        let mut listener = Listener::new(sock, true).expect("peer listener");
        std::thread::spawn(move || {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
            let Ok(mut daemon) =
                VhostUserDaemon::new("failing-blk".into(), Peer { capacity_sectors }, mem)
            else {
                return;
            };
            if daemon.start(&mut listener).is_ok() {
                let _ = daemon.wait();
            }
        });
    }
}

/// One card update: starts card `name` like any card, `TakeOver` on it and `HandOver` on
/// `old` with the two ends of a socketpair, `ReplaceBlock` to it; then waits for `old` to exit
/// 0 with its keys erased. Returns the new card and (state hand-over, ReplaceBlock) times.
fn update_card(
    hv: &mut Hypervisor,
    dev: &DeviceId,
    dir: &Path,
    backing: &Path,
    host_key: &Path,
    old: &mut Card,
    name: &str,
) -> (Card, Duration, Duration) {
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let new = Card::spawn(dir, name, backing, host_key, None);
    let pending = new.take_over(&theirs);
    drop(theirs);
    let t0 = Instant::now();
    let r = old.hand_over(&ours);
    drop(ours);
    assert_eq!(r, ControlResponse::HandedOver, "{}", new.log());
    assert_eq!(
        Card::answer(pending),
        ControlResponse::Attached {
            capacity_sectors: (1 << 20) / 512,
            encrypted: true
        },
        "take-over"
    );
    let handover_took = t0.elapsed();
    let conn = new.wait_vhost_socket();
    let t1 = Instant::now();
    hv.replace_block(dev, &conn)
        .unwrap_or_else(|e| panic!("replace: {e:?}\nold:\n{}\nnew:\n{}", old.log(), new.log()));
    let replace_took = t1.elapsed();
    drop(conn);
    let until = Instant::now() + Duration::from_secs(10);
    while matches!(old.child.try_wait(), Ok(None)) {
        assert!(
            Instant::now() < until,
            "the old card lingers:\n{}",
            old.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        old.child.try_wait().expect("wait").and_then(|st| st.code()),
        Some(0),
        "the old card's exit"
    );
    assert!(!pid_alive(old.child.id()), "the old card's pid lingers");
    let log = old.log();
    assert!(log.contains("card update complete: keys erased"), "{log}");
    (new, handover_took, replace_took)
}

#[test]
fn a_block_card_is_replaced_under_a_writing_guest() {
    let test = "a_block_card_is_replaced_under_a_writing_guest";
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
        .prefix("bhcardupd")
        .tempdir()
        .expect("tempdir");

    // The host key and a KMS-sealed volume key (the test plays the KMS, so it knows the key and
    // can look for it in files and decrypt the backing file independently).
    let host = bulkhead_sealing::HostKey::generate().expect("host key");
    let host_key = dir.path().join("host.key");
    let mut f = std::fs::File::create(&host_key).expect("key file");
    f.write_all(host.to_file_bytes().expect("encode").as_ref())
        .expect("write key");
    drop(f);
    std::fs::set_permissions(&host_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut key = [0u8; 64];
    bulkhead_sealing::fill_random(&mut key).expect("random key");
    let blob = bulkhead_sealing::seal_volume_key(host.public(), VOLUME, &key).expect("seal");
    let backing = dir.path().join("volume.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(1 << 20))
        .expect("backing file");

    let mut old = Card::spawn(dir.path(), "card-a", &backing, &host_key, None);
    let r = old.call(&ControlRequest::Attach(AttachSpec {
        volume_id: VolumeId::new(VOLUME).expect("volume id"),
        sector_size: CryptoSectorSize::S4096,
        key: KeySource::Sealed(Box::new(blob)),
    }));
    assert!(
        matches!(
            r,
            ControlResponse::Attached {
                encrypted: true,
                ..
            }
        ),
        "attach: {r:?}\n{}",
        old.log()
    );
    let old_pid = old.child.id();

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
    let dev = DeviceId::new("vol-cu").expect("id");
    let stream = old.wait_vhost_socket();
    hv.call(
        Command::AttachBlock {
            id: dev.clone(),
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

    // Refusal 1: the new card dies before it took the state. The old card's HandOver fails
    // (typed), it keeps its key and the guest's disk.
    {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let mut dead = Card::spawn(
            dir.path(),
            "card-dead1",
            &backing,
            &host_key,
            Some(theirs.as_raw_fd()),
        );
        drop(theirs);
        dead.child.kill().expect("kill");
        let _ = dead.child.wait();
        let r = old.hand_over(&ours);
        drop(ours);
        match &r {
            ControlResponse::Error {
                code: ErrorCode::Internal,
                message,
            } if message.contains("closed the hand-over socket")
                || message.contains("Broken pipe")
                || message.contains("reset by peer") => {}
            other => panic!("hand-over to a dead card: {other:?}"),
        }
        con.wait_io(&hv, 10, Duration::from_secs(300));
        assert!(old.alive(), "the old card died:\n{}", old.log());
        println!("refusal 1 (new card dead before the state): {r:?}; guest on the old card");
    }

    // Refusal 2: the new card takes the state, then dies before the hypervisor moved to it.
    // ReplaceBlock fails typed; the guest stays on the old card, which still has its key.
    {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let mut dying = Card::spawn(dir.path(), "card-dead2", &backing, &host_key, None);
        let pending = dying.take_over(&theirs);
        drop(theirs);
        let r = old.hand_over(&ours);
        drop(ours);
        assert_eq!(r, ControlResponse::HandedOver, "{}", dying.log());
        let a = Card::answer(pending);
        assert!(
            matches!(
                a,
                ControlResponse::Attached {
                    encrypted: true,
                    ..
                }
            ),
            "take-over: {a:?}"
        );
        let conn = dying.wait_vhost_socket();
        dying.child.kill().expect("kill");
        let _ = dying.child.wait();
        let r = hv.replace_block(&dev, &conn);
        drop(conn);
        match r {
            Err(ClientError::Refused(CommandError::Backend(
                BackendFailure::Handshake | BackendFailure::Unresponsive | BackendFailure::Config,
            ))) => {}
            other => panic!("replace with a dead card: {other:?}"),
        }
        con.wait_io(&hv, 10, Duration::from_secs(300));
        assert!(old.alive(), "the old card died:\n{}", old.log());
        println!("refusal 2 (new card dead after the state): {r:?}; guest on the old card");
    }

    // Refusal 3: a new card on a backing store of another size refuses the state (typed, on
    // both sides), keeps waiting for an attach, and the guest stays on the old card.
    {
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .and_then(|f| f.set_len(2 << 20))
            .expect("other backing file");
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let wrong = Card::spawn(dir.path(), "card-wrong", &other, &host_key, None);
        let pending = wrong.take_over(&theirs);
        drop(theirs);
        let r = old.hand_over(&ours);
        drop(ours);
        match &r {
            ControlResponse::Error {
                code: ErrorCode::Internal,
                message,
            } if message.contains("Geometry") => {}
            other => panic!("hand-over to a card on another volume: {other:?}"),
        }
        let a = Card::answer(pending);
        match &a {
            ControlResponse::Error {
                code: ErrorCode::KeyRefused,
                message,
            } if message.contains("take-over failed") => {}
            other => panic!("take-over of another volume's state: {other:?}"),
        }
        assert_eq!(
            wrong.call(&ControlRequest::Detach),
            ControlResponse::Error {
                code: ErrorCode::NotAttached,
                message: "no volume attached".into()
            },
            "the refusing card keeps waiting for an attach"
        );
        con.wait_io(&hv, 5, Duration::from_secs(300));
        println!("refusal 3 (new card on another volume): {r:?} / {a:?}; guest on the old card");
    }

    // Refusal 4: a new card that passes the handshake but fails while taking the rings (after
    // the old card's rings were stopped): the old card gets its rings back where they stopped.
    {
        let sock = dir.path().join("failing.sock");
        failing_peer::start(&sock, (1 << 20) / 512);
        let conn = UnixStream::connect(&sock).expect("connect the failing peer");
        let r = hv.replace_block(&dev, &conn);
        drop(conn);
        match r {
            Err(ClientError::Refused(CommandError::Backend(
                BackendFailure::Vring | BackendFailure::Unresponsive,
            ))) => {}
            other => panic!("replace with a card failing the rings: {other:?}"),
        }
        con.wait_io(&hv, 10, Duration::from_secs(300));
        assert!(old.alive(), "the old card died:\n{}", old.log());
        println!("refusal 4 (new card fails taking the rings): {r:?}; rings back on the old card");
    }

    // The update, twice: A -> B (B took the state with `TakeOver`), then B -> C (a card that
    // received the state hands it on in turn).
    con.drain(&hv);
    let before = con.last();
    let old_writes = old.metric("writes");
    let mut timings = Vec::new();
    let mut current = old;
    for name in ["card-b", "card-c"] {
        let (next, handover_took, replace_took) = update_card(
            &mut hv,
            &dev,
            dir.path(),
            &backing,
            &host_key,
            &mut current,
            name,
        );
        timings.push((handover_took, replace_took));
        con.wait_io(&hv, 15, Duration::from_secs(300));
        let w = next.metric("writes");
        assert!(w >= 10, "{name} served {w} writes");
        current = next;
    }
    let new = current;
    let new_writes = new.metric("writes");

    // Console: every round once, in order, each reading back its own counter; one boot.
    con.drain(&hv);
    let text = con.text.clone();
    assert_eq!(
        text.matches("BULKHEAD-GUEST-READY").count(),
        1,
        "the guest rebooted"
    );
    for e in IO_ERRORS {
        assert!(!text.contains(e), "the guest saw {e:?}:\n{}", tail(&text));
    }
    let mut prev = 0u64;
    for l in text.lines().filter(|l| l.starts_with("W=")) {
        let (w, r) = l.split_once(' ').expect("W= R=");
        let n: u64 = w[2..].parse().expect("counter");
        assert_eq!(n, prev + 1, "round {prev} was followed by {n}");
        assert_eq!(r, format!("R={n}"), "round {n} read back {r:?}");
        prev = n;
    }
    let rounds = prev;
    assert!(
        rounds >= before + 30,
        "{rounds} rounds, {before} before the updates"
    );
    // The whole log as the guest read it back, every 10 rounds: contiguous, growing, and the
    // boot id never changed.
    let boot = text
        .lines()
        .find_map(|l| l.strip_prefix("DISK-UP BOOT="))
        .expect("boot id")
        .to_owned();
    assert!(boot.len() >= 32, "boot id {boot:?}");
    let mut fulls = 0u64;
    for l in text.lines().filter_map(|l| l.strip_prefix("FULL=L=")) {
        let (log, b) = l.rsplit_once(" BOOT=").expect("FULL= BOOT=");
        assert_eq!(b, boot, "the boot id changed");
        fulls += 1;
        assert_eq!(contiguous_log(log), fulls * 10);
    }
    assert!(
        fulls * 10 > before,
        "no full log read back after the update"
    );

    // The backing file, decrypted independently with the key: the same contiguous log.
    let plain = dir.path().join("plain.img");
    let st = Process::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../blockcard/tests/xts_decrypt.py"
        ))
        .arg(hex(&key))
        .arg(&backing)
        .arg("4096")
        .arg(&plain)
        .status()
        .expect("python3");
    assert!(st.success(), "the independent decryptor failed");
    let data = std::fs::read(&plain).expect("plaintext");
    let _ = std::fs::remove_file(&plain);
    let line = data
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .expect("a line");
    let on_disk = contiguous_log(line.strip_prefix("L=").expect("L= on disk"));
    assert!(
        on_disk >= rounds,
        "the disk holds {on_disk} of {rounds} rounds"
    );

    // The key is in no file the cards or the hypervisor wrote (nor the backing file), in raw
    // bytes or in hex.
    let mut files = Vec::new();
    files_under(dir.path(), &mut files);
    let key_hex = hex(&key);
    for p in &files {
        let b = std::fs::read(p).unwrap_or_default();
        assert!(!contains(&b, &key), "the key is in {}", p.display());
        assert!(
            !contains(&b, key_hex.as_bytes()),
            "the key's hex is in {}",
            p.display()
        );
    }

    hv.shutdown().expect("shutdown");
    println!(
        "card update: card A pid {old_pid} ({old_writes} writes) -> B -> C pid {} ({new_writes} \
         writes); (state hand-over, ReplaceBlock) per update {timings:?}; {rounds} rounds, log on \
         disk contiguous to {on_disk}; boot {booted:?}, whole test {:?}",
        new.child.id(),
        started.elapsed()
    );
}
