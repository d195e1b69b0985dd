//! The deep-queue path (issue 18): far more than 8 requests in flight on one queue, every byte
//! checked, and FLUSH ordering — a flush completes only after every earlier write of its queue
//! is on the backing store.

// Test code: casts are on trusted, test-chosen values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::*;
use common::*;
use std::time::{Duration, Instant};
use vm_memory::Bytes;

const VOL_BYTES: u64 = 64 << 20;
/// Requests published before one kick (the test frontend has 64 slots per queue).
const DEPTH: u16 = 60;

/// Slot `s`'s request length: mostly 4 KiB..64 KiB (the workers' own bounce buffers), every
/// seventh 256 KiB (a shared large bounce buffer).
fn len_of(slot: u16) -> usize {
    if slot % 7 == 3 {
        256 << 10
    } else {
        4096 * (1 + usize::from(slot) % 16)
    }
}

/// Slot `s`'s offset: 1 MiB apart, so no two requests of a round overlap.
fn off_of(round: u64, slot: u16) -> u64 {
    round * (DEPTH as u64) * (1 << 20) / 2 % (VOL_BYTES / 2) + u64::from(slot) * (1 << 20) / 2
}

fn pattern(round: u64, slot: u16, len: usize) -> Vec<u8> {
    let mut x = (round << 32) ^ (u64::from(slot) << 16) ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Publishes `DEPTH` requests of `kind` (slot `s` at `off_of(round, s)`) with one kick and waits
/// for all of them; returns the heads in completion order.
fn batch(h: &mut Harness, round: u64, kind: u32) -> Vec<u16> {
    for slot in 0..DEPTH {
        let len = len_of(slot);
        let (_, _, d) = h.slot_addrs(0, slot);
        let fill = if kind == VIRTIO_BLK_T_OUT {
            pattern(round, slot, len)
        } else {
            vec![0u8; len]
        };
        h.mem
            .write_slice(&fill, vm_memory::GuestAddress(d))
            .expect("data");
        h.prepare(
            0,
            slot,
            kind,
            off_of(round, slot) / 512,
            len as u32,
            kind == VIRTIO_BLK_T_IN,
        );
    }
    h.kick(0);
    let mut order = Vec::new();
    while order.len() < usize::from(DEPTH) {
        order.extend(
            h.wait_used(0, Duration::from_secs(60))
                .into_iter()
                .map(|c| c.head),
        );
    }
    for slot in 0..DEPTH {
        assert_eq!(h.status_of(0, slot), 0, "round {round} slot {slot}");
    }
    order
}

/// 60 writes of 4 KiB..256 KiB published at once, read back 60 at once: every byte as written,
/// and the card had more than 8 (here: all 60) requests in flight.
#[test]
fn sixty_in_flight_every_byte() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(21);
    let mut card = Card::start(&env, CardOpts::default());
    let r = card.attach(
        "vol-deep",
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal("vol-deep", &key)),
    );
    assert!(matches!(r, ControlResponse::Attached { .. }), "{r:?}");
    let mut h = Harness::connect(&card.vhost, 1);
    for round in 0..3u64 {
        batch(&mut h, round, VIRTIO_BLK_T_OUT);
        assert_eq!(h.flush(0), 0);
        batch(&mut h, round, VIRTIO_BLK_T_IN);
        for slot in 0..DEPTH {
            let len = len_of(slot);
            let (_, _, d) = h.slot_addrs(0, slot);
            let mut got = vec![0u8; len];
            h.mem
                .read_slice(&mut got, vm_memory::GuestAddress(d))
                .expect("data");
            assert!(
                got == pattern(round, slot, len),
                "round {round} slot {slot}: read back differs"
            );
        }
    }
    // The same bytes, decrypted independently from the backing file.
    drop(h);
    let peak = card.metric("inflight_peak");
    assert_eq!(card.metric("io_errors"), 0);
    card.detach();
    let plain = python_decrypt(&key, &env.backing, 4096, &env.path("plain.bin"));
    for slot in 0..DEPTH {
        let off = off_of(2, slot) as usize;
        let len = len_of(slot);
        assert!(
            plain[off..off + len] == pattern(2, slot, len)[..],
            "slot {slot}: backing file differs"
        );
    }
    eprintln!("deep queue: peak {peak} requests in flight");
    assert!(
        peak > 8,
        "at most {peak} requests in flight at once: the deep-queue path is capped"
    );
}

/// 30 writes, a FLUSH, 29 more writes, all published with one kick. The card is killed -9 the
/// moment the flush's completion appears: every write published before the flush is then in the
/// backing file (decrypted independently), and every one of them completed before the flush.
#[test]
fn flush_waits_for_every_earlier_write() {
    const BEFORE: u16 = 30;
    let env = Env::new(VOL_BYTES);
    let key = test_key(22);
    let mut card = Card::start(&env, CardOpts::default());
    let r = card.attach(
        "vol-fl",
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal("vol-fl", &key)),
    );
    assert!(matches!(r, ControlResponse::Attached { .. }), "{r:?}");
    let mut h = Harness::connect(&card.vhost, 1);
    let mut flush_head = 0;
    for slot in 0..DEPTH {
        if slot == BEFORE {
            flush_head = h.prepare(0, slot, VIRTIO_BLK_T_FLUSH, 0, 0, false);
            continue;
        }
        // Large writes first: the slowest requests are the ones the flush must wait for.
        let len = if slot < BEFORE {
            256 << 10
        } else {
            len_of(slot)
        };
        let (_, _, d) = h.slot_addrs(0, slot);
        h.mem
            .write_slice(&pattern(9, slot, len), vm_memory::GuestAddress(d))
            .expect("data");
        h.prepare(
            0,
            slot,
            VIRTIO_BLK_T_OUT,
            off_of(0, slot) / 512,
            len as u32,
            false,
        );
    }
    h.kick(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut order = Vec::new();
    while !order.contains(&flush_head) {
        assert!(Instant::now() < deadline, "flush never completed");
        order.extend(h.poll_used(0).into_iter().map(|c| c.head));
        std::hint::spin_loop();
    }
    card.kill9();
    assert_eq!(h.status_of(0, BEFORE), 0, "flush status");
    let flush_pos = order.iter().position(|x| *x == flush_head).unwrap_or(0);
    for slot in 0..BEFORE {
        let head = slot * 3;
        let pos = order.iter().position(|x| *x == head);
        assert!(
            pos.is_some_and(|p| p < flush_pos),
            "write {slot} (published before the flush) completed after it or not at all"
        );
    }
    drop(h);
    let plain = python_decrypt(&key, &env.backing, 4096, &env.path("plain.bin"));
    for slot in 0..BEFORE {
        let off = off_of(0, slot) as usize;
        let len = 256 << 10;
        assert!(
            plain[off..off + len] == pattern(9, slot, len)[..],
            "write {slot} was acknowledged before the flush but is not in the backing file"
        );
    }
}
