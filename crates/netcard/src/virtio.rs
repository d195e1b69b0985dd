//! The virtio-net descriptor-chain parser of the vhost-user backend: the guest-controlled bytes
//! of the TX and RX queues, checked here before anything else sees them.
//!
//! With `VIRTIO_F_VERSION_1` every frame is preceded by a 12-byte `virtio_net_hdr` (flags,
//! gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers). The card offers no
//! checksum or segmentation offloads, so a TX header must have `flags == 0` and
//! `gso_type == GSO_NONE`; the rest is ignored. RX frames get a zeroed header with
//! `num_buffers = 1`.
//!
//! A chain is only a list of (guest address, length, device-writable) triples: every read and
//! write goes through `vm-memory`'s bounds-checked accessors, lengths are summed with checked
//! arithmetic and bounded before any copy, and every failure is a [`ChainError`] value (the
//! backend counts it and still returns the descriptor to the used ring).

use vm_memory::{Bytes, GuestAddress};

/// `sizeof(struct virtio_net_hdr_v1)`.
pub const NET_HDR_LEN: usize = 12;
/// Most descriptors in one chain the card accepts (Linux uses 2 for a TX frame; a chain can
/// never be longer than the queue anyway).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// One descriptor of a chain, as the backend hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write_only: bool,
}

impl From<virtio_queue::desc::split::Descriptor> for Desc {
    fn from(d: virtio_queue::desc::split::Descriptor) -> Self {
        Desc {
            addr: d.addr().0,
            len: d.len(),
            write_only: d.is_write_only(),
        }
    }
}

/// Why a chain was refused (each one a counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a TX chain holds a device-writable descriptor")]
    WritableInTx,
    #[error("an RX chain holds a device-readable descriptor")]
    ReadableInRx,
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("shorter than the 12-byte virtio_net_hdr")]
    ShortHeader,
    #[error("frame larger than the interface allows")]
    Oversized,
    #[error("a descriptor points outside guest memory")]
    OutOfBounds,
    #[error("virtio_net_hdr asks for an offload the card did not offer")]
    BadHeader,
    #[error("RX buffers too small for the frame")]
    BufferTooSmall,
}

/// Gathers one TX chain: checks the header and copies the frame (without the header) into
/// `out`. `max_frame` bounds the frame; nothing is copied from a chain that is too long.
pub fn read_tx<M: Bytes<GuestAddress>>(
    descs: impl IntoIterator<Item = Desc>,
    mem: &M,
    max_frame: usize,
    out: &mut Vec<u8>,
) -> Result<(), ChainError> {
    out.clear();
    let limit = NET_HDR_LEN.saturating_add(max_frame);
    let mut hdr = [0u8; NET_HDR_LEN];
    let mut total = 0usize;
    for (i, d) in descs.into_iter().enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if d.write_only {
            return Err(ChainError::WritableInTx);
        }
        let len = usize::try_from(d.len).map_err(|_| ChainError::Oversized)?;
        let end = total.checked_add(len).ok_or(ChainError::Oversized)?;
        if end > limit {
            return Err(ChainError::Oversized);
        }
        // The part of this descriptor that is still header.
        let in_hdr = NET_HDR_LEN.saturating_sub(total).min(len);
        if in_hdr > 0 {
            let dst = hdr
                .get_mut(total..total + in_hdr)
                .ok_or(ChainError::ShortHeader)?;
            mem.read_slice(dst, GuestAddress(d.addr))
                .map_err(|_| ChainError::OutOfBounds)?;
        }
        let rest = len - in_hdr;
        if rest > 0 {
            let at = d
                .addr
                .checked_add(in_hdr as u64)
                .ok_or(ChainError::OutOfBounds)?;
            let start = out.len();
            out.resize(start + rest, 0);
            let dst = out.get_mut(start..).ok_or(ChainError::Oversized)?;
            mem.read_slice(dst, GuestAddress(at))
                .map_err(|_| ChainError::OutOfBounds)?;
        }
        total = end;
    }
    if total < NET_HDR_LEN {
        return Err(ChainError::ShortHeader);
    }
    // flags (byte 0) and gso_type (byte 1): no offloads were negotiated.
    if hdr[0] != 0 || hdr[1] != 0 {
        return Err(ChainError::BadHeader);
    }
    Ok(())
}

/// Writes `frame` behind a zeroed header (`num_buffers = 1`) into one RX chain. Returns the
/// bytes written (the used length). Nothing is written unless every descriptor is
/// device-writable and together they hold the header and the whole frame.
pub fn write_rx<M: Bytes<GuestAddress>>(
    descs: impl IntoIterator<Item = Desc>,
    mem: &M,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let need = NET_HDR_LEN
        .checked_add(frame.len())
        .ok_or(ChainError::Oversized)?;
    let used = u32::try_from(need).map_err(|_| ChainError::Oversized)?;
    let mut bufs = [Desc {
        addr: 0,
        len: 0,
        write_only: true,
    }; MAX_CHAIN_DESCRIPTORS];
    let mut n = 0usize;
    let mut room = 0usize;
    for d in descs {
        let slot = bufs.get_mut(n).ok_or(ChainError::TooManyDescriptors)?;
        if !d.write_only {
            return Err(ChainError::ReadableInRx);
        }
        *slot = d;
        n += 1;
        room = room.saturating_add(usize::try_from(d.len).unwrap_or(usize::MAX));
    }
    if room < need {
        return Err(ChainError::BufferTooSmall);
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10] = 1; // num_buffers, little-endian u16
    let mut done = 0usize;
    for d in bufs.get(..n).unwrap_or_default() {
        if done >= need {
            break;
        }
        let take = (need - done).min(usize::try_from(d.len).unwrap_or(usize::MAX));
        let mut off = 0usize;
        // Header bytes first, then frame bytes, split across descriptors as they come.
        while off < take {
            let pos = done + off;
            let (src, max) = if pos < NET_HDR_LEN {
                (hdr.get(pos..).unwrap_or_default(), NET_HDR_LEN - pos)
            } else {
                let f = pos - NET_HDR_LEN;
                (frame.get(f..).unwrap_or_default(), frame.len() - f)
            };
            let k = max.min(take - off);
            let src = src.get(..k).ok_or(ChainError::Oversized)?;
            let at = d
                .addr
                .checked_add(off as u64)
                .ok_or(ChainError::OutOfBounds)?;
            mem.write_slice(src, GuestAddress(at))
                .map_err(|_| ChainError::OutOfBounds)?;
            off += k;
        }
        done += take;
    }
    Ok(used)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const BASE: u64 = 0x1000;
    const SIZE: usize = 0x10000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), SIZE)]).expect("mem")
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write_only: false,
        }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write_only: true,
        }
    }

    #[test]
    fn tx_header_split_anywhere_and_frame_gathered() {
        let m = mem();
        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend((0..100u8).collect::<Vec<_>>());
        m.write_slice(&pkt, GuestAddress(BASE)).expect("write");
        let mut out = Vec::new();
        for split in 0..pkt.len() {
            let s = split as u32;
            read_tx(
                [r(BASE, s), r(BASE + u64::from(s), pkt.len() as u32 - s)],
                &m,
                1500,
                &mut out,
            )
            .expect("valid");
            assert_eq!(out, pkt[NET_HDR_LEN..], "split at {split}");
        }
    }

    #[test]
    fn tx_adversarial_chains_refused() {
        let m = mem();
        let mut out = Vec::new();
        let end = BASE + SIZE as u64;
        let cases: Vec<(Vec<Desc>, ChainError)> = vec![
            (vec![], ChainError::ShortHeader),
            (vec![r(BASE, 11)], ChainError::ShortHeader),
            (vec![r(BASE, 4), r(BASE, 4)], ChainError::ShortHeader),
            (vec![w(BASE, 64)], ChainError::WritableInTx),
            (vec![r(BASE, 12), w(BASE, 64)], ChainError::WritableInTx),
            (vec![r(0, 64)], ChainError::OutOfBounds),
            (vec![r(end - 8, 64)], ChainError::OutOfBounds),
            (vec![r(BASE, 12), r(end - 8, 64)], ChainError::OutOfBounds),
            (vec![r(u64::MAX - 4, 64)], ChainError::OutOfBounds),
            (vec![r(BASE, 12), r(u64::MAX, 1)], ChainError::OutOfBounds),
            (vec![r(BASE, u32::MAX)], ChainError::Oversized),
            (vec![r(BASE, 12 + 1515)], ChainError::Oversized),
            (vec![r(BASE, 1000), r(BASE, 1000)], ChainError::Oversized),
            (vec![r(BASE, 0); 65], ChainError::TooManyDescriptors),
        ];
        for (chain, want) in cases {
            assert_eq!(
                read_tx(chain.iter().copied(), &m, 1514, &mut out),
                Err(want),
                "{chain:?}"
            );
        }
        // Offloads that were not offered.
        m.write_slice(&[1u8, 0], GuestAddress(BASE)).expect("w");
        assert_eq!(
            read_tx([r(BASE, 40)], &m, 1514, &mut out),
            Err(ChainError::BadHeader)
        );
        m.write_slice(&[0u8, 4], GuestAddress(BASE)).expect("w");
        assert_eq!(
            read_tx([r(BASE, 40)], &m, 1514, &mut out),
            Err(ChainError::BadHeader)
        );
        m.write_slice(&[0u8, 0], GuestAddress(BASE)).expect("w");
        read_tx([r(BASE, 12 + 1514)], &m, 1514, &mut out).expect("max frame");
        assert_eq!(out.len(), 1514);
    }

    /// Chains as a guest driver puts them in a real split queue (virtio-queue's mock), walked
    /// by virtio-queue's iterator as the backend does: loops, indirect tables outside memory,
    /// heads beyond the queue and chains too long all end in a refusal, never a panic.
    #[test]
    fn chains_from_a_split_queue() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::{Queue, QueueOwnedT};
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let m: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("mem");
        let data = 0x10_0000u64;
        m.write_slice(&[0u8; 12], GuestAddress(data)).expect("hdr");
        let run = |table: &[(u16, u64, u32, u16, u16)], head: u16| {
            let vq = MockSplitQueue::new(&m, 256);
            for (i, addr, len, flags, next) in table {
                vq.desc_table()
                    .store(
                        *i,
                        RawDescriptor::from(SplitDescriptor::new(*addr, *len, *flags, *next)),
                    )
                    .expect("desc");
            }
            vq.avail()
                .ring()
                .ref_at(0)
                .expect("slot")
                .store(head.to_le());
            vq.avail().idx().store(1u16.to_le());
            let mut q: Queue = vq.create_queue().expect("queue");
            let chain = q.iter(&m).expect("iter").next().expect("a chain");
            let mut out = Vec::new();
            read_tx(chain.map(Desc::from), &m, 1514, &mut out).map(|()| out.len())
        };
        // Header and frame in two descriptors: fine.
        assert_eq!(
            run(&[(0, data, 12, NEXT, 1), (1, data + 12, 100, 0, 0)], 0),
            Ok(100)
        );
        // The same through an indirect table.
        let table = data + 0x1000;
        for (k, (addr, len, flags, next)) in [(data, 12u32, NEXT, 1u16), (data + 12, 60, 0, 0)]
            .into_iter()
            .enumerate()
        {
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            m.write_obj(raw, GuestAddress(table + 16 * k as u64))
                .expect("indirect");
        }
        assert_eq!(run(&[(0, table, 32, INDIRECT, 0)], 0), Ok(60));
        // A loop of zero-length descriptors.
        assert!(run(&[(0, data, 0, NEXT, 0)], 0).is_err());
        assert!(run(&[(0, data, 12, NEXT, 1), (1, data, 0, NEXT, 0)], 0).is_err());
        // Indirect table outside memory, or of a length that is no multiple of 16.
        assert!(run(&[(0, 0x4000_0000, 32, INDIRECT, 0)], 0).is_err());
        assert!(run(&[(0, table, 17, INDIRECT, 0)], 0).is_err());
        // Next index beyond the queue: the chain ends there (header only → refused).
        assert_eq!(
            run(&[(0, data, 8, NEXT, 999)], 0),
            Err(ChainError::ShortHeader)
        );
        // Head beyond the queue.
        assert_eq!(run(&[], 300), Err(ChainError::ShortHeader));
        // Device-writable descriptor in TX.
        assert_eq!(
            run(&[(0, data, 12, NEXT, 1), (1, data, 60, WRITE, 0)], 0),
            Err(ChainError::WritableInTx)
        );
        // 65 linked descriptors.
        let long: Vec<_> = (0..65u16).map(|i| (i, data, 1, NEXT, i + 1)).collect();
        assert_eq!(run(&long, 0), Err(ChainError::TooManyDescriptors));
    }

    #[test]
    fn rx_written_behind_header_or_refused() {
        let m = mem();
        let frame: Vec<u8> = (0..60u8).collect();
        let n = write_rx([w(BASE, 5), w(BASE + 100, 200)], &m, &frame).expect("fits");
        assert_eq!(n, 72);
        let mut got = [0u8; 72];
        m.read_slice(&mut got[..5], GuestAddress(BASE)).expect("r");
        m.read_slice(&mut got[5..], GuestAddress(BASE + 100))
            .expect("r");
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], &frame[..]);
        let end = BASE + SIZE as u64;
        assert_eq!(
            write_rx([w(BASE, 71)], &m, &frame),
            Err(ChainError::BufferTooSmall)
        );
        assert_eq!(
            write_rx([r(BASE, 100)], &m, &frame),
            Err(ChainError::ReadableInRx)
        );
        assert_eq!(
            write_rx([w(end - 10, 100)], &m, &frame),
            Err(ChainError::OutOfBounds)
        );
        assert_eq!(
            write_rx([w(u64::MAX - 1, 100)], &m, &frame),
            Err(ChainError::OutOfBounds)
        );
        assert_eq!(
            write_rx(vec![w(BASE, 1); 65], &m, &frame),
            Err(ChainError::TooManyDescriptors)
        );
        assert_eq!(
            write_rx([w(BASE, u32::MAX), w(BASE, u32::MAX)], &m, &frame),
            Ok(72)
        );
    }
}
