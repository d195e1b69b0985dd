//! Drives the hypervisor over its private channel (a SOCK_SEQPACKET socketpair inherited by
//! the child), the way the controller does: malformed frames are refused with typed errors
//! and change nothing; a real guest is started, its console read by cursor, paused, resumed,
//! and shut down. Also checks the sandbox of the running process.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use bulkhead_channel::*;
use common::*;

fn socketpair() -> (UnixStream, UnixStream) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid two-element array for socketpair to fill.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe {
        (
            UnixStream::from_raw_fd(fds[0]),
            UnixStream::from_raw_fd(fds[1]),
        )
    }
}

struct Chan {
    s: UnixStream,
    next_id: u64,
}

impl Chan {
    fn raw(&mut self, frame: &[u8]) -> Response {
        self.s.write_all(frame).expect("send");
        let mut buf = vec![0u8; 70_000];
        let n = self.s.read(&mut buf).expect("recv");
        Response::parse_frame(&buf[..n]).expect("a well-formed response")
    }
    fn cmd(&mut self, command: Command) -> Result<Reply, CommandError> {
        self.next_id += 1;
        let req = Request {
            version: VERSION,
            id: self.next_id,
            command,
        };
        let resp = self.raw(&req.encode());
        assert_eq!(resp.id, self.next_id);
        resp.result
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn channel_controls_a_real_guest() {
    let Some((kernel, initrd)) = guest_or_skip("channel_controls_a_real_guest") else {
        return;
    };
    let (ours, theirs) = socketpair();
    // Clear CLOEXEC on the child's end so it is inherited (std sets CLOEXEC on what it creates;
    // libc::socketpair without SOCK_CLOEXEC does not, but be explicit).
    // SAFETY: fcntl on a valid fd with integer arguments.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let cmdline = format!(
        "{GUEST_ARGS} {}",
        run_arg("echo chan-$((40+2))\nwhile :; do read -r x </proc/uptime; done\n")
    );
    let mut child = Proc::new(hypervisor())
        .arg("serve")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--memory-mib")
        .arg("128")
        .arg("--channel-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(theirs);
    let pid = child.id();
    let mut ch = Chan {
        s: ours,
        next_id: 0,
    };

    // Garbage, truncation, oversize claims, wrong version: typed errors, state unchanged.
    let r = ch.raw(&[5, 0, 0, 0, 1]);
    assert!(
        matches!(
            r.result,
            Err(CommandError::Malformed(DecodeError::Truncated {
                want: 5,
                got: 1
            }))
        ),
        "{r:?}"
    );
    let r = ch.raw(&[1, 2, 3]);
    assert!(
        matches!(
            r.result,
            Err(CommandError::Malformed(DecodeError::ShortHeader { got: 3 }))
        ),
        "{r:?}"
    );
    let r = ch.raw(&[0xff, 0xff, 0xff, 0x7f, 0]);
    assert!(
        matches!(
            r.result,
            Err(CommandError::Malformed(DecodeError::Oversized { .. }))
        ),
        "{r:?}"
    );
    let bad_version = Request {
        version: 9,
        id: 1,
        command: Command::Start,
    }
    .encode();
    let r = ch.raw(&bad_version);
    assert_eq!(
        r.result,
        Err(CommandError::Malformed(DecodeError::Version {
            got: 9,
            want: VERSION
        }))
    );
    let r = ch.raw(&[2, 0, 0, 0, 1, 0]);
    assert!(matches!(r.result, Err(CommandError::Malformed(_))), "{r:?}");
    assert_eq!(
        ch.cmd(Command::AttachBlock {
            id: DeviceId::new("vol-a").expect("id"),
            read_only: false
        }),
        Err(CommandError::MissingFd)
    );
    assert_eq!(
        ch.cmd(Command::Pause),
        Err(CommandError::WrongState(VmState::Created))
    );
    match ch.cmd(Command::Stats) {
        Ok(Reply::Stats { state, stats }) => {
            assert_eq!(state, VmState::Created);
            assert_eq!(stats.vcpus, 1);
            assert_eq!(stats.vcpu_exits, 0);
        }
        other => panic!("{other:?}"),
    }

    // The sandbox is in force before the guest runs.
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "seccomp filter not installed"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        fds.iter()
            .all(|f| !f.starts_with('/') || f.starts_with("/dev/") || f.starts_with("/memfd:")),
        "hypervisor holds files from disk open: {fds:?}"
    );

    assert_eq!(
        ch.cmd(Command::Start),
        Ok(Reply::Done {
            state: VmState::Running
        })
    );
    assert_eq!(
        ch.cmd(Command::Start),
        Err(CommandError::WrongState(VmState::Running))
    );

    // Read the console by cursor until the script's output appears.
    let mut cursor = 0u64;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match ch.cmd(Command::ReadConsole { cursor, max: 4096 }) {
            Ok(Reply::Console { data, next, lost }) => {
                assert_eq!(lost, 0);
                assert_eq!(next, cursor + data.len() as u64);
                cursor = next;
                seen.extend_from_slice(&data);
            }
            other => panic!("{other:?}"),
        }
        if String::from_utf8_lossy(&seen).contains("chan-42") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        text.contains("BULKHEAD-GUEST-READY") && text.contains("chan-42"),
        "console:\n{text}"
    );

    assert_eq!(
        ch.cmd(Command::Pause),
        Ok(Reply::Done {
            state: VmState::Paused
        })
    );
    let exits = match ch.cmd(Command::Stats) {
        Ok(Reply::Stats {
            state: VmState::Paused,
            stats,
        }) => stats.vcpu_exits,
        other => panic!("{other:?}"),
    };
    std::thread::sleep(Duration::from_millis(500));
    match ch.cmd(Command::Stats) {
        Ok(Reply::Stats { stats, .. }) => {
            assert_eq!(stats.vcpu_exits, exits, "a paused vCPU kept running")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ch.cmd(Command::Resume),
        Ok(Reply::Done {
            state: VmState::Running
        })
    );
    assert_eq!(
        ch.cmd(Command::Shutdown),
        Ok(Reply::Done {
            state: VmState::Stopped
        })
    );
    let (code, _, err) = wait_output(child_take(&mut child), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn child_take(c: &mut std::process::Child) -> std::process::Child {
    std::mem::replace(c, Proc::new("true").spawn().expect("true"))
}

/// Attach and detach a vhost-user disk over the channel (fd passed with SCM_RIGHTS), using the
/// controller's client, against qemu-storage-daemon as the backend. No guest boot is needed: the
/// vhost-user handshake happens at attach time.
#[test]
fn attach_and_detach_over_the_channel_with_scm_rights() {
    use bulkhead_hypervisor_client::{ClientError, Hypervisor, VmSpec};
    let Some((kernel, initrd)) =
        guest_or_skip("attach_and_detach_over_the_channel_with_scm_rights")
    else {
        return;
    };
    let Some(disk) = QsdDisk::new("attach_and_detach_over_the_channel", 4, 1) else {
        return;
    };
    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        cmdline: GUEST_ARGS.into(),
        memory_mib: 64,
        vcpus: 1,
        pin: vec![],
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn");
    let stream = disk.connect();
    let id = DeviceId::new("vol-1").expect("id");
    let r = hv.call(
        Command::AttachBlock {
            id: id.clone(),
            read_only: false,
        },
        Some(stream.as_raw_fd()),
    );
    drop(stream);
    assert_eq!(
        r.expect("attach"),
        Reply::Device {
            state: VmState::Created,
            guest_acknowledged: false
        }
    );
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, .. } => assert_eq!(stats.block_devices, 1),
        other => panic!("{other:?}"),
    }
    // The same id twice is refused and changes nothing.
    let again = UnixStream::connect(&disk.sock);
    if let Ok(s) = again {
        let r = hv.call(
            Command::AttachBlock {
                id: id.clone(),
                read_only: false,
            },
            Some(s.as_raw_fd()),
        );
        assert!(matches!(r, Err(ClientError::Refused(_))), "{r:?}");
    }
    assert_eq!(
        hv.call(Command::DetachBlock { id: id.clone() }, None)
            .expect("detach"),
        Reply::Device {
            state: VmState::Created,
            guest_acknowledged: true
        }
    );
    assert!(matches!(
        hv.call(Command::DetachBlock { id }, None),
        Err(ClientError::Refused(CommandError::NoSuchDevice))
    ));
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, .. } => assert_eq!(stats.block_devices, 0),
        other => panic!("{other:?}"),
    }
    hv.shutdown().expect("shutdown");
}
