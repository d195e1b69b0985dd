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

/// One mapping of /proc/PID/smaps: address range, its name, and its `VmFlags`.
struct Mapping {
    lo: u64,
    hi: u64,
    name: String,
    flags: Vec<String>,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                out.push(Mapping {
                    lo,
                    hi,
                    name: line.split_whitespace().nth(5).unwrap_or("").to_owned(),
                    flags: Vec::new(),
                });
                continue;
            }
        }
        if let Some(f) = line.strip_prefix("VmFlags:") {
            let m = out.last_mut().expect("VmFlags before any mapping");
            m.flags = f.split_whitespace().map(str::to_owned).collect();
        }
    }
    out
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Claim 3, checked from outside the running card: what the card itself guarantees about the key,
/// not what kernel defaults give anyway.
/// * Root (with CAP_SYS_PTRACE, as this test runs) reads all of the card's memory through
///   /proc/PID/mem and finds the key material (each 16-byte quarter of the XTS key, which AES key
///   schedules hold verbatim) *only* inside mappings whose `VmFlags` carry both `lo` (mlock'd) and
///   `dd` (MADV_DONTDUMP): a key schedule on the heap, or the key in any unlocked or dumpable
///   page, fails the test. There must be at least one hit per I/O lane (one key page each).
/// * `VmLck` > 0 and the locked+DONTDUMP mappings cover at least one page per lane.
/// * The core file size limit is 0 although the card was started with it unlimited.
/// * Non-dumpable: /proc/PID/mem is owned by root while the card runs as CARD_UID; the card's
///   own uid and another uid cannot open it.
/// * Detach zeroizes: the card reports (log line) that it wiped and verified as zero exactly one
///   key page per lane before it exited.
///
/// What root can still do on a host that is not sealed is written in docs/claims.md (row 3):
/// this test does it (it reads the key schedules out of the card).
#[test]
fn key_unreadable_and_sandbox_in_place() {
    const QUEUES: u16 = 2;
    let lanes = usize::from(QUEUES) * bulkhead_blockcard::backend::IO_LANES;
    let env = Env::new(VOL_BYTES);
    let key = test_key(7);
    let log = env.path("mem-card.log");
    let mut card = Card::start(
        &env,
        CardOpts {
            name: "mem",
            queues: QUEUES,
            log: Some(&log),
            ..Default::default()
        },
    );
    let r = card.attach(
        "vol-mem",
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal("vol-mem", &key)),
    );
    assert!(
        matches!(
            r,
            ControlResponse::Attached {
                encrypted: true,
                ..
            }
        ),
        "{r:?}"
    );
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
    let vm_lck: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmLck line");
    assert!(vm_lck > 0, "no locked memory in the card:\n{status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "core dumps enabled (the card was started with an unlimited core size):\n{limits}"
    );

    // Non-dumpable: the kernel hands /proc/PID/* of a non-dumpable process to root.
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(format!("/proc/{pid}/mem"))
            .expect("stat mem")
            .uid();
        assert_eq!(
            owner, 0,
            "/proc/{pid}/mem is owned by {owner}: the card (uid {CARD_UID}) is dumpable"
        );
    }

    // Where is the key? Root reads every readable mapping of the card.
    let maps = smaps(pid);
    let secret =
        |m: &Mapping| m.flags.iter().any(|f| f == "lo") && m.flags.iter().any(|f| f == "dd");
    let locked_dd: u64 = maps.iter().filter(|m| secret(m)).map(|m| m.hi - m.lo).sum();
    assert!(
        locked_dd >= (lanes as u64) * 4096,
        "only {locked_dd} bytes of mlock'd + MADV_DONTDUMP memory for {lanes} key pages"
    );
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("root opens /proc/PID/mem");
    let quarters: Vec<&[u8]> = key.chunks(16).collect();
    let mut hits_in_secret = 0usize;
    let mut leaks = Vec::new();
    for m in &maps {
        if m.name == "[vvar]" || m.name == "[vsyscall]" || m.name.starts_with("[vvar") {
            continue;
        }
        let Ok(len) = usize::try_from(m.hi - m.lo) else {
            continue;
        };
        let mut buf = vec![0u8; len];
        use std::os::unix::fs::FileExt;
        if mem.read_exact_at(&mut buf, m.lo).is_err() {
            continue; // unreadable (e.g. PROT_NONE guard pages)
        }
        for q in &quarters {
            for at in find_all(&buf, q) {
                if secret(m) {
                    hits_in_secret += 1;
                } else {
                    leaks.push(format!(
                        "{:#x} in {:x}-{:x} {} flags [{}]",
                        m.lo + at as u64,
                        m.lo,
                        m.hi,
                        m.name,
                        m.flags.join(" ")
                    ));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "key material outside mlock'd + MADV_DONTDUMP pages:\n{}",
        leaks.join("\n")
    );
    assert!(
        hits_in_secret >= lanes,
        "found the key only {hits_in_secret} times in the locked pages (expected at least one \
         key schedule per lane, {lanes}): the scan cannot see what it looks for"
    );

    // As the card's own uid and as an unrelated uid: /proc/PID/mem cannot be opened at all.
    let scanner = r#"
import sys
pid = sys.argv[1]
try:
    open(f"/proc/{pid}/mem", "rb", 0)
except OSError as e:
    print("DENIED", e.errno); sys.exit(0)
print("OPENED"); sys.exit(1)
"#;
    for uid in [CARD_UID, CARD_UID - 1] {
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(scanner)
            .arg(pid.to_string())
            .uid(uid)
            .gid(CARD_GID)
            .current_dir("/")
            .output()
            .expect("scanner");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("DENIED"),
            "uid {uid}: card memory could be opened ({text})"
        );
    }
    assert!(card.alive());
    drop(h);
    card.detach();
    let text = std::fs::read_to_string(&log).expect("card log");
    let wiped: Vec<usize> = text
        .lines()
        .filter(|l| l.contains("keys erased; detached"))
        .filter_map(|l| l.split("key_pages_wiped=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        wiped,
        vec![lanes],
        "the card did not report zeroizing one key page per lane at detach:\n{text}"
    );
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
