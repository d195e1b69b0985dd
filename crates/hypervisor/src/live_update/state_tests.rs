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

/// The fuzz target's seed is a blob of this version (re-seed on a version bump).
#[test]
fn fuzz_seed_parses() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/live_update_state/sample"
    );
    match std::fs::read(p) {
        Ok(b) => assert!(MachineState::parse(&b).is_ok()),
        Err(_) => {
            // Write it when missing (run once when the format changes, then commit it).
            if std::env::var_os("BULKHEAD_WRITE_SEEDS").is_some() {
                std::fs::write(p, sample().encode()).expect("write seed");
            }
        }
    }
}
