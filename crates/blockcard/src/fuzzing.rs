//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and by the randomized
//! smoke tests below, which run on stable in the normal test suite. They must never panic.

use crate::control::{ControlRequest, ControlResponse};
use crate::request::{BlkOp, BlkRequest, DiskLimits, SectorCount, MAX_REQUEST_BYTES};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory size used by [`request_parse`].
pub const FUZZ_MEM: usize = 64 << 10;

/// Walks a descriptor table like virtio-queue does (follow `next`, at most `table.len()` steps,
/// stop at an index outside the table).
struct TableChain<'a> {
    table: &'a [Descriptor],
    next: Option<u16>,
    ttl: usize,
}

impl Iterator for TableChain<'_> {
    type Item = Descriptor;
    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 {
            return None;
        }
        let idx = self.next?;
        let d = *self.table.get(usize::from(idx))?;
        self.ttl -= 1;
        self.next = if d.has_next() { Some(d.next()) } else { None };
        Some(d)
    }
}

/// Input: `u16 LE` table length k (capped at 256), k x 16-byte split descriptors, then bytes
/// copied to guest address 0 of a [`FUZZ_MEM`]-byte guest memory. The chain starts at index 0.
pub fn request_parse(data: &[u8]) {
    let Some((k, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let k = usize::from(u16::from_le_bytes(*k)).min(256);
    let mut table = Vec::with_capacity(k);
    let mut rest = rest;
    for _ in 0..k {
        let Some((raw, tail)) = rest.split_first_chunk::<16>() else {
            break;
        };
        rest = tail;
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        table.push(Descriptor::new(addr, len, flags, next));
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM)]) else {
        return;
    };
    let n = rest.len().min(FUZZ_MEM);
    if let Some(src) = rest.get(..n) {
        let _ = vm_memory::Bytes::write_slice(&mem, src, GuestAddress(0));
    }
    let disk = DiskLimits {
        capacity: SectorCount(4096),
        align: 1,
        read_only: false,
    };
    let ttl = table.len();
    let chain = TableChain {
        table: &table,
        next: Some(0),
        ttl,
    };
    if let Ok(req) = BlkRequest::parse(chain, &mem, &disk) {
        // Invariants of an accepted request.
        assert!(GuestMemoryBackend::check_range(&mem, req.status, 1));
        match &req.op {
            BlkOp::Read { start, len, bufs } | BlkOp::Write { start, len, bufs } => {
                assert!(start
                    .0
                    .checked_add(len.0)
                    .is_some_and(|e| e <= disk.capacity.0));
                let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                assert!(total <= MAX_REQUEST_BYTES);
                assert_eq!(Some(total), len.bytes());
                for b in bufs {
                    let l = usize::try_from(b.len).unwrap_or(usize::MAX);
                    assert!(GuestMemoryBackend::check_range(&mem, b.addr, l));
                }
            }
            BlkOp::Discard { extents } | BlkOp::WriteZeroes { extents } => {
                for e in extents {
                    assert!(e
                        .start
                        .0
                        .checked_add(e.len.0)
                        .is_some_and(|x| x <= disk.capacity.0));
                }
            }
            BlkOp::Flush | BlkOp::GetId { .. } => {}
        }
    }
}

/// Control frames: both directions; a parsed message must re-encode to the same bytes.
pub fn control_parse(data: &[u8]) {
    if let Ok(req) = ControlRequest::parse(data) {
        assert_eq!(req.encode(), data);
    }
    if let Ok(resp) = ControlResponse::parse(data) {
        assert_eq!(resp.encode(), data);
    }
    let _ = crate::control::read_frame(&mut &data[..]);
}

/// Card-update hand-over bodies (`crate::handover`): a parsed state or reply re-encodes to
/// the same bytes; the frame reader never panics.
pub fn handover_parse(data: &[u8]) {
    if let Ok(st) = crate::handover::VolumeState::parse(data) {
        assert_eq!(&st.encode()[..], data);
    }
    if let Ok(r) = crate::handover::Reply::parse(data) {
        assert_eq!(r.encode(), data);
    }
    let _ = crate::handover::read_frame(&mut &data[..]);
}

/// Sealed blobs against a fixed host key: never panics, never opens a random blob.
pub fn sealed_blob_open(data: &[u8]) {
    use std::sync::OnceLock;
    static HOST: OnceLock<Option<bulkhead_sealing::HostKey>> = OnceLock::new();
    let Some(host) = HOST.get_or_init(|| bulkhead_sealing::HostKey::generate().ok()) else {
        return;
    };
    assert!(bulkhead_sealing::open_volume_key(host, "fuzz", data).is_err());
}

/// The NBD reply stream as the connection thread sees it. Input: one byte `n`, then `n % 8`
/// in-flight requests of 5 bytes each (cookie: u8, kind: u8 — even = read, odd = other —,
/// read length in 512-byte sectors: u8, two unused bytes), then the server's bytes, fed in
/// chunks whose sizes come from the data itself. Checks that a completed read carries exactly
/// its length and that every completed cookie was in flight, once.
pub fn nbd_replies(data: &[u8]) {
    use crate::nbd::replies::ReplyStream;
    use std::collections::BTreeMap;
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    let Some(table) = rest.get(..n * 5) else {
        return;
    };
    let mut stream_bytes = rest.get(n * 5..).unwrap_or(&[]);
    let mut inflight: BTreeMap<u64, usize> = BTreeMap::new();
    for e in table.chunks(5) {
        if let [cookie, kind, sectors, ..] = e {
            let len = if kind % 2 == 0 {
                usize::from(*sectors) * 512
            } else {
                0
            };
            inflight.insert(u64::from(*cookie), len);
        }
    }
    let mut s = ReplyStream::default();
    while let Some((&step, tail)) = stream_bytes.split_first() {
        let take = usize::from(step).max(1).min(tail.len());
        let (chunk, after) = tail.split_at(take);
        stream_bytes = after;
        if s.push(chunk).is_err() {
            return;
        }
        loop {
            let snapshot = inflight.clone();
            match s.next(|c| snapshot.get(&c.0).copied()) {
                Ok(Some(r)) => {
                    let want = inflight.remove(&r.cookie.0).expect("cookie was in flight");
                    if let Ok(d) = &r.result {
                        assert_eq!(d.len(), want, "payload length");
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny xorshift so the smoke tests need no RNG dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        b
    }

    /// A valid read request image, used as a seed and mutated below.
    fn seed() -> Vec<u8> {
        let mut v = 3u16.to_le_bytes().to_vec();
        v.extend(desc(0x1000, 16, 1, 1));
        v.extend(desc(0x2000, 4096, 3, 2));
        v.extend(desc(0x1100, 1, 2, 0));
        v.resize(2 + 48 + 0x1010, 0);
        v
    }

    #[test]
    fn request_parse_smoke() {
        let base = seed();
        request_parse(&base);
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..3000 {
            let mut v = base.clone();
            let flips = rng(&mut s) % 8 + 1;
            for _ in 0..flips {
                let i = usize::try_from(rng(&mut s) % 50).unwrap_or(0);
                if let Some(b) = v.get_mut(i) {
                    *b = u8::try_from(rng(&mut s) & 0xff).unwrap_or(0);
                }
            }
            request_parse(&v);
        }
    }

    #[test]
    fn nbd_replies_smoke() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/seeds/nbd_replies/two_replies"
        ))
        .expect("seed");
        nbd_replies(&seed);
        let mut s = 0x0bad_5eed_1234_4321u64;
        for _ in 0..3000 {
            let mut v = seed.clone();
            let flips = rng(&mut s) % 6 + 1;
            for _ in 0..flips {
                let i = usize::try_from(rng(&mut s) % (v.len() as u64)).unwrap_or(0);
                if let Some(b) = v.get_mut(i) {
                    *b = u8::try_from(rng(&mut s) & 0xff).unwrap_or(0);
                }
            }
            nbd_replies(&v);
        }
    }

    #[test]
    fn handover_parse_smoke() {
        let mut s = 0x0bad_cafe_1234_5678u64;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/handover_parse");
        let mut seeds = 0;
        for e in std::fs::read_dir(dir).expect("seeds") {
            let seed = std::fs::read(e.expect("entry").path()).expect("seed");
            seeds += 1;
            handover_parse(&seed);
            for _ in 0..2000 {
                let mut v = seed.clone();
                let i = usize::try_from(rng(&mut s) % 96).unwrap_or(0);
                if i < v.len() {
                    v[i] = u8::try_from(rng(&mut s) & 0xff).unwrap_or(0);
                } else {
                    v.push(u8::try_from(rng(&mut s) & 0xff).unwrap_or(0));
                }
                handover_parse(&v);
            }
        }
        assert_eq!(seeds, 4);
    }

    #[test]
    fn control_parse_smoke() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let seeds: Vec<Vec<u8>> = vec![
            ControlRequest::Detach.encode(),
            ControlRequest::GetMetrics.encode(),
            ControlResponse::Attached {
                capacity_sectors: 8,
                encrypted: true,
            }
            .encode(),
            vec![1, 1, 3, b'v', b'o', b'l', 12, 1],
        ];
        // The fuzz seeds: each one a whole valid message (request or response), each kind the
        // card update added among them.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/control_parse");
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).expect("seeds") {
            let seed = std::fs::read(e.expect("entry").path()).expect("seed");
            assert!(
                ControlRequest::parse(&seed).is_ok() || ControlResponse::parse(&seed).is_ok(),
                "seed {seed:02x?} is not a message"
            );
            files.push(seed);
        }
        for want in [
            ControlRequest::CancelHandOver.encode(),
            ControlResponse::HandOverCancelled.encode(),
        ] {
            assert!(files.contains(&want), "no seed {want:02x?}");
        }
        let seeds: Vec<Vec<u8>> = seeds.into_iter().chain(files).collect();
        for seed in &seeds {
            control_parse(seed);
            for _ in 0..2000 {
                let mut v = seed.clone();
                let i = usize::try_from(rng(&mut s) % 10).unwrap_or(0);
                if i < v.len() {
                    v[i] = u8::try_from(rng(&mut s) & 0xff).unwrap_or(0);
                } else {
                    v.push(u8::try_from(rng(&mut s) & 0xff).unwrap_or(0));
                }
                control_parse(&v);
            }
        }
        sealed_blob_open(&[0u8; 126]);
    }
}
