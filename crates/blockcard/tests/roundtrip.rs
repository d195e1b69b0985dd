//! End-to-end: the real card binary behind a real vhost-user frontend.

// Test code: casts are on trusted, test-chosen values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::*;
use common::*;
use rand::{Rng, SeedableRng};

const VOL_BYTES: u64 = 16 << 20;

fn roundtrip(sector: CryptoSectorSize, key: KeySource, queues: u16) {
    let env = Env::new(VOL_BYTES);
    let mut card = Card::start(
        &env,
        CardOpts {
            queues,
            ..Default::default()
        },
    );
    let encrypted = !matches!(key, KeySource::Plain);
    let r = card.attach("vol-rt", sector, key);
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted
        }
    );
    let mut h = Harness::connect(&card.vhost, usize::from(queues));
    assert_eq!(h.capacity(), VOL_BYTES / 512);
    assert_eq!(u64::from(h.blk_size()), sector.bytes());
    let id = h.get_id(0);
    assert_eq!(&id[..6], b"vol-rt");
    // A fresh encrypted volume reads as noise (zeros on disk decrypt to garbage, as with
    // dm-crypt): zero it through the card first.
    assert_eq!(
        h.discard_like(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, (VOL_BYTES / 512) as u32, 0),
        0
    );

    // Random patterns at random aligned offsets, spread over all queues; a shadow copy says
    // what every byte must read back as.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut shadow = vec![0u8; VOL_BYTES as usize];
    let unit = sector.bytes() as usize;
    for i in 0..64 {
        let q = i % h.queues();
        let units = rng.gen_range(1..=64usize);
        let len = units * unit;
        let start_unit = rng.gen_range(0..(VOL_BYTES as usize / unit - units));
        let off = start_unit * unit;
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        assert_eq!(h.write(q, (off / 512) as u64, &data), 0, "write {i}");
        shadow[off..off + len].copy_from_slice(&data);
    }
    assert_eq!(h.flush(0), 0);
    for i in 0..64 {
        let q = i % h.queues();
        let units = rng.gen_range(1..=128usize);
        let len = units * unit;
        let start_unit = rng.gen_range(0..(VOL_BYTES as usize / unit - units));
        let off = start_unit * unit;
        let got = h.read(q, (off / 512) as u64, len).expect("read");
        assert!(got == shadow[off..off + len], "read {i} at {off} differs");
    }

    // Write-zeroes reads back zeros (encrypted zeros on disk); discard succeeds.
    let z_off = 64 * unit;
    let z_sectors = (8 * unit / 512) as u32;
    assert_eq!(h.write(0, (z_off / 512) as u64, &vec![0x5Au8; 8 * unit]), 0);
    assert_eq!(
        h.discard_like(
            0,
            VIRTIO_BLK_T_WRITE_ZEROES,
            (z_off / 512) as u64,
            z_sectors,
            0
        ),
        0
    );
    assert_eq!(
        h.read(0, (z_off / 512) as u64, 8 * unit).expect("read"),
        vec![0u8; 8 * unit]
    );
    assert_eq!(h.discard_like(0, VIRTIO_BLK_T_DISCARD, 0, z_sectors, 0), 0);
    assert_eq!(h.flush(0), 0);

    let raw = std::fs::read(&env.backing).expect("backing");
    if encrypted {
        // Ciphertext: the write-zeroed range is not zeros on disk.
        assert_ne!(&raw[z_off..z_off + 8 * unit], &vec![0u8; 8 * unit][..]);
    } else {
        assert_eq!(&raw[z_off..z_off + 8 * unit], &vec![0u8; 8 * unit][..]);
    }
    assert!(card.metric("writes") >= 65);
    assert!(card.metric("reads") >= 65);
    assert_eq!(card.metric("io_errors"), 0);
    drop(h);
    card.detach();
}

#[test]
fn roundtrip_sealed_xts_4k_two_queues() {
    let env_key = test_key(1);
    // The blob must be sealed to the env's host key, which `roundtrip` creates; seal there.
    roundtrip_sealed(CryptoSectorSize::S4096, env_key, 2);
}

#[test]
fn roundtrip_ephemeral_xts_512() {
    roundtrip(CryptoSectorSize::S512, KeySource::Ephemeral, 1);
}

#[test]
fn roundtrip_plain_explicit() {
    roundtrip(CryptoSectorSize::S512, KeySource::Plain, 1);
}

fn roundtrip_sealed(sector: CryptoSectorSize, key: [u8; 64], queues: u16) {
    let env = Env::new(VOL_BYTES);
    let blob = env.seal("vol-rt", &key);
    let mut card = Card::start(
        &env,
        CardOpts {
            queues,
            ..Default::default()
        },
    );
    let r = card.attach("vol-rt", sector, KeySource::Sealed(blob));
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        }
    );
    let mut h = Harness::connect(&card.vhost, usize::from(queues));
    assert_eq!(
        h.discard_like(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, (VOL_BYTES / 512) as u32, 0),
        0
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let unit = sector.bytes() as usize;
    let mut shadow = vec![0u8; VOL_BYTES as usize];
    for i in 0..48 {
        let q = i % h.queues();
        let units = rng.gen_range(1..=32usize);
        let len = units * unit;
        let off = rng.gen_range(0..(VOL_BYTES as usize / unit - units)) * unit;
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        assert_eq!(h.write(q, (off / 512) as u64, &data), 0);
        shadow[off..off + len].copy_from_slice(&data);
    }
    assert_eq!(h.flush(1 % h.queues()), 0);
    for q in 0..h.queues() {
        for mib in 0..4usize {
            let got = h.read(q, (mib << 20) as u64 / 512, 1 << 20).expect("read");
            assert!(
                got == shadow[mib << 20..(mib + 1) << 20],
                "queue {q} read differs"
            );
        }
    }
    // A VMM reconnecting (guest reboot, VMM restart) gets a working device with the same data.
    drop(h);
    let mut h = Harness::connect(&card.vhost, usize::from(queues));
    let got = h.read(0, 0, 1 << 20).expect("read after reconnect");
    assert!(got == shadow[..1 << 20], "data differs after reconnect");
    // Independent check of what is on disk.
    let plain = python_decrypt(&key, &env.backing, unit, &env.path("plain.img"));
    assert!(
        plain == shadow,
        "python decryption of the backing file differs from what was written"
    );
    drop(h);
    card.detach();
}

/// A block device as backing store (a loop device over a file; BLKGETSIZE64, O_DIRECT, and
/// BLKDISCARD). Skipped where loop devices cannot be set up.
#[test]
fn loop_device_backing() {
    let env = Env::new(VOL_BYTES);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&env.backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => {
            bulkhead_testkit::skip_or_fail("loop_device_backing: losetup unavailable");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Detach(dev.clone());
    let mut env = env;
    let file = std::mem::replace(&mut env.backing, std::path::PathBuf::from(&dev));
    let key = test_key(13);
    let mut card = Card::start(&env, CardOpts::default());
    let r = card.attach(
        "vol-loop",
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal("vol-loop", &key)),
    );
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        }
    );
    let mut h = Harness::connect(&card.vhost, 1);
    let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 13 % 256) as u8).collect();
    assert_eq!(h.write(0, 2048, &data), 0);
    assert_eq!(h.flush(0), 0);
    assert_eq!(h.read(0, 2048, 1 << 20).expect("read"), data);
    assert_eq!(h.discard_like(0, VIRTIO_BLK_T_DISCARD, 8192, 64, 0), 0);
    drop(h);
    card.detach();
    let plain = python_decrypt(&key, &file, 4096, &env.path("plain.img"));
    assert!(
        plain[1 << 20..2 << 20] == data[..],
        "loop device contents do not decrypt to the data"
    );
}
