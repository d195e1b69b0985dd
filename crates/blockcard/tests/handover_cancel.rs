//! Card update that fails after the hand-over: the real card binaries behind a real vhost-user
//! frontend, no guest. The old card hands its volume state to a new card (`HandOver` →
//! `HandedOver`, the new card `Attached`), the update is cancelled (`CancelHandOver`), the new
//! card is detached, and the frontend leaves and comes back (a guest reboot, as the hypervisor
//! does it): the old card is still there with its key and serves the data written before.
//! Then a second update completes from the same old card: it exits with its keys erased once
//! the frontend leaves, and the next card serves everything.

mod common;

use bulkhead_blockcard::control::{
    self as proto, ControlRequest, ControlResponse, ErrorCode, KeySource,
};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::Harness;
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const VOL_BYTES: u64 = 8 << 20;
const VOLUME: &str = "vol-cancel";

/// Sends `req` with `end` riding beside the frame (what the controller does for `HandOver` and
/// `TakeOver`), without reading the answer.
fn send_with_end(card: &Card, req: &ControlRequest, end: &UnixStream) {
    let conn = card.conn.as_ref().expect("control connection");
    let frame = proto::frame(&req.encode()).expect("frame");
    conn.send_with_fd(&frame[..], end.as_raw_fd())
        .expect("send with fd");
}

fn answer(card: &mut Card) -> ControlResponse {
    let conn = card.conn.as_mut().expect("control connection");
    let body = proto::read_frame(conn).expect("answer").expect("a frame");
    ControlResponse::parse(&body).expect("parse")
}

/// The whole card update up to the hypervisor's move: `TakeOver` to `new`, `HandOver` to
/// `old`; both answers.
fn hand_over(old: &mut Card, new: &mut Card) -> (ControlResponse, ControlResponse) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    send_with_end(new, &ControlRequest::TakeOver, &theirs);
    drop(theirs);
    send_with_end(old, &ControlRequest::HandOver, &ours);
    drop(ours);
    let handed = answer(old);
    let taken = answer(new);
    (handed, taken)
}

fn log(env: &Env, name: &str) -> String {
    std::fs::read_to_string(env.path(&format!("{name}.log"))).unwrap_or_default()
}

/// Waits until `name`'s log shows `needle` `times` times.
fn wait_log(env: &Env, name: &str, needle: &str, times: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while log(env, name).matches(needle).count() < times {
        assert!(
            Instant::now() < until,
            "{name}: no {needle:?} x{times} in\n{}",
            log(env, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap_or(0)
                .wrapping_mul(7)
                .wrapping_add(seed)
        })
        .collect()
}

fn start(env: &Env, name: &'static str) -> Card {
    let log = env.path(&format!("{name}.log"));
    Card::start(
        env,
        CardOpts {
            name,
            log: Some(&log),
            ..Default::default()
        },
    )
}

#[test]
fn cancelled_hand_over_keeps_the_old_card_serving() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(9);
    let blob = env.seal(VOLUME, &key);
    let mut old = start(&env, "old");
    assert_eq!(
        old.attach(VOLUME, CryptoSectorSize::S512, KeySource::Sealed(blob)),
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        }
    );
    let mut h = Harness::connect(&old.vhost, 1);
    let p1 = pattern(1, 8 * 512);
    assert_eq!(h.write(0, 8, &p1), 0);
    assert_eq!(h.flush(0), 0);

    // Nothing to cancel yet: a typed refusal, nothing changes.
    match old.call(&ControlRequest::CancelHandOver) {
        ControlResponse::Error {
            code: ErrorCode::NoHandOver,
            ..
        } => {}
        other => panic!("CancelHandOver with none pending: {other:?}"),
    }

    // The hand-over succeeds on both sides ...
    let mut new = start(&env, "new");
    let (handed, taken) = hand_over(&mut old, &mut new);
    assert_eq!(handed, ControlResponse::HandedOver, "{}", log(&env, "old"));
    assert_eq!(
        taken,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        },
        "{}",
        log(&env, "new")
    );
    // ... but the update fails before the hypervisor moves: cancelled, once.
    assert_eq!(
        old.call(&ControlRequest::CancelHandOver),
        ControlResponse::HandOverCancelled
    );
    match old.call(&ControlRequest::CancelHandOver) {
        ControlResponse::Error {
            code: ErrorCode::NoHandOver,
            ..
        } => {}
        other => panic!("second CancelHandOver: {other:?}"),
    }
    // The new card holds the key: it is detached (key pages wiped), not just killed.
    new.detach();
    assert!(log(&env, "new").contains("keys erased; detached"));

    // The old card still serves the running frontend ...
    assert_eq!(h.read(0, 8, p1.len()).expect("read"), p1);
    // ... and the frontend leaves (guest reboot / stop): the old card stays.
    drop(h);
    wait_log(&env, "old", "frontend disconnected", 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.alive(), "old card exited:\n{}", log(&env, "old"));
    assert!(!log(&env, "old").contains("keys erased"));
    // The frontend comes back: the key is still there (data written before reads back
    // decrypted) and new writes work.
    let mut h = Harness::connect(&old.vhost, 1);
    assert_eq!(h.read(0, 8, p1.len()).expect("read after reconnect"), p1);
    let p2 = pattern(2, 4 * 512);
    assert_eq!(h.write(0, 32, &p2), 0);
    assert_eq!(h.flush(0), 0);
    assert_eq!(h.read(0, 32, p2.len()).expect("read"), p2);
    assert_eq!(old.metric("io_errors"), 0);

    // A later update from the same card completes: the old card exits (keys erased) when the
    // frontend leaves, the next card serves everything written.
    let mut next = start(&env, "next");
    let (handed, taken) = hand_over(&mut old, &mut next);
    assert_eq!(handed, ControlResponse::HandedOver, "{}", log(&env, "old"));
    assert!(
        matches!(taken, ControlResponse::Attached { .. }),
        "{taken:?}"
    );
    drop(h);
    let st = wait_exit(&mut old.child, Duration::from_secs(20));
    assert!(st.success(), "old card exit {st}");
    wait_log(&env, "old", "card update complete: keys erased", 1);
    let mut h = Harness::connect(&next.vhost, 1);
    assert_eq!(h.read(0, 8, p1.len()).expect("read on next"), p1);
    assert_eq!(h.read(0, 32, p2.len()).expect("read on next"), p2);
    drop(h);
    next.detach();
    // Neither the key nor its hex is in any card log.
    for name in ["old", "new", "next"] {
        let text = log(&env, name);
        assert!(!text.contains(&hex(&key)), "{name}: key hex in its log");
        assert!(!contains(text.as_bytes(), &key), "{name}: key in its log");
    }
}

#[test]
fn cancel_before_attach_is_refused() {
    let env = Env::new(VOL_BYTES);
    let mut card = start(&env, "idle");
    match card.call(&ControlRequest::CancelHandOver) {
        ControlResponse::Error {
            code: ErrorCode::NotAttached,
            ..
        } => {}
        other => panic!("CancelHandOver before attach: {other:?}"),
    }
    assert!(card.alive());
}
