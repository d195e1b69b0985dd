//! A hostile guest driver: malformed descriptor chains get an error status (or, without a usable
//! status byte, a zero-length completion), are counted, leave the volume unchanged, and the card
//! keeps serving.

// Test code: casts are on trusted, test-chosen values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::*;
use common::*;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const VOL_BYTES: u64 = 16 << 20;
const CAP: u64 = VOL_BYTES / 512;

struct Case {
    name: &'static str,
    /// (addr, len, flags, next) written at descriptor indexes FIRST.., head = FIRST.
    descs: Vec<(u64, u32, u16, u16)>,
    /// Header (type, sector) written at HDR.
    header: (u32, u64),
    /// Expected status byte, or None = no status written (used len 0).
    want: Option<u8>,
    metric: &'static str,
}

const FIRST: u16 = 10;
const HDR: u64 = 0x20_0000;
const STATUS: u64 = 0x20_1000;
const DATA: u64 = 0x40_0000;

fn d(i: u16) -> u16 {
    FIRST + i
}

fn cases() -> Vec<Case> {
    let std_chain = |data: Vec<(u64, u32, u16)>| {
        let mut v = vec![(HDR, 16, F_NEXT, d(1))];
        let n = data.len() as u16;
        for (i, (a, l, f)) in data.into_iter().enumerate() {
            v.push((a, l, f | F_NEXT, d(i as u16 + 2)));
        }
        v.push((STATUS, 1, F_WRITE, 0));
        let _ = n;
        v
    };
    let mut long = vec![(HDR, 16, F_NEXT, d(1))];
    for i in 1..200u16 {
        long.push((DATA + u64::from(i) * 512, 512, F_NEXT | F_WRITE, d(i + 1)));
    }
    long.push((STATUS, 1, F_WRITE, 0));
    vec![
        Case {
            name: "too long",
            descs: long,
            header: (VIRTIO_BLK_T_IN, 0),
            want: None,
            metric: "rejected_chain_too_long",
        },
        Case {
            name: "loop",
            descs: vec![(HDR, 16, F_NEXT, d(1)), (STATUS, 1, F_WRITE | F_NEXT, d(0))],
            header: (VIRTIO_BLK_T_IN, 0),
            want: None,
            metric: "rejected_chain_too_long",
        },
        Case {
            name: "next beyond the table",
            descs: vec![(HDR, 16, F_NEXT, 999)],
            header: (VIRTIO_BLK_T_IN, 0),
            want: None,
            metric: "rejected_chain_too_long",
        },
        Case {
            name: "data outside guest memory",
            descs: std_chain(vec![((MEM_SIZE as u64) - 512, 4096, F_WRITE)]),
            header: (VIRTIO_BLK_T_IN, 0),
            want: Some(1),
            metric: "rejected_outside_memory",
        },
        Case {
            name: "write from outside guest memory",
            descs: std_chain(vec![(u64::MAX - 4095, 4096, 0)]),
            header: (VIRTIO_BLK_T_OUT, 0),
            want: Some(1),
            metric: "rejected_outside_memory",
        },
        Case {
            name: "header outside guest memory",
            descs: vec![
                ((MEM_SIZE as u64) + 4096, 16, F_NEXT, d(1)),
                (STATUS, 1, F_WRITE, 0),
            ],
            header: (VIRTIO_BLK_T_IN, 0),
            want: Some(1),
            metric: "rejected_outside_memory",
        },
        Case {
            name: "read into a device-readable buffer",
            descs: std_chain(vec![(DATA, 4096, 0)]),
            header: (VIRTIO_BLK_T_IN, 0),
            want: Some(1),
            metric: "rejected_wrong_direction",
        },
        Case {
            name: "write from a device-writable buffer",
            descs: std_chain(vec![(DATA, 4096, F_WRITE)]),
            header: (VIRTIO_BLK_T_OUT, 0),
            want: Some(1),
            metric: "rejected_wrong_direction",
        },
        Case {
            name: "status not writable",
            descs: vec![(HDR, 16, F_NEXT, d(1)), (STATUS, 1, 0, 0)],
            header: (VIRTIO_BLK_T_FLUSH, 0),
            want: None,
            metric: "rejected_wrong_direction",
        },
        Case {
            name: "write past the end",
            descs: std_chain(vec![(DATA, 8192, 0)]),
            header: (VIRTIO_BLK_T_OUT, CAP - 8),
            want: Some(1),
            metric: "rejected_past_end",
        },
        Case {
            name: "sector overflow",
            descs: std_chain(vec![(DATA, 4096, F_WRITE)]),
            header: (VIRTIO_BLK_T_IN, u64::MAX - 7),
            want: Some(1),
            metric: "rejected_past_end",
        },
        Case {
            name: "oversized request",
            descs: std_chain((0..9u64).map(|i| (DATA + (i << 20), 1 << 20, 0)).collect()),
            header: (VIRTIO_BLK_T_OUT, 0),
            want: Some(1),
            metric: "rejected_too_large",
        },
        Case {
            name: "unknown type",
            descs: std_chain(vec![]),
            header: (0xDEAD, 0),
            want: Some(2),
            metric: "rejected_unknown_type",
        },
        Case {
            name: "data overlapping the status byte",
            descs: std_chain(vec![(STATUS - 2048, 4096, F_WRITE)]),
            header: (VIRTIO_BLK_T_IN, 0),
            want: Some(1),
            metric: "rejected_overlap",
        },
        Case {
            name: "unaligned write",
            descs: std_chain(vec![(DATA, 4096, 0)]),
            header: (VIRTIO_BLK_T_OUT, 3),
            want: Some(1),
            metric: "rejected_unaligned",
        },
        Case {
            name: "short header",
            descs: vec![(HDR, 8, F_NEXT, d(1)), (STATUS, 1, F_WRITE, 0)],
            header: (VIRTIO_BLK_T_FLUSH, 0),
            want: Some(1),
            metric: "rejected_short_header",
        },
        Case {
            name: "discard past the end",
            descs: std_chain(vec![(DATA, 16, 0)]),
            header: (VIRTIO_BLK_T_DISCARD, 0),
            want: Some(1),
            metric: "rejected_past_end",
        },
    ]
}

#[test]
fn malicious_chains_are_refused_and_volume_unchanged() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(9);
    let mut card = Card::start(&env, CardOpts::default());
    let r = card.attach(
        "vol-evil",
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal("vol-evil", &key)),
    );
    assert!(matches!(r, ControlResponse::Attached { .. }));
    let mut h = Harness::connect(&card.vhost, 1);

    // Known content, durably on disk.
    let pattern: Vec<u8> = (0..VOL_BYTES as usize).map(|i| (i % 251) as u8).collect();
    for mib in 0..16usize {
        assert_eq!(
            h.write(
                0,
                ((mib << 20) / 512) as u64,
                &pattern[mib << 20..(mib + 1) << 20]
            ),
            0
        );
    }
    assert_eq!(h.flush(0), 0);
    let before = std::fs::read(&env.backing).expect("backing");

    for case in cases() {
        let metric_before = card.metric(case.metric);
        h.mem
            .write_obj(case.header.0.to_le(), GuestAddress(HDR))
            .expect("hdr");
        h.mem.write_obj(0u32, GuestAddress(HDR + 4)).expect("hdr");
        h.mem
            .write_obj(case.header.1.to_le(), GuestAddress(HDR + 8))
            .expect("hdr");
        // A discard segment past the end, for the discard case.
        h.mem
            .write_obj((CAP - 8).to_le(), GuestAddress(DATA))
            .expect("seg");
        h.mem
            .write_obj(64u32.to_le(), GuestAddress(DATA + 8))
            .expect("seg");
        h.mem.write_obj(0u32, GuestAddress(DATA + 12)).expect("seg");
        h.mem
            .write_obj(0xAAu8, GuestAddress(STATUS))
            .expect("status");
        for (i, (a, l, f, n)) in case.descs.iter().enumerate() {
            h.write_desc(0, d(i as u16), *a, *l, *f, *n);
        }
        h.publish(0, FIRST);
        h.kick(0);
        let c = h.wait_used(0, Duration::from_secs(10));
        assert_eq!(c.len(), 1, "{}: one completion", case.name);
        assert_eq!(c[0].head, FIRST, "{}", case.name);
        let status: u8 = h.mem.read_obj(GuestAddress(STATUS)).expect("status");
        match case.want {
            Some(want) => {
                assert_eq!(status, want, "{}: status", case.name);
                assert_eq!(c[0].len, 1, "{}: used len", case.name);
            }
            None => {
                assert_eq!(status, 0xAA, "{}: status must be untouched", case.name);
                assert_eq!(c[0].len, 0, "{}: used len", case.name);
            }
        }
        assert_eq!(
            card.metric(case.metric),
            metric_before + 1,
            "{}: metric {}",
            case.name,
            case.metric
        );
        // The card still serves correct requests.
        assert_eq!(
            h.read(0, 0, 4096).expect("read after bad chain"),
            pattern[..4096],
            "{}",
            case.name
        );
    }
    assert!(card.alive(), "card died");
    assert_eq!(h.flush(0), 0);
    let after = std::fs::read(&env.backing).expect("backing");
    assert!(before == after, "the volume changed");
    assert_eq!(card.metric("io_errors"), 0);
    drop(h);
    card.detach();
}
