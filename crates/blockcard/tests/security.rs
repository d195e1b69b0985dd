//! The card's security claims, each against the real binary.

// Test code: casts are on trusted, test-chosen values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, ErrorCode, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::*;
use common::*;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;
use vm_memory::Bytes;

const VOL_BYTES: u64 = 16 << 20;
const MARKER: &[u8] = b"BULKHEAD-KNOWN-PLAINTEXT-MARKER:";

fn marker_block(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn sealed_card(
    env: &Env,
    volume: &str,
    key: &[u8; 64],
    sector: CryptoSectorSize,
    name: &str,
) -> Card {
    let mut card = Card::start(
        env,
        CardOpts {
            name,
            ..Default::default()
        },
    );
    let r = card.attach(volume, sector, KeySource::Sealed(env.seal(volume, key)));
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        }
    );
    card
}

/// Format compatibility (independent implementation) and no plaintext on disk.
/// This host has no device-mapper, so `cryptsetup open --type plain -c aes-xts-plain64` can't be
/// used; tests/xts_decrypt.py applies the same transform with Python's `cryptography`.
#[test]
fn backing_file_is_aes_xts_plain64_and_holds_no_plaintext() {
    for (sector, name) in [
        (CryptoSectorSize::S512, "s512"),
        (CryptoSectorSize::S4096, "s4k"),
    ] {
        let env = Env::new(VOL_BYTES);
        let key = test_key(3);
        let card = sealed_card(&env, "vol-fmt", &key, sector, name);
        let mut h = Harness::connect(&card.vhost, 1);
        let data = marker_block(1 << 20);
        for mib in [0u64, 5, 15] {
            assert_eq!(h.write(0, (mib << 20) / 512, &data), 0);
        }
        assert_eq!(h.flush(0), 0);
        drop(h);
        card.detach();
        let raw = std::fs::read(&env.backing).expect("backing");
        assert!(
            !contains(&raw, MARKER),
            "plaintext marker found in the backing file"
        );
        let plain = python_decrypt(
            &key,
            &env.backing,
            sector.bytes() as usize,
            &env.path("plain.img"),
        );
        for mib in [0usize, 5, 15] {
            assert!(
                plain[mib << 20..(mib + 1) << 20] == data[..],
                "{name}: MiB {mib} does not decrypt to what was written"
            );
        }
    }
}

/// Instance storage: after detach the random key is gone, so the data is unrecoverable.
#[test]
fn ephemeral_detach_is_crypto_erase() {
    let env = Env::new(VOL_BYTES);
    let mut card = Card::start(&env, CardOpts::default());
    assert!(matches!(
        card.attach("inst-0", CryptoSectorSize::S4096, KeySource::Ephemeral),
        ControlResponse::Attached {
            encrypted: true,
            ..
        }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    let data = marker_block(1 << 20);
    assert_eq!(h.write(0, 0, &data), 0);
    assert_eq!(h.flush(0), 0);
    assert_eq!(h.read(0, 0, 1 << 20).expect("read"), data);
    drop(h);
    card.detach();

    let raw = std::fs::read(&env.backing).expect("backing");
    assert!(!contains(&raw, MARKER), "plaintext on disk");
    // A new attach (new random key) sees only noise where the data was.
    let mut card = Card::start(
        &env,
        CardOpts {
            name: "again",
            ..Default::default()
        },
    );
    assert!(matches!(
        card.attach("inst-0", CryptoSectorSize::S4096, KeySource::Ephemeral),
        ControlResponse::Attached { .. }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    let back = h.read(0, 0, 1 << 20).expect("read");
    assert!(!contains(&back, MARKER), "data survived detach");
    assert_ne!(back, data);
    drop(h);
    card.detach();
}

/// The key cannot be read out of the running card by another user (or the card's own uid), and
/// the sandbox is in place.
#[test]
fn key_unreadable_and_sandbox_in_place() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(7);
    let mut card = sealed_card(&env, "vol-mem", &key, CryptoSectorSize::S4096, "mem");
    let mut h = Harness::connect(&card.vhost, 1);
    assert_eq!(h.write(0, 0, &marker_block(65536)), 0);
    assert_eq!(h.read(0, 0, 65536).expect("read"), marker_block(65536));
    let pid = card.pid();

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.contains("Seccomp:\t2"),
        "seccomp filter not active:\n{status}"
    );
    assert!(
        status.contains("NoNewPrivs:\t1"),
        "no_new_privs not set:\n{status}"
    );
    assert!(
        status.contains(&format!("Uid:\t{CARD_UID}\t{CARD_UID}\t{CARD_UID}")),
        "privileges not dropped:\n{status}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "core dumps enabled:\n{limits}"
    );

    // As the card's own uid and as an unrelated uid: open /proc/PID/mem and scan every readable
    // mapping for either half of the key.
    let scanner = r#"
import sys
pid, k1, k2 = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
try:
    maps = open(f"/proc/{pid}/maps").read().splitlines()
    mem = open(f"/proc/{pid}/mem", "rb", 0)
except OSError as e:
    print("DENIED", e.errno); sys.exit(0)
found = False
for line in maps:
    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
    try:
        mem.seek(lo); chunk = mem.read(hi - lo)
    except OSError:
        continue
    if k1 in chunk or k2 in chunk:
        found = True
print("FOUND" if found else "READ-NOT-FOUND"); sys.exit(1 if found else 0)
"#;
    for uid in [CARD_UID, CARD_UID - 1] {
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(scanner)
            .arg(pid.to_string())
            .arg(hex(&key[..32]))
            .arg(hex(&key[32..]))
            .uid(uid)
            .gid(CARD_GID)
            .current_dir("/")
            .output()
            .expect("scanner");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "uid {uid}: key found in card memory: {text}"
        );
        assert!(
            text.starts_with("DENIED"),
            "uid {uid}: card memory was readable ({text})"
        );
    }
    assert!(card.alive());
    drop(h);
    card.detach();
}

/// kill -9 in the middle of writes: everything a completed FLUSH covered is intact after a
/// restart; the torn region holds, per 4 KiB sector, either the old or the new data.
#[test]
fn kill9_keeps_flushed_writes() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(11);
    let card = sealed_card(&env, "vol-crash", &key, CryptoSectorSize::S4096, "c1");
    let mut h = Harness::connect(&card.vhost, 1);
    assert_eq!(
        h.discard_like(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, (VOL_BYTES / 512) as u32, 0),
        0
    );
    let a: Vec<u8> = (0..4usize << 20).map(|i| (i / 4096) as u8 ^ 0x3C).collect();
    for mib in 0..4usize {
        assert_eq!(
            h.write(
                0,
                ((mib << 20) / 512) as u64,
                &a[mib << 20..(mib + 1) << 20]
            ),
            0
        );
    }
    assert_eq!(h.flush(0), 0, "flush must complete before the crash");

    // Queue 32 writes of 128 KiB to [8 MiB, 12 MiB) and kill the card while they run.
    let b = vec![0xB7u8; 128 << 10];
    for slot in 0..32u16 {
        let (_, _, d) = h.slot_addrs(0, slot);
        h.mem
            .write_slice(&b, vm_memory::GuestAddress(d))
            .expect("data");
        let sector = ((8u64 << 20) + u64::from(slot) * (128 << 10)) / 512;
        h.prepare(0, slot, VIRTIO_BLK_T_OUT, sector, 128 << 10, false);
    }
    h.kick(0);
    std::thread::sleep(Duration::from_millis(2));
    card.kill9();
    drop(h);

    let card = sealed_card(&env, "vol-crash", &key, CryptoSectorSize::S4096, "c2");
    let mut h = Harness::connect(&card.vhost, 1);
    for mib in 0..4usize {
        let got = h
            .read(0, ((mib << 20) / 512) as u64, 1 << 20)
            .expect("read");
        assert!(
            got == a[mib << 20..(mib + 1) << 20],
            "flushed data lost in MiB {mib}"
        );
    }
    let torn = {
        let mut v = Vec::new();
        for mib in 8..12usize {
            v.extend(
                h.read(0, ((mib << 20) / 512) as u64, 1 << 20)
                    .expect("read"),
            );
        }
        v
    };
    for (i, blk) in torn.chunks(4096).enumerate() {
        assert!(
            blk.iter().all(|x| *x == 0) || blk.iter().all(|x| *x == 0xB7),
            "sector {i} is neither old nor new"
        );
    }
    drop(h);
    card.detach();
}

/// Wrong, corrupted or misaddressed sealed blobs are refused with a clear error; the card stays
/// up and accepts the right one.
#[test]
fn bad_sealed_blobs_are_refused() {
    let env = Env::new(VOL_BYTES);
    let key = test_key(5);
    let mut card = Card::start(&env, CardOpts::default());
    let refused = |r: ControlResponse, want: &str| match r {
        ControlResponse::Error {
            code: ErrorCode::KeyRefused,
            message,
        } => {
            assert!(message.contains(want), "message {message:?} lacks {want:?}")
        }
        other => panic!("expected KeyRefused, got {other:?}"),
    };
    let mut corrupt = env.seal("vol-k", &key);
    corrupt[100] ^= 0x40;
    refused(
        card.attach("vol-k", CryptoSectorSize::S4096, KeySource::Sealed(corrupt)),
        "failed authentication",
    );
    refused(
        card.attach(
            "vol-other",
            CryptoSectorSize::S4096,
            KeySource::Sealed(env.seal("vol-k", &key)),
        ),
        "failed authentication",
    );
    let other_host = Env::new(4096);
    refused(
        card.attach(
            "vol-k",
            CryptoSectorSize::S4096,
            KeySource::Sealed(other_host.seal("vol-k", &key)),
        ),
        "addressed to host key",
    );
    let mut bad_magic = env.seal("vol-k", &key);
    bad_magic[0] = b'X';
    refused(
        card.attach(
            "vol-k",
            CryptoSectorSize::S4096,
            KeySource::Sealed(bad_magic),
        ),
        "bad magic",
    );
    assert!(card.metric("reads") == 0);
    assert!(matches!(
        card.attach(
            "vol-k",
            CryptoSectorSize::S4096,
            KeySource::Sealed(env.seal("vol-k", &key))
        ),
        ControlResponse::Attached {
            encrypted: true,
            ..
        }
    ));
    assert!(matches!(
        card.attach("vol-k", CryptoSectorSize::S4096, KeySource::Ephemeral),
        ControlResponse::Error {
            code: ErrorCode::AlreadyAttached,
            ..
        }
    ));
    card.detach();

    // No host key: sealed keys cannot be opened, and the card says why.
    let mut card = Card::start(
        &env,
        CardOpts {
            host_key: false,
            name: "nokey",
            ..Default::default()
        },
    );
    refused(
        card.attach(
            "vol-k",
            CryptoSectorSize::S4096,
            KeySource::Sealed(env.seal("vol-k", &key)),
        ),
        "--host-key",
    );
    drop(card);

    // A host key file readable by others is refused at start-up.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.host_key_path, std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-blockcard"))
        .args([
            "--control-socket",
            "/nonexistent/c",
            "--vhost-socket",
            "/nonexistent/v",
            "--uid",
            "65534",
            "--gid",
            "65534",
        ])
        .arg("--backing")
        .arg(&env.backing)
        .arg("--host-key")
        .arg(&env.host_key_path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Read-only volumes advertise VIRTIO_BLK_F_RO and refuse writes.
#[test]
fn read_only_volume_refuses_writes() {
    let env = Env::new(VOL_BYTES);
    std::fs::write(&env.backing, marker_block(VOL_BYTES as usize)).expect("fill");
    let mut card = Card::start(
        &env,
        CardOpts {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(matches!(
        card.attach("ro", CryptoSectorSize::S512, KeySource::Plain),
        ControlResponse::Attached {
            encrypted: false,
            ..
        }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    assert!(h.features & (1 << 5) != 0, "RO feature not offered");
    assert_eq!(h.write(0, 0, &[0u8; 4096]), 1);
    assert_eq!(h.read(0, 0, 4096).expect("read"), marker_block(4096));
    assert_eq!(card.metric("rejected_read_only"), 1);
    drop(h);
    card.detach();
    assert_eq!(
        std::fs::read(&env.backing).expect("backing"),
        marker_block(VOL_BYTES as usize)
    );
}

/// SIGTERM: the card erases its keys and exits cleanly (zeroize on exit).
#[test]
fn sigterm_exits_cleanly() {
    let env = Env::new(VOL_BYTES);
    let mut card = Card::start(&env, CardOpts::default());
    assert!(matches!(
        card.attach("t", CryptoSectorSize::S4096, KeySource::Ephemeral),
        ControlResponse::Attached { .. }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    assert_eq!(h.write(0, 0, &[1u8; 4096]), 0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(card.pid() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut card.child, Duration::from_secs(10));
    assert!(st.success(), "exit status {st}");
    drop(h);
}

/// Garbage on the control socket gets an error and a closed connection; the card keeps serving
/// the next controller connection.
#[test]
fn control_socket_survives_garbage() {
    use std::io::Write;
    let env = Env::new(VOL_BYTES);
    let mut card = Card::start(&env, CardOpts::default());
    let mut conn = card.conn.take().expect("conn");
    conn.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .expect("write");
    let body = bulkhead_blockcard::control::read_frame(&mut conn)
        .expect("frame")
        .expect("some");
    assert!(matches!(
        bulkhead_blockcard::control::ControlResponse::parse(&body).expect("parse"),
        ControlResponse::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    drop(conn);
    let s = std::os::unix::net::UnixStream::connect(&card.control).expect("reconnect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    card.conn = Some(s);
    assert!(matches!(
        card.attach("g", CryptoSectorSize::S4096, KeySource::Ephemeral),
        ControlResponse::Attached { .. }
    ));
    card.detach();
}
