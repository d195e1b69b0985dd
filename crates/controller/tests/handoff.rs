//! A forged controller hand-off at start is refused. The controller never re-executes (its
//! filter traps every exec), so `BULKHEAD_CONTROLLER_HANDOFF` in its environment can only come
//! from whoever started it: the real binary, given a well-formed hand-off naming a release that
//! does not exist and real sockets of the right kinds, must refuse to start with the typed
//! error, before it prints a ready line or writes an audit record (no `controller-applied`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Where the hand-off's sockets land in the child (no close-on-exec there).
const LISTEN_FD: i32 = 40;
const KEEPER_FD: i32 = 41;

#[test]
fn a_forged_handoff_at_start_is_refused_with_its_typed_error() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut pair = [0; 2];
    // SAFETY: `pair` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: socketpair just returned these two open descriptors, owned by nobody else.
    let (keeper, _peer) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let (l, k) = (listener.as_raw_fd(), keeper.as_raw_fd());
    let mut cmd = Command::new(controller_bin());
    cmd.args(["--dev", "--state-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--backend", "detached"])
        .env("RUST_LOG", "warn")
        .env(
            "BULKHEAD_CONTROLLER_HANDOFF",
            format!("v=99,listen={LISTEN_FD},keeper={KEEPER_FD},agent=none,bin=/usr/bin"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls dup2 (async-signal-safe) on
    // descriptors that are open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(l, LISTEN_FD) < 0 || libc::dup2(k, KEEPER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn controller");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the controller started with a forged hand-off");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(2), "stdout {out:?} stderr {err:?}");
    assert!(
        err.contains("BULKHEAD_CONTROLLER_HANDOFF set at start")
            && err.contains("the hand-off is refused"),
        "not the typed refusal: {err:?}"
    );
    assert!(!out.contains("ready"), "{out:?}");
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
    assert!(!audit.contains("controller-applied"), "{audit}");
    assert!(!audit.contains("release:v99"), "{audit}");
    eprintln!("forged hand-off refused in {:.1?}", t0.elapsed());
}
