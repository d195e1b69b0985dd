//! The card as an NBD-over-TLS client of a real `qemu-storage-daemon` (the storage node's
//! engine), driven through a real vhost-user frontend.

#![allow(clippy::cast_possible_truncation)]

mod common;
mod nbd_common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use common::frontend::*;
use common::*;
use nbd_common::*;
use std::time::{Duration, Instant};
use vm_memory::Bytes;

const VOL_BYTES: u64 = 16 << 20;
const VOLUME: &str = "vol-nbd";
const IOERR: u8 = 1;

struct Setup {
    env: Env,
    ca: bulkhead_tokens::pki::CaDir,
    tls: std::path::PathBuf,
    port: u16,
    qsd_log: std::path::PathBuf,
}

fn setup() -> Option<Setup> {
    if !have_qsd() {
        bulkhead_testkit::skip_or_fail("qemu-storage-daemon is not installed");
        return None;
    }
    let env = Env::new(VOL_BYTES);
    let ca = cluster_ca(&env.path("ca"));
    let tls = qsd_tls_dir(&ca, STORAGE, &env.path("qsd-tls"));
    let qsd_log = env.path("qsd.log");
    Some(Setup {
        env,
        ca,
        tls,
        port: free_port(),
        qsd_log,
    })
}

fn block(tag: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(32).enumerate() {
        let s = format!("BULKHEAD-NBD-{tag:06}-{i:010}..");
        chunk.copy_from_slice(&s.as_bytes()[..chunk.len()]);
    }
    v
}

fn card_log(s: &Setup, name: &str) -> String {
    std::fs::read_to_string(s.env.path(&format!("{name}.log"))).unwrap_or_default()
}

#[test]
fn nbd_roundtrip_through_qsd_with_tls_stores_only_ciphertext() {
    let Some(s) = setup() else { return };
    let _qsd = Qsd::start(&s.tls, &s.env.backing, s.port, VOLUME, &s.qsd_log);
    let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
    let log = s.env.path("rt.log");
    let mut card = Card::start(
        &s.env,
        CardOpts {
            name: "rt",
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    let key = test_key(9);
    let r = card.attach(
        VOLUME,
        CryptoSectorSize::S4096,
        KeySource::Sealed(s.env.seal(VOLUME, &key)),
    );
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: VOL_BYTES / 512,
            encrypted: true
        }
    );
    let mut h = Harness::connect(&card.vhost, 1);
    assert_eq!(h.capacity(), VOL_BYTES / 512);
    let t = Instant::now();
    for i in 0..32u64 {
        assert_eq!(h.write(0, i * 128, &block(i, 64 << 10)), 0, "write {i}");
    }
    assert_eq!(h.flush(0), 0);
    for i in 0..32u64 {
        assert!(
            h.read(0, i * 128, 64 << 10) == Ok(block(i, 64 << 10)),
            "read {i}"
        );
    }
    eprintln!(
        "nbd roundtrip: 2 MiB written + flushed + read back in {:?}",
        t.elapsed()
    );
    // Figures (not asserted): 4 KiB at queue depth 1 through card, TLS and qsd on localhost.
    let four_k = block(99, 4096);
    let t = Instant::now();
    for i in 0..500u64 {
        assert_eq!(h.write(0, 8192 + (i % 256) * 8, &four_k), 0);
    }
    let w = t.elapsed() / 500;
    let t = Instant::now();
    for i in 0..500u64 {
        assert!(h.read(0, 8192 + (i % 256) * 8, 4096).is_ok());
    }
    eprintln!(
        "nbd 4K QD1 (one queue): write {w:?} per op, read {:?} per op",
        t.elapsed() / 500
    );
    // The storage node's file holds ciphertext only; the independent decryptor recovers it.
    let stored = std::fs::read(&s.env.backing).expect("qsd image");
    assert!(
        !contains(&stored, b"BULKHEAD-NBD-"),
        "plaintext on the storage node"
    );
    let plain = python_decrypt(&key, &s.env.backing, 4096, &s.env.path("plain.img"));
    assert!(
        plain[..64 << 10] == block(0, 64 << 10)[..],
        "decrypted block 0"
    );
    assert_eq!(card.metric("writes"), 532);
    assert_eq!(card.metric("flushes"), 1);
    assert_eq!(card.metric("nbd_failed_requests"), 0);
    assert_eq!(card.metric("io_errors"), 0);
    drop(h);
    card.detach();
}

#[test]
fn nbd_storage_node_killed_and_restarted_during_io_loses_nothing_acknowledged() {
    let Some(s) = setup() else { return };
    let mut qsd = Qsd::start(&s.tls, &s.env.backing, s.port, VOLUME, &s.qsd_log);
    let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
    let log = s.env.path("restart.log");
    let mut card = Card::start(
        &s.env,
        CardOpts {
            name: "restart",
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    let key = test_key(4);
    assert!(matches!(
        card.attach(
            VOLUME,
            CryptoSectorSize::S4096,
            KeySource::Sealed(s.env.seal(VOLUME, &key))
        ),
        ControlResponse::Attached { .. }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    const LEN: usize = 16 << 10;
    for i in 0..16u64 {
        assert_eq!(h.write(0, i * 32, &block(i, LEN)), 0, "write {i}");
    }
    // A write in flight when the storage node dies: the node is frozen first (so the write
    // cannot be answered before the kill, whatever the load), the write published and kicked
    // and given time to reach the wire, then SIGKILL.
    let (_, _, d) = h.slot_addrs(0, 0);
    h.mem
        .write_slice(&block(16, LEN), vm_memory::GuestAddress(d))
        .expect("data");
    qsd.freeze();
    let head = h.prepare(0, 0, VIRTIO_BLK_T_OUT, 16 * 32, LEN as u32, false);
    h.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    qsd.kill9();
    let killed = Instant::now();
    let restart = {
        let (tls, img, port, log) = (
            s.tls.clone(),
            s.env.backing.clone(),
            s.port,
            s.qsd_log.clone(),
        );
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            Qsd::start(&tls, &img, port, VOLUME, &log)
        })
    };
    let c = h.wait_used(0, Duration::from_secs(60));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].head, head);
    assert_eq!(
        h.status_of(0, 0),
        0,
        "the in-flight write completes after the restart"
    );
    let stall = killed.elapsed();
    assert!(
        stall >= Duration::from_secs(2),
        "completed without the server? {stall:?}"
    );
    let _qsd2 = restart.join().expect("restart thread");
    // More writes and a flush on the new connection, then everything reads back.
    for i in 17..24u64 {
        assert_eq!(h.write(0, i * 32, &block(i, LEN)), 0, "write {i}");
    }
    assert_eq!(h.flush(0), 0);
    for i in 0..24u64 {
        assert!(h.read(0, i * 32, LEN) == Ok(block(i, LEN)), "read {i}");
    }
    // The write was either on the wire when the node died (then re-sent) or still queued
    // (then sent first on the new connection); either way it completed only after the restart.
    eprintln!(
        "nbd restart: in-flight write stalled {stall:?} and completed (re-sent: {})",
        card.metric("nbd_resent")
    );
    assert!(card.metric("nbd_connection_losses") >= 1);
    assert!(card.metric("nbd_reconnects") >= 1);
    assert_eq!(card.metric("nbd_failed_requests"), 0);
    assert_eq!(card.metric("io_errors"), 0);
    drop(h);
    card.detach();
}

/// Starts a card that must refuse the server at its first handshake; returns its log.
fn refused_start(s: &Setup, name: &str, args: &[String]) -> String {
    let log = s.env.path(&format!("{name}.log"));
    let mut card = Card::spawn(
        &s.env,
        CardOpts {
            name,
            nbd: Some(args),
            log: Some(&log),
            ..Default::default()
        },
    );
    let st = wait_exit(&mut card.child, Duration::from_secs(30));
    assert!(
        !st.success(),
        "{name}: the card started against a refused server"
    );
    card_log(s, name)
}

#[test]
fn nbd_wrong_server_identity_or_foreign_ca_is_refused() {
    let Some(s) = setup() else { return };
    // A CA-valid certificate naming another storage node.
    let other = qsd_tls_dir(&s.ca, "storage-2", &s.env.path("qsd-tls-2"));
    {
        let _qsd = Qsd::start(&other, &s.env.backing, s.port, VOLUME, &s.qsd_log);
        let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
        let log = refused_start(&s, "wrongname", &args);
        assert!(log.contains("server identity refused"), "{log}");
    }
    // A storage-1 certificate from another cluster's CA.
    {
        let foreign = cluster_ca(&s.env.path("foreign-ca"));
        let dir = qsd_tls_dir(&foreign, STORAGE, &s.env.path("qsd-tls-foreign"));
        let port = free_port();
        let _qsd = Qsd::start(&dir, &s.env.backing, port, VOLUME, &s.qsd_log);
        let args = card_args(&s.ca, port, VOLUME, STORAGE);
        let log = refused_start(&s, "foreign", &args);
        assert!(log.contains("TLS handshake"), "{log}");
    }
    // Our card's certificate against a storage node of another cluster: the node refuses it.
    {
        let foreign = cluster_ca(&s.env.path("foreign-ca-2"));
        let dir = qsd_tls_dir(&foreign, STORAGE, &s.env.path("qsd-tls-foreign-2"));
        let port = free_port();
        let _qsd = Qsd::start(&dir, &s.env.backing, port, VOLUME, &s.qsd_log);
        let mut args = card_args(&foreign, port, VOLUME, STORAGE);
        // Trusts the foreign CA but presents this cluster's host certificate.
        args[9] = s.ca.cert(HOST).display().to_string();
        args[11] = s.ca.key(HOST).display().to_string();
        let _ = refused_start(&s, "foreign-client", &args);
    }
    let stored = std::fs::read(&s.env.backing).expect("image");
    assert!(
        stored.iter().all(|b| *b == 0),
        "a refused card wrote to the volume"
    );
}

#[test]
fn nbd_export_refused_at_reconnect_is_terminal() {
    let Some(s) = setup() else { return };
    let mut qsd = Qsd::start(&s.tls, &s.env.backing, s.port, VOLUME, &s.qsd_log);
    let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
    let log = s.env.path("fence.log");
    let mut card = Card::start(
        &s.env,
        CardOpts {
            name: "fence",
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    assert!(matches!(
        card.attach(
            VOLUME,
            CryptoSectorSize::S4096,
            KeySource::Sealed(s.env.seal(VOLUME, &test_key(5)))
        ),
        ControlResponse::Attached { .. }
    ));
    let mut h = Harness::connect(&card.vhost, 1);
    assert_eq!(h.write(0, 0, &block(1, 4096)), 0);
    // The storage node comes back without this volume's export (it was fenced / moved): GO is
    // refused with NBD_REP_ERR_UNKNOWN.
    qsd.kill9();
    let fenced = Qsd::start(&s.tls, &s.env.backing, s.port, "vol-elsewhere", &s.qsd_log);
    assert_eq!(h.write(0, 8, &block(2, 4096)), IOERR);
    assert_eq!(h.read(0, 0, 4096), Err(IOERR));
    assert_eq!(card.metric("nbd_fenced"), 1);
    // Terminal: even with the export back, the card does not reconnect.
    drop(fenced);
    let _back = Qsd::start(&s.tls, &s.env.backing, s.port, VOLUME, &s.qsd_log);
    assert_eq!(h.read(0, 0, 4096), Err(IOERR));
    assert_eq!(h.flush(0), IOERR);
    assert_eq!(card.metric("nbd_fenced"), 1);
    assert!(card.metric("nbd_failed_requests") >= 4);
    assert!(card.alive());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("volume is fenced"), "{text}");
    drop(h);
    card.detach();
}

/// A real guest (QEMU microvm, vhost-user-blk) on a network volume: it writes and fsyncs, the
/// storage node is killed -9 right then and restarted 3 s later while the guest writes again;
/// the guest's write stalls and completes, and after a power cycle the guest reads both writes
/// back. The storage node's file holds only ciphertext; the independent decryptor recovers
/// exactly what the guest wrote.
#[test]
fn nbd_guest_survives_storage_node_restart() {
    use common::guest::*;
    if !can_boot() {
        bulkhead_testkit::skip_or_fail(
            "nbd guest: needs qemu-system-x86_64 and target/guest/{vmlinux,initramfs.cpio} (make guest)",
        );
        return;
    }
    let Some(s) = setup() else { return };
    let mut qsd = Some(Qsd::start(
        &s.tls,
        &s.env.backing,
        s.port,
        VOLUME,
        &s.qsd_log,
    ));
    let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
    let log = s.env.path("guest-card.log");
    let mut card = Card::start(
        &s.env,
        CardOpts {
            name: "guest",
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    let key = test_key(33);
    assert!(matches!(
        card.attach(
            VOLUME,
            CryptoSectorSize::S4096,
            KeySource::Sealed(s.env.seal(VOLUME, &key))
        ),
        ControlResponse::Attached { .. }
    ));
    let write = "busybox dd if=/init of=/dev/vda bs=4096 seek=16 conv=fsync 2>/dev/null || exit 3\n\
                 echo BULKHEAD-PHASE-$((0+1))\n\
                 busybox sleep 1\n\
                 busybox dd if=/init of=/dev/vda bs=4096 seek=1024 conv=fsync 2>/dev/null || exit 6\n\
                 busybox sync\nexit 0\n";
    let mut restart = None;
    let mut killed_at = None;
    let status = boot_with(&s.env, &card.vhost, write, "nbd-1", &mut |console| {
        if killed_at.is_none() && console.contains("BULKHEAD-PHASE-1") {
            if let Some(mut q) = qsd.take() {
                q.kill9();
            }
            killed_at = Some(Instant::now());
            let (tls, img, port, log) = (
                s.tls.clone(),
                s.env.backing.clone(),
                s.port,
                s.qsd_log.clone(),
            );
            restart = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                Qsd::start(&tls, &img, port, VOLUME, &log)
            }));
        }
    });
    assert_eq!(status, 0, "guest write failed");
    let stalled = killed_at
        .expect("the guest never reached the kill point")
        .elapsed();
    // The second write was issued with the node down and finished only after the restart (3 s).
    assert!(
        stalled >= Duration::from_secs(3),
        "guest finished {stalled:?} after the kill"
    );
    let _qsd = restart.expect("restarted").join().expect("restart thread");
    let verify = "n=$(busybox wc -c </init)\n\
                  for at in 16 1024; do\n\
                  busybox dd if=/dev/vda of=/back bs=4096 skip=$at count=1 2>/dev/null || exit 4\n\
                  busybox head -c $n /back >/back2\n\
                  busybox cmp /init /back2 || exit 5\n\
                  done\nexit 0\n";
    assert_eq!(
        boot(&s.env, &card.vhost, verify, "nbd-2"),
        0,
        "guest read-back failed"
    );
    let (losses, reconnects) = (
        card.metric("nbd_connection_losses"),
        card.metric("nbd_reconnects"),
    );
    eprintln!(
        "nbd guest: finished {stalled:?} after the kill; connection losses {losses}, reconnects {reconnects}"
    );
    assert!(reconnects >= 1);
    assert_eq!(card.metric("nbd_failed_requests"), 0);
    assert_eq!(card.metric("io_errors"), 0);
    card.detach();

    let init = std::fs::read(repo_root().join("guest/init")).expect("guest/init");
    let raw = std::fs::read(&s.env.backing).expect("qsd image");
    assert!(
        !contains(&raw, b"BULKHEAD-GUEST-READY"),
        "guest plaintext on the storage node"
    );
    let plain = python_decrypt(&key, &s.env.backing, 4096, &s.env.path("plain.img"));
    for at in [16usize, 1024] {
        let off = at * 4096;
        assert!(
            plain[off..off + init.len()] == init[..],
            "decrypted block {at} differs from what the guest wrote"
        );
    }
}

/// Many requests on the wire at once: two queues × 32 descriptors published in one batch each,
/// handed to the card's I/O workers, so the connection thread matches out-of-order replies by
/// cookie. Every write lands where it was aimed and every read returns its own block, and more
/// than 8 requests were on the wire at once (issue 18: the card once capped at 8 per queue).
#[test]
fn nbd_concurrent_requests_complete_by_cookie() {
    let Some(s) = setup() else { return };
    let _qsd = Qsd::start(&s.tls, &s.env.backing, s.port, VOLUME, &s.qsd_log);
    let args = card_args(&s.ca, s.port, VOLUME, STORAGE);
    let log = s.env.path("conc.log");
    let mut card = Card::start(
        &s.env,
        CardOpts {
            name: "conc",
            queues: 2,
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    assert!(matches!(
        card.attach(
            VOLUME,
            CryptoSectorSize::S4096,
            KeySource::Sealed(s.env.seal(VOLUME, &test_key(6)))
        ),
        ControlResponse::Attached { .. }
    ));
    let mut h = Harness::connect(&card.vhost, 2);
    const PER_QUEUE: u16 = 32;
    const LEN: usize = 64 << 10;
    let sector = |q: usize, slot: u16| (q as u64 * u64::from(PER_QUEUE) + u64::from(slot)) * 128;
    let tag = |q: usize, slot: u16| q as u64 * 1000 + u64::from(slot);
    let run_batch = |h: &mut Harness, kind: u32, device_writes: bool| {
        for q in 0..2 {
            for slot in 0..PER_QUEUE {
                if kind == VIRTIO_BLK_T_OUT {
                    let (_, _, d) = h.slot_addrs(q, slot);
                    h.mem
                        .write_slice(&block(tag(q, slot), LEN), vm_memory::GuestAddress(d))
                        .expect("data");
                }
                h.prepare(q, slot, kind, sector(q, slot), LEN as u32, device_writes);
            }
            h.kick(q);
        }
        for q in 0..2 {
            let mut done = 0;
            while done < usize::from(PER_QUEUE) {
                done += h.wait_used(q, Duration::from_secs(60)).len();
            }
            for slot in 0..PER_QUEUE {
                assert_eq!(h.status_of(q, slot), 0, "queue {q} slot {slot}");
            }
        }
    };
    let t = Instant::now();
    run_batch(&mut h, VIRTIO_BLK_T_OUT, false);
    let w = t.elapsed();
    for q in 0..2 {
        for slot in 0..PER_QUEUE {
            let (_, _, d) = h.slot_addrs(q, slot);
            h.mem
                .write_slice(&vec![0u8; LEN], vm_memory::GuestAddress(d))
                .expect("clear");
        }
    }
    let t = Instant::now();
    run_batch(&mut h, VIRTIO_BLK_T_IN, true);
    let r = t.elapsed();
    for q in 0..2 {
        for slot in 0..PER_QUEUE {
            let (_, _, d) = h.slot_addrs(q, slot);
            let mut got = vec![0u8; LEN];
            h.mem
                .read_slice(&mut got, vm_memory::GuestAddress(d))
                .expect("data");
            assert!(got == block(tag(q, slot), LEN), "queue {q} slot {slot}");
        }
    }
    let peak = card.metric("nbd_inflight_peak");
    eprintln!("nbd concurrent: 64 × 64 KiB written in {w:?}, read in {r:?}; peak in flight {peak}");
    assert!(
        peak > 8,
        "at most {peak} requests on the wire at once: the deep-queue path is capped"
    );
    assert_eq!(card.metric("nbd_failed_requests"), 0);
    drop(h);
    card.detach();
}
