//! Unit vectors of the state blob (also the fuzz target's seed).
use super::*;

/// A small but complete state: the unit vectors and the fuzz target's seed.
pub fn sample() -> MachineState {
    let mut regs = kvm_regs {
        rip: 0xffff_ffff_8100_0000,
        rax: 42,
        ..Default::default()
    };
    regs.rflags = 2;
    let mut msrs = vec![(0x10, 12345u64), (0xc000_0082, 0xffff_ffff_8160_0000)];
    msrs.push((0x4b56_4d01, 0x1234_5001));
    let vcpu = VcpuState {
        mp_state: kvm_mp_state::default(),
        regs,
        sregs: kvm_sregs::default(),
        xsave: Box::default(),
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs::default(),
        lapic: kvm_lapic_state::default(),
        events: kvm_vcpu_events::default(),
        msrs,
    };
    let mut cfg = [0u8; 256];
    cfg[0] = 0x36;
    MachineState {
        version: STATE_VERSION,
        config: MachineConfig {
            memory_mib: 128,
            vcpus: 1,
            threads_per_core: 1,
        },
        paused_at_ns: 77,
        running: true,
        vm: KvmVmState {
            clock: kvm_clock_data::default(),
            pit: kvm_pit_state2::default(),
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
        },
        vcpus: vec![vcpu],
        serial: SerialRegs {
            regs: [1, 0, 0, 1, 3, 0x60, 8, 0xb0, 0],
            fifo: vec![b'x'],
        },
        console: ConsoleState {
            start: 5,
            data: b"count=1\n".to_vec(),
        },
        pci: PciState {
            address: 0x8000_0800,
            host: cfg,
            ports: vec![PortState {
                cfg,
                present: false,
                husk: Some((0xc000_0000, 0x4000)),
            }],
            rotor: 1,
        },
        mmio: vec![
            Some(MmioState {
                device_type: 4,
                status: 15,
                acked_features: 1 << 32,
                active: true,
                queues: vec![QueueRegs {
                    max_size: 64,
                    size: 64,
                    ready: true,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                }],
                positions: vec![(3, 3)],
                ..Default::default()
            }),
            None,
        ],
        msi_routes: vec![(24, 0xfee0_0000, 0x41)],
        next_gsi: 25,
        cards: Vec::new(),
    }
}

fn same(a: &MachineState, b: &MachineState) -> bool {
    a.encode() == b.encode()
}

#[test]
fn round_trips() {
    let s = sample();
    let blob = s.encode();
    let back = MachineState::parse(&blob).expect("parses");
    assert!(same(&s, &back));
    assert_eq!(back.vcpus[0].regs.rax, 42);
    assert_eq!(back.console.data, b"count=1\n");
    assert_eq!(
        back.mmio[0].as_ref().map(|m| m.positions.clone()),
        Some(vec![(3, 3)])
    );
}

#[test]
fn truncated_blobs_are_refused_as_truncated() {
    let blob = sample().encode();
    for cut in [
        4,
        10,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + 1,
        blob.len() - 1,
    ] {
        let e = MachineState::parse(&blob[..cut])
            .map(|_| ())
            .expect_err("refused");
        assert_eq!(e.refusal(), StateRefusal::Truncated, "cut at {cut}: {e}");
    }
    for cut in 0..blob.len() {
        assert!(MachineState::parse(&blob[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn every_flipped_body_byte_is_refused_as_corrupted() {
    let blob = sample().encode();
    for i in (HEADER_LEN..blob.len()).step_by(97) {
        let mut b = blob.clone();
        b[i] ^= 0x5a;
        assert_eq!(MachineState::parse(&b).map(|_| ()), Err(StateError::Digest));
    }
    let mut b = blob.clone();
    b[0] = b'X';
    assert_eq!(
        MachineState::parse(&b).map(|_| ()),
        Err(StateError::BadMagic)
    );
    let mut b = blob.clone();
    b.push(0);
    assert_eq!(
        MachineState::parse(&b).map(|_| ()),
        Err(StateError::Trailing { extra: 1 })
    );
}

#[test]
fn unknown_versions_are_refused_before_the_body() {
    let mut blob = sample().encode();
    for v in [0u16, STATE_VERSION + 1, u16::MAX] {
        blob[4..6].copy_from_slice(&v.to_le_bytes());
        let e = MachineState::parse(&blob).map(|_| ()).expect_err("refused");
        assert_eq!(e, StateError::UnknownVersion { got: v });
        assert_eq!(e.refusal(), StateRefusal::UnknownVersion);
    }
}

/// A body whose digest is right but whose counts lie is refused, never read past its end.
#[test]
fn lying_counts_behind_a_good_digest_are_malformed() {
    let s = sample();
    let mut body = s.encode()[HEADER_LEN..].to_vec();
    // The vCPU count sits after config (10), pause time and running (9) and the five VM
    // structures.
    let at = 10
        + 9
        + std::mem::size_of::<kvm_clock_data>()
        + std::mem::size_of::<kvm_pit_state2>()
        + 3 * std::mem::size_of::<kvm_irqchip>();
    body[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut blob = s.encode()[..HEADER_LEN].to_vec();
    blob[HEADER_LEN - 32..].copy_from_slice(&Sha256::digest(&body));
    blob.extend_from_slice(&body);
    assert_eq!(
        MachineState::parse(&blob).map(|_| ()),
        Err(StateError::Malformed("vcpu count"))
    );
}

/// [`sample`] with a block card in root port 0 (format 2's card section), 2 queues.
pub fn sample_with_card() -> MachineState {
    let mut s = sample();
    s.pci.ports[0].present = true;
    let mut cfg = [0u8; 256];
    cfg[0] = 0xf4;
    cfg[1] = 0x1a;
    cfg[0x10..0x14].copy_from_slice(&0xc000_0000u32.to_le_bytes());
    let q = |i: u64| QueueRegs {
        max_size: 256,
        size: 256,
        ready: true,
        desc: 0x10_0000 + i * 0x1_0000,
        avail: 0x10_1000 + i * 0x1_0000,
        used: 0x10_2000 + i * 0x1_0000,
    };
    s.cards.push(CardState {
        port: 0,
        id: "vol-1".to_owned(),
        kind: CardKind::Block,
        read_only: false,
        cfg,
        touched: true,
        core: MmioState {
            device_type: VIRTIO_ID_BLOCK,
            status: 15,
            acked_features: (1 << 32) | (1 << 9),
            active: true,
            queues: vec![q(0), q(1)],
            ..Default::default()
        },
        msix: vec![
            MsixEntryState {
                address: 0xfee0_0000,
                data: 0x22,
                masked: false,
            };
            3
        ],
        msix_config: 0,
        queue_vectors: vec![1, 2],
        gsi_base: 24,
        vhost: VhostUserState {
            backend_features: (1 << 32) | (1 << 30) | (1 << 9),
            protocol: Some(0x200 | 0x1),
            acked_features: (1 << 32) | (1 << 30) | (1 << 9),
            active_queues: 2,
            started: true,
        },
        device_config: vec![0x80; 60],
    });
    s
}

/// `s` encoded, with the body changed by `edit` and the digest made right again: what a
/// buggy (not a corrupting) sender would produce.
fn resealed(s: &MachineState, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let blob = s.encode();
    let mut body = blob[HEADER_LEN..].to_vec();
    edit(&mut body);
    let mut out = blob[..HEADER_LEN].to_vec();
    out[8..12].copy_from_slice(&u32::try_from(body.len()).expect("len").to_le_bytes());
    out[HEADER_LEN - 32..].copy_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

#[test]
fn a_card_round_trips_in_format_2() {
    let s = sample_with_card();
    let blob = s.encode();
    assert_eq!(u16::from_le_bytes([blob[4], blob[5]]), 2);
    let back = MachineState::parse(&blob).expect("parses");
    assert_eq!(back.version, STATE_VERSION);
    assert_eq!(back.cards, s.cards);
    assert_eq!(
        back.cards[0].fd_count(),
        5,
        "connection, two kicks, two calls"
    );
    assert!(same(&s, &back));
}

/// A version-1 blob (no card section) is still read, and written back as version 1.
#[test]
fn format_1_is_still_read() {
    let mut s = sample();
    s.version = STATE_VERSION_V1;
    let blob = s.encode();
    assert_eq!(u16::from_le_bytes([blob[4], blob[5]]), 1);
    let back = MachineState::parse(&blob).expect("v1 parses");
    assert_eq!(back.version, 1);
    assert!(back.cards.is_empty());
    assert_eq!(back.encode(), blob);
    // The same body labelled version 2 lacks the card count: malformed, not misread.
    let mut v2 = blob.clone();
    v2[4..6].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        MachineState::parse(&v2).map(|_| ()),
        Err(StateError::Malformed("card count"))
    );
    // A v1 state never carries a card; a state with one is always written as v2.
    let mut c = sample_with_card();
    c.version = STATE_VERSION_V1;
    assert_eq!(u16::from_le_bytes([c.encode()[4], c.encode()[5]]), 2);
    // A v1 blob whose slot reports a card is refused.
    let mut p = sample();
    p.version = STATE_VERSION_V1;
    p.pci.ports[0].present = true;
    assert_eq!(
        MachineState::parse(&p.encode()).map(|_| ()),
        Err(StateError::Malformed("port presence"))
    );
}

/// Every inconsistency of a card section behind a good digest is refused with where it is.
#[test]
fn a_bad_card_section_is_refused_with_its_place() {
    let bad = |edit: &dyn Fn(&mut MachineState), at: &'static str| {
        let mut s = sample_with_card();
        edit(&mut s);
        let e = MachineState::parse(&s.encode()).map(|_| ()).expect_err(at);
        assert_eq!(e, StateError::BadCard { card: 0, at }, "{at}");
        assert_eq!(e.refusal(), StateRefusal::Malformed);
    };
    bad(
        &|s| s.cards[0].core.device_type = VIRTIO_ID_NET,
        "card device type",
    );
    bad(&|s| s.cards[0].id = "Vol_1".to_owned(), "card id");
    bad(&|s| s.cards[0].id = String::new(), "card id");
    bad(&|s| s.cards[0].id = "v".repeat(65), "card id");
    bad(
        &|s| s.cards[0].msix.pop().map(|_| ()).unwrap_or(()),
        "card vector count",
    );
    bad(
        &|s| s.cards[0].queue_vectors.push(1),
        "card queue vector count",
    );
    bad(&|s| s.cards[0].queue_vectors[0] = 3, "card vector");
    bad(&|s| s.cards[0].msix_config = 7, "card vector");
    bad(
        &|s| s.cards[0].vhost.active_queues = 3,
        "card active queues",
    );
    bad(&|s| s.cards[0].port = 1, "port");
    bad(&|s| s.pci.ports[0].present = false, "port presence");
    bad(
        &|s| {
            s.cards[0].kind = CardKind::Net;
            s.cards[0].core.device_type = VIRTIO_ID_NET;
            s.cards[0].read_only = true;
        },
        "card read-only",
    );
    bad(
        &|s| s.cards[0].device_config = vec![0; 257],
        "card device config",
    );
    bad(
        &|s| {
            s.cards[0].core.queues.clear();
            s.cards[0].queue_vectors.clear();
            s.cards[0].msix.truncate(1);
        },
        "card queue count",
    );
    // Two cards in one slot, or under one id.
    let mut s = sample_with_card();
    s.pci.ports.push(s.pci.ports[0].clone());
    let mut second = s.cards[0].clone();
    s.cards.push(second.clone());
    assert_eq!(
        MachineState::parse(&s.encode()).map(|_| ()),
        Err(StateError::BadCard {
            card: 1,
            at: "port taken twice"
        })
    );
    second.port = 1;
    s.cards[1] = second;
    assert_eq!(
        MachineState::parse(&s.encode()).map(|_| ()),
        Err(StateError::BadCard {
            card: 1,
            at: "id taken twice"
        })
    );
    // An unknown kind code and a non-boolean flag, written by hand.
    let s = sample_with_card();
    let mut v1 = sample();
    v1.version = STATE_VERSION_V1;
    let v1_body = v1.encode().len() - HEADER_LEN;
    // The card section follows the version-1 body: count (4), port (1), id (4 + 5), kind.
    let kind_at = |_: &[u8]| v1_body + 4 + 1 + 4 + 5;
    let blob = resealed(&s, |b| {
        let at = kind_at(b);
        b[at] = 9;
    });
    assert_eq!(
        MachineState::parse(&blob).map(|_| ()),
        Err(StateError::BadCard {
            card: 0,
            at: "card kind"
        })
    );
    let blob = resealed(&s, |b| {
        let at = kind_at(b) + 1;
        b[at] = 2;
    });
    assert_eq!(
        MachineState::parse(&blob).map(|_| ()),
        Err(StateError::BadCard {
            card: 0,
            at: "card read-only"
        })
    );
    // Cut anywhere in the card section: malformed, never a panic.
    let full = s.encode();
    for cut in (v1_body..full.len() - HEADER_LEN).step_by(7) {
        let blob = resealed(&s, |b| b.truncate(cut));
        assert!(MachineState::parse(&blob).is_err(), "cut at {cut}");
    }
}

/// The fuzz target's seeds: one blob of each version this build reads.
#[test]
fn fuzz_seeds_of_each_version_parse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/live_update_state");
    let mut v1 = sample();
    v1.version = STATE_VERSION_V1;
    for (name, s) in [("sample", v1), ("card-v2", sample_with_card())] {
        let p = format!("{dir}/{name}");
        match std::fs::read(&p) {
            Ok(b) => assert_eq!(MachineState::parse(&b).map(|s| s.encode()), Ok(b)),
            Err(_) => {
                if std::env::var_os("BULKHEAD_WRITE_SEEDS").is_some() {
                    std::fs::write(&p, s.encode()).expect("write seed");
                }
            }
        }
    }
}
