//! Live update on real guests: a running VM moves to a new `bulkhead-hypervisor incoming`
//! process (same memfd, machine state over the hand-over socket) and keeps running; refused
//! or interrupted hand-overs leave it running on the old process.
//!
//! The guest prints `C=<counter> U=<uptime>` in a tight loop (shell builtins only) and its
//! boot id every 100 counts. After the updates the console must show one boot, one boot id,
//! every counter value exactly once in order, and an uptime that never goes back.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::{Duration, Instant};

use bulkhead_channel::{LiveUpdateFailure, StateRefusal, VmState};
use bulkhead_hypervisor::live_update::wire::{self, Msg};
use bulkhead_hypervisor_client::{
    spawn_incoming, ClientError, Command, CommandError, Hypervisor, Reply, VmSpec,
};
use common::*;

const SCRIPT: &str = "read -r b </proc/sys/kernel/random/boot_id\n\
echo B=$b\n\
i=0\n\
while [ $i -lt 1000000 ]; do\n\
i=$((i+1))\n\
read -r u x </proc/uptime\n\
echo C=$i U=$u\n\
case $i in *00) read -r b </proc/sys/kernel/random/boot_id; echo B=$b ;; esac\n\
done\n";

/// The guest as the test follows it: everything its console printed, read by cursor.
struct Guest {
    hv: Hypervisor,
    cursor: u64,
    text: String,
    /// The counter's last value seen before each live update, and the first seen after.
    updates: Vec<(u64, u64)>,
}

impl Guest {
    /// Reads what the console has; fails the test if the ring dropped bytes.
    fn drain(&mut self) {
        read_console(&self.hv, &mut self.cursor, &mut self.text);
    }

    /// The last counter value printed.
    fn last_count(&self) -> u64 {
        last_number(&self.text, "C=")
    }

    /// Waits until the counter passed `n` more values.
    fn wait_counting(&mut self, more: u64, within: Duration) {
        let start = self.last_count();
        let until = Instant::now() + within;
        while self.last_count() < start + more {
            assert!(
                Instant::now() < until,
                "the guest stopped counting at {start}"
            );
            std::thread::sleep(Duration::from_millis(100));
            self.drain();
        }
    }
}

fn boot(test: &str, vcpus: u8) -> Option<Guest> {
    let (kernel, initrd) = guest_or_skip(test)?;
    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{GUEST_ARGS} {}", run_arg(SCRIPT)),
        memory_mib: 128,
        vcpus,
        pin: Vec::new(),
        run_as: None,
    };
    let hv = Hypervisor::spawn(&spec).expect("spawn hypervisor");
    hv.channel().call(Command::Start, None).expect("start");
    let mut g = Guest {
        hv,
        cursor: 0,
        text: String::new(),
        updates: Vec::new(),
    };
    // Boots take 20 s on a quiet machine and minutes on a loaded one (software KVM).
    let until = Instant::now() + Duration::from_secs(600);
    while g.last_count() < 10 {
        assert!(Instant::now() < until, "guest never counted:\n{}", g.text);
        std::thread::sleep(Duration::from_millis(250));
        g.drain();
    }
    Some(g)
}

fn live_update(g: &mut Guest) -> u64 {
    g.drain();
    let before = g.last_count();
    let old_pid = g.hv.pid();
    let pause_us = g.hv.live_update(&hypervisor(), None).expect("live update");
    assert_ne!(g.hv.pid(), old_pid);
    // The old process is gone (reaped by the client).
    assert!(!std::path::Path::new(&format!("/proc/{old_pid}")).exists());
    g.wait_counting(1, Duration::from_secs(180));
    // It has served a command by now, so its main thread's filter is up too.
    assert_sandboxed(g.hv.pid());
    g.updates.push((before, g.last_count()));
    pause_us
}

/// The new process runs sandboxed like a `serve` one: every thread under a seccomp filter,
/// no_new_privs, not dumpable, no file from disk open.
fn assert_sandboxed(pid: u32) {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok())
        .collect();
    assert!(tasks.len() >= 2, "no vCPU thread");
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if status.is_empty() {
            continue; // the thread ended meanwhile
        }
        assert_eq!(
            field(&status, "Seccomp"),
            "2",
            "{:?} has no filter",
            t.path()
        );
        assert_eq!(field(&status, "NoNewPrivs"), "1");
    }
    // Beyond stdio (whatever the test harness gave it): devices, memfds, sockets, anon inodes.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) > Some(2))
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        fds.iter()
            .all(|f| !f.starts_with('/') || f.starts_with("/dev/") || f.starts_with("/memfd:")),
        "the new hypervisor holds files from disk open: {fds:?}"
    );
}

/// Every counter value once and in order, one boot, one boot id, uptime never going back.
/// Returns, in ms, the longest gap between two consecutive uptime readings anywhere, and the
/// longest one between lines printed around a live update (`updates`: the last counter seen
/// before each, the first after).
fn check_continuity(text: &str, updates: &[(u64, u64)]) -> (u64, u64) {
    // Complete lines only: the console was last read while the guest was printing (it is shut
    // down mid-line), so the text may end with part of a line.
    let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    assert_eq!(
        text.matches("BULKHEAD-GUEST-READY").count(),
        1,
        "the guest rebooted"
    );
    let ids: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("B=")).collect();
    assert_eq!(ids.len(), 1, "boot ids: {ids:?}");
    let (mut prev_c, mut prev_u, mut gap, mut across) = (0u64, 0u64, 0u64, 0u64);
    for l in text.lines().filter(|l| l.starts_with("C=")) {
        let mut f = l.split(' ');
        let c: u64 = f.next().and_then(|s| s[2..].parse().ok()).expect("counter");
        let u = f
            .next()
            .and_then(|s| s.strip_prefix("U="))
            .and_then(|s| s.split_once('.'))
            .and_then(|(a, b)| Some(a.parse::<u64>().ok()? * 1000 + b.parse::<u64>().ok()? * 10))
            .expect("uptime");
        assert_eq!(c, prev_c + 1, "counter jumped from {prev_c} to {c}");
        assert!(u >= prev_u, "uptime went back at {c}");
        if prev_c > 0 {
            gap = gap.max(u - prev_u);
            if updates
                .iter()
                .any(|(a, b)| (*a..=*b).contains(&prev_c) && c <= *b)
            {
                across = across.max(u - prev_u);
            }
        }
        (prev_c, prev_u) = (c, u);
    }
    assert!(prev_c > 50, "too few counts: {prev_c}");
    (gap, across)
}

#[test]
fn live_update_twice_keeps_the_guest_counting() {
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut g) = boot("live_update_twice_keeps_the_guest_counting", 2) else {
        return;
    };
    let mut pauses = Vec::new();
    for _ in 0..2 {
        let before = g.last_count();
        pauses.push(live_update(&mut g));
        g.wait_counting(40, Duration::from_secs(180));
        assert!(g.last_count() > before + 40);
    }
    g.hv.shutdown().expect("shutdown");
    let (gap, across) = check_continuity(&g.text, &g.updates);
    println!(
        "live update pauses (hypervisor measure): {pauses:?} us; longest uptime gap the guest \
         printed across an update: {across} ms (anywhere in the run: {gap} ms; uptime has 10 ms \
         steps)"
    );
}

/// What the relay does to the hand-over between the old and the new process.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    FlipABodyByte,
    Truncate,
    UnknownVersion,
    /// Kill the new process once it restored the state, before the old one hears of it.
    KillNewAfterRestore,
    /// Stop (SIGSTOP) the new process as it gets the hello: it never answers.
    StopNewBeforeReady,
}

fn pid_of(c: &Child) -> libc::pid_t {
    libc::pid_t::try_from(c.id()).expect("pid")
}

/// Relays the hand-over from `old` to `new`, tampering as told; runs until either side is done.
fn relay(old: UnixStream, new: UnixStream, tamper: Tamper, mut victim: Child) -> Child {
    let soon = || Instant::now() + Duration::from_secs(20);
    let (hello, memfd) = wire::recv(&old, soon()).expect("hello");
    wire::send(&new, &hello, memfd.as_ref().map(|f| f.as_raw_fd())).expect("hello on");
    drop(memfd);
    if let Tamper::StopNewBeforeReady = tamper {
        // SAFETY: kill(2) on the pid of our own child, with a plain signal number.
        unsafe { libc::kill(pid_of(&victim), libc::SIGSTOP) };
        // The old process gives up after its bound and closes its end.
        assert!(matches!(
            wire::recv(&old, Instant::now() + Duration::from_secs(60)),
            Err(wire::WireError::Gone)
        ));
        victim.kill().expect("kill the stopped hypervisor");
        return victim;
    }
    let (ready, _) = wire::recv(&new, soon()).expect("ready");
    wire::send(&old, &ready, None).expect("ready on");
    let (Msg::State(mut blob), _) = wire::recv(&old, soon()).expect("state") else {
        panic!("no state");
    };
    match tamper {
        Tamper::FlipABodyByte => {
            let i = blob.len() / 2;
            blob[i] ^= 0x20;
        }
        Tamper::Truncate => blob.truncate(blob.len() - 100),
        Tamper::UnknownVersion => blob[4..6].copy_from_slice(&99u16.to_le_bytes()),
        Tamper::KillNewAfterRestore | Tamper::StopNewBeforeReady => {}
    }
    wire::send(&new, &Msg::State(blob), None).expect("state on");
    let (answer, _) = wire::recv(&new, soon()).expect("answer");
    if let Tamper::KillNewAfterRestore = tamper {
        assert_eq!(answer, Msg::Restored);
        victim.kill().expect("kill the new hypervisor");
        return victim;
    }
    wire::send(&old, &answer, None).expect("answer on");
    victim
}

/// The attacker: a process that is not the hypervisor's parent (here a Python interpreter)
/// makes a socketpair and hands one end to whoever holds the channel, then waits on the other
/// end for what a hand-over would send (the Hello with the guest's memfd).
const THIEF: &str = "import socket\n\
s = socket.socket(fileno=0)\n\
a, b = socket.socketpair()\n\
socket.send_fds(s, [b'x'], [a.fileno()])\n\
a.close()\n\
b.settimeout(30)\n\
msg, fds, flags, addr = socket.recv_fds(b, 65536, 4)\n\
print('FDS=%d BYTES=%d' % (len(fds), len(msg)))\n";

/// A holder of the channel that is not the hypervisor's parent asks for a live update onto a
/// socket it made: refused as `NotFromParent` before anything is sent (no memfd, no byte), and
/// the guest never paused.
fn a_socket_not_made_by_the_parent_gets_nothing(g: &mut Guest) {
    use std::os::fd::OwnedFd;
    use std::process::Stdio;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let thief = std::process::Command::new("python3")
        .arg("-c")
        .arg(THIEF)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (the test's stand-in for a process that is not the parent)");
    let mut buf = [0u8; 8];
    let (_, fd) = ours.recv_with_fd(&mut buf).expect("the thief's socket");
    let fd = fd.expect("the thief sent one end of its socketpair");
    g.drain();
    let before = g.last_count();
    let r =
        g.hv.channel()
            .call(Command::LiveUpdate, Some(fd.as_raw_fd()));
    drop(fd);
    match r {
        Err(ClientError::Refused(CommandError::LiveUpdate(LiveUpdateFailure::NotFromParent))) => {}
        other => panic!("a hand-over socket from a non-parent: {other:?}"),
    }
    let out = thief.wait_with_output().expect("thief");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "FDS=0 BYTES=0",
        "the thief's end must see only the close, no fd and no byte"
    );
    g.wait_counting(20, Duration::from_secs(180));
    println!("a non-parent's hand-over socket: refused (NotFromParent) before any byte; the guest counted on from {before}");
}

#[test]
fn refused_or_interrupted_hand_overs_leave_the_guest_on_the_old_hypervisor() {
    let _boot = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut g) = boot(
        "refused_or_interrupted_hand_overs_leave_the_guest_on_the_old_hypervisor",
        1,
    ) else {
        return;
    };
    let old_pid = g.hv.pid();
    a_socket_not_made_by_the_parent_gets_nothing(&mut g);
    let cases = [
        (
            Tamper::FlipABodyByte,
            LiveUpdateFailure::Refused(StateRefusal::Corrupted),
        ),
        (
            Tamper::Truncate,
            LiveUpdateFailure::Refused(StateRefusal::Truncated),
        ),
        (
            Tamper::UnknownVersion,
            LiveUpdateFailure::Refused(StateRefusal::UnknownVersion),
        ),
        (Tamper::KillNewAfterRestore, LiveUpdateFailure::PeerGone),
        (Tamper::StopNewBeforeReady, LiveUpdateFailure::PeerTimeout),
    ];
    for (tamper, want) in cases {
        g.drain();
        let (child, _chan, new_end) = spawn_incoming(&hypervisor(), None).expect("incoming");
        let (old_end, relay_old) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || relay(relay_old, new_end, tamper, child));
        let r =
            g.hv.channel()
                .call(Command::LiveUpdate, Some(old_end.as_raw_fd()));
        drop(old_end);
        let mut new = t.join().expect("relay");
        match r {
            Err(ClientError::Refused(CommandError::LiveUpdate(f))) => {
                assert_eq!(f, want, "{tamper:?}")
            }
            other => panic!("{tamper:?}: {other:?}"),
        }
        // The new process never ran the guest and is gone; the old one still counts.
        let until = Instant::now() + Duration::from_secs(10);
        while new.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < until,
                "{tamper:?}: the new hypervisor lingers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
            "the old one exited"
        );
        g.wait_counting(20, Duration::from_secs(180));
        println!("{tamper:?}: refused as {want:?}; the guest counts on in pid {old_pid}");
    }
    // Nothing was left half-done: a real live update still works afterwards.
    let pause = live_update(&mut g);
    g.wait_counting(20, Duration::from_secs(180));
    // A guest its parent paused moves paused, and resumes in the new process on `Resume`.
    let state = |g: &Guest| match g.hv.channel().call(Command::Stats, None) {
        Ok(Reply::Stats { state, .. }) => state,
        other => panic!("stats: {other:?}"),
    };
    g.hv.channel().call(Command::Pause, None).expect("pause");
    g.drain();
    let paused_at = g.last_count();
    let old_pid = g.hv.pid();
    g.hv.live_update(&hypervisor(), None)
        .expect("live update of a paused guest");
    assert_ne!(g.hv.pid(), old_pid);
    assert_eq!(state(&g), VmState::Paused);
    std::thread::sleep(Duration::from_secs(2));
    g.drain();
    assert!(g.last_count() <= paused_at + 1, "a paused guest ran on");
    g.hv.channel().call(Command::Resume, None).expect("resume");
    assert_eq!(state(&g), VmState::Running);
    g.wait_counting(20, Duration::from_secs(180));
    g.updates.push((paused_at, g.last_count()));
    g.hv.shutdown().expect("shutdown");
    // Continuity over the whole run; the gap across the running guest's update only (the
    // paused one's spans the seconds it was paused).
    let (gap, across) = check_continuity(&g.text, &g.updates[..1]);
    println!(
        "after the refusals: live update paused {pause} us; guest gap across it {across} ms \
         (anywhere: {gap} ms)"
    );
}
