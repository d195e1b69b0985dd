//! Benchmark driver for scripts/bench-blockcard.sh: the same real vhost-user frontend as the
//! tests (tests/common/frontend.rs), against any vhost-user-blk backend (the card,
//! qemu-storage-daemon, ...), plus control-socket helpers and an XTS throughput probe.
//!
//! blkbench run SOCKET WORKLOAD QD SECONDS        WORKLOAD: randread4k|randwrite4k|seqread1m|seqwrite1m
//! blkbench attach CONTROL VOLUME plain|ephemeral SECTOR
//! blkbench detach CONTROL
//! blkbench xts SECONDS

#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

#[path = "../tests/common/frontend.rs"]
mod frontend;

use bulkhead_blockcard::control::{self, AttachSpec, ControlRequest, KeySource, VolumeId};
use bulkhead_blockcard::xts::{CryptoSectorSize, XtsCipher};
use frontend::*;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn run(socket: &str, workload: &str, qd: u16, seconds: u64) {
    let (bs, write, random) = match workload {
        "randread4k" => (4096u32, false, true),
        "randwrite4k" => (4096, true, true),
        "seqread1m" => (1 << 20, false, false),
        "seqwrite1m" => (1 << 20, true, false),
        other => panic!("unknown workload {other}"),
    };
    assert!((1..=SLOTS).contains(&qd));
    let mut h = Harness::connect(std::path::Path::new(socket), 1);
    let cap_bytes = h.capacity() * 512;
    let blocks = cap_bytes / u64::from(bs);
    let fill: Vec<u8> = (0..bs).map(|i| (i * 7) as u8).collect();
    for slot in 0..qd {
        let (_, _, d) = h.slot_addrs(0, slot);
        h.mem.write_slice(&fill, GuestAddress(d)).unwrap();
    }
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut seq = 0u64;
    let mut next_off = |seed: &mut u64| -> u64 {
        if random {
            (xorshift(seed) % blocks) * u64::from(bs)
        } else {
            let o = (seq % blocks) * u64::from(bs);
            seq += 1;
            o
        }
    };
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let mut started = vec![Instant::now(); usize::from(qd)];
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let begin = Instant::now();
    for slot in 0..qd {
        let off = next_off(&mut seed);
        started[usize::from(slot)] = Instant::now();
        h.prepare(0, slot, kind, off / 512, bs, !write);
    }
    h.kick(0);
    let deadline = begin + Duration::from_secs(seconds);
    let mut done = 0u64;
    let mut inflight = u32::from(qd);
    while inflight > 0 {
        let comps = h.wait_used(0, Duration::from_secs(30));
        let now = Instant::now();
        let mut resubmitted = false;
        for c in comps {
            let slot = c.head / 3;
            assert_eq!(h.status_of(0, slot), 0, "I/O error");
            lat.push(now.duration_since(started[usize::from(slot)]).as_micros() as u32);
            done += 1;
            inflight -= 1;
            if now < deadline {
                let off = next_off(&mut seed);
                started[usize::from(slot)] = Instant::now();
                h.prepare(0, slot, kind, off / 512, bs, !write);
                inflight += 1;
                resubmitted = true;
            }
        }
        if resubmitted {
            h.kick(0);
        }
    }
    let secs = begin.elapsed().as_secs_f64();
    lat.sort_unstable();
    let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(0);
    let iops = done as f64 / secs;
    let mbps = iops * f64::from(bs) / 1e6;
    println!("{{\"workload\":\"{workload}\",\"qd\":{qd},\"iops\":{iops:.0},\"mbps\":{mbps:.1},\"p99_us\":{p99}}}");
}

fn xts(seconds: u64) {
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) ^ 0x5c;
    }
    let mut x = XtsCipher::new(&key, CryptoSectorSize::S4096).unwrap();
    let mut buf = vec![0u8; 16384];
    let begin = Instant::now();
    let mut bytes = 0u64;
    let mut s = 0u64;
    while begin.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..256 {
            x.encrypt(&mut buf, s).unwrap();
            s += 4;
            bytes += 16384;
        }
    }
    let gbps = bytes as f64 / begin.elapsed().as_secs_f64() / 1e9;
    println!("{{\"xts_encrypt_gbps\":{gbps:.3}}}");
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("run") => run(&a[2], &a[3], a[4].parse().unwrap(), a[5].parse().unwrap()),
        Some("attach") => {
            let mut s = std::os::unix::net::UnixStream::connect(&a[2]).unwrap();
            let key = match a[4].as_str() {
                "plain" => KeySource::Plain,
                "ephemeral" => KeySource::Ephemeral,
                other => panic!("key {other}"),
            };
            let sector = if a[5] == "512" {
                CryptoSectorSize::S512
            } else {
                CryptoSectorSize::S4096
            };
            let r = control::call(
                &mut s,
                &ControlRequest::Attach(AttachSpec {
                    volume_id: VolumeId::new(&a[3]).unwrap(),
                    sector_size: sector,
                    key,
                }),
            )
            .unwrap();
            println!("{r:?}");
        }
        Some("detach") => {
            let mut s = std::os::unix::net::UnixStream::connect(&a[2]).unwrap();
            println!(
                "{:?}",
                control::call(&mut s, &ControlRequest::Detach).unwrap()
            );
        }
        Some("xts") => xts(a[2].parse().unwrap()),
        _ => {
            eprintln!("usage: see the header of examples/blkbench.rs");
            std::process::exit(2);
        }
    }
}
