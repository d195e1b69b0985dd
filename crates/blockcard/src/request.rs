//! The one parser between a guest's virtio-blk descriptor chain and the card's I/O code.
//!
//! [`BlkRequest::parse`] walks a descriptor chain over guest memory and either returns a checked
//! request (every buffer inside guest memory, right direction, sector range inside the volume and
//! aligned to the crypto sector, size bounded) or a [`Rejected`] carrying the reason and, when
//! the chain had a usable status byte, where to write the error status.
//!
//! Layout accepted (what Linux, QEMU's and Firecracker's drivers send): one device-readable header
//! descriptor (16 bytes), zero or more data descriptors, one device-writable status descriptor.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// virtio-blk request types (virtio 1.2, 5.2.6).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// virtio-blk status values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Bytes of the request header.
pub const HEADER_LEN: u32 = 16;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = 20;
/// Bytes of one discard / write-zeroes segment.
pub const SEGMENT_LEN: u32 = 16;
/// Longest accepted chain: header + [`MAX_DATA_SEGMENTS`] + status.
pub const MAX_DESCRIPTORS: usize = MAX_DATA_SEGMENTS + 2;
/// Most data descriptors in one request (advertised as `seg_max`).
pub const MAX_DATA_SEGMENTS: usize = 128;
/// Largest single data descriptor (advertised as `size_max`).
pub const MAX_SEGMENT_BYTES: u32 = 1 << 20;
/// Largest read/write request in bytes.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Most segments in a discard / write-zeroes request (advertised).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest discard / write-zeroes segment, in 512-byte sectors (advertised).
pub const MAX_DISCARD_SECTORS: u32 = (64 << 20) / 512;

/// A position on the volume in 512-byte virtio sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sector(pub u64);

/// A length in 512-byte virtio sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SectorCount(pub u64);

impl SectorCount {
    /// Length in bytes.
    pub fn bytes(self) -> Option<u64> {
        self.0.checked_mul(512)
    }
}

/// What the parser needs to know about the volume.
#[derive(Clone, Copy, Debug)]
pub struct DiskLimits {
    /// Volume size in 512-byte sectors.
    pub capacity: SectorCount,
    /// Alignment (in 512-byte sectors) of every request: the crypto sector size / 512.
    pub align: u64,
    /// Read-only volume: writes, discards and write-zeroes are refused.
    pub read_only: bool,
}

/// One guest buffer, inside guest memory (checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A discard / write-zeroes range (checked against the volume).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: Sector,
    pub len: SectorCount,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    pub unmap: bool,
}

/// The operation, with its checked operands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Read `len` sectors at `start` into the guest buffers.
    Read {
        start: Sector,
        len: SectorCount,
        bufs: Vec<GuestBuf>,
    },
    /// Write the guest buffers to `len` sectors at `start`.
    Write {
        start: Sector,
        len: SectorCount,
        bufs: Vec<GuestBuf>,
    },
    /// Make every completed write durable.
    Flush,
    /// Write the device id (up to 20 bytes) into `buf`.
    GetId { buf: GuestBuf },
    /// Discard ranges.
    Discard { extents: Vec<Extent> },
    /// Zero ranges.
    WriteZeroes { extents: Vec<Extent> },
}

/// A checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    pub op: BlkOp,
    /// Where to write the one-byte status.
    pub status: GuestAddress,
}

/// Why a chain was rejected. Each variant has its own metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlkParseError {
    #[error(
        "descriptor chain has more than {MAX_DESCRIPTORS} descriptors, loops, or is cut short"
    )]
    ChainTooLong,
    #[error("descriptor chain has {0} descriptors; a request needs a header and a status")]
    ChainTooShort(usize),
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    #[error("a descriptor has the wrong direction (readable/writable) for its role")]
    WrongDirection,
    #[error("header has {got} bytes, want {HEADER_LEN}")]
    ShortHeader { got: u32 },
    #[error("status descriptor is empty")]
    EmptyStatus,
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("request runs past the end of the volume")]
    PastEnd,
    #[error("request is larger than allowed")]
    TooLarge,
    #[error("request is not aligned to the crypto sector size")]
    Unaligned,
    #[error("guest buffers overlap each other")]
    Overlap,
    #[error("data descriptors don't fit the request type")]
    BadData,
    #[error("write to a read-only volume")]
    ReadOnly,
}

/// A rejected chain: the reason, and the status byte to report it in, if the chain had one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub error: BlkParseError,
    pub status: Option<GuestAddress>,
}

impl Rejected {
    /// The virtio status to report.
    pub fn status_code(&self) -> u8 {
        match self.error {
            BlkParseError::UnknownType(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain-old-data of two u32 and one u64 with no padding; every bit pattern is valid.
unsafe impl vm_memory::ByteValued for RawHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: as for RawHeader: u64 + two u32, no padding, any bit pattern valid.
unsafe impl vm_memory::ByteValued for RawSegment {}

fn in_memory<M: GuestMemory>(mem: &M, d: &Descriptor) -> bool {
    match usize::try_from(d.len()) {
        Ok(len) => mem.check_range(
            d.addr(),
            len,
            if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            },
        ),
        Err(_) => false,
    }
}

impl BlkRequest {
    /// Parses and checks one request. `chain` yields the descriptors of one chain in order
    /// (virtio-queue's `DescriptorChain` already stops after `queue size` descriptors and at an
    /// unreadable table; a chain still flagged `NEXT` at its end is treated as too long).
    pub fn parse<M: GuestMemory>(
        chain: impl Iterator<Item = Descriptor>,
        mem: &M,
        disk: &DiskLimits,
    ) -> Result<Self, Rejected> {
        let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
        for d in chain {
            if descs.len() >= MAX_DESCRIPTORS {
                return Err(Rejected {
                    error: BlkParseError::ChainTooLong,
                    status: None,
                });
            }
            descs.push(d);
        }
        let reject = |error| Rejected {
            error,
            status: None,
        };
        let Some((status_desc, rest)) = descs.split_last() else {
            return Err(reject(BlkParseError::ChainTooShort(0)));
        };
        if status_desc.has_next() {
            return Err(reject(BlkParseError::ChainTooLong));
        }
        let Some((header_desc, data)) = rest.split_first() else {
            return Err(reject(BlkParseError::ChainTooShort(descs.len())));
        };
        if !status_desc.is_write_only() {
            return Err(reject(BlkParseError::WrongDirection));
        }
        if status_desc.len() < 1 {
            return Err(reject(BlkParseError::EmptyStatus));
        }
        if !mem.check_range(status_desc.addr(), 1, Permissions::Write) {
            return Err(reject(BlkParseError::OutsideMemory));
        }
        let status_addr = status_desc.addr();
        let fail = |error| Rejected {
            error,
            status: Some(status_addr),
        };

        if header_desc.is_write_only() {
            return Err(fail(BlkParseError::WrongDirection));
        }
        if header_desc.len() < HEADER_LEN {
            return Err(fail(BlkParseError::ShortHeader {
                got: header_desc.len(),
            }));
        }
        let header: RawHeader = mem
            .read_obj(header_desc.addr())
            .map_err(|_| fail(BlkParseError::OutsideMemory))?;
        let kind = u32::from_le(header.kind);
        let start = Sector(u64::from_le(header.sector));

        // Every data buffer: inside memory, non-empty, bounded.
        let mut total: u64 = 0;
        for d in data {
            if d.len() == 0 {
                return Err(fail(BlkParseError::BadData));
            }
            if !in_memory(mem, d) {
                return Err(fail(BlkParseError::OutsideMemory));
            }
            if d.len() > MAX_SEGMENT_BYTES {
                return Err(fail(BlkParseError::TooLarge));
            }
            total = total
                .checked_add(u64::from(d.len()))
                .ok_or(fail(BlkParseError::TooLarge))?;
        }
        if data.len() > MAX_DATA_SEGMENTS {
            return Err(fail(BlkParseError::ChainTooLong));
        }
        let bufs: Vec<GuestBuf> = data
            .iter()
            .map(|d| GuestBuf {
                addr: d.addr(),
                len: d.len(),
            })
            .collect();
        check_overlap(&bufs, status_addr).map_err(fail)?;

        let want_dir = |writable: bool| -> Result<(), Rejected> {
            if data.iter().all(|d| d.is_write_only() == writable) {
                Ok(())
            } else {
                Err(fail(BlkParseError::WrongDirection))
            }
        };

        let op = match kind {
            req_type::IN | req_type::OUT => {
                let writing = kind == req_type::OUT;
                want_dir(!writing)?;
                if writing && disk.read_only {
                    return Err(fail(BlkParseError::ReadOnly));
                }
                if data.is_empty() {
                    return Err(fail(BlkParseError::BadData));
                }
                if total > MAX_REQUEST_BYTES {
                    return Err(fail(BlkParseError::TooLarge));
                }
                let align_bytes = disk
                    .align
                    .checked_mul(512)
                    .ok_or(fail(BlkParseError::Unaligned))?;
                if align_bytes == 0
                    || !total.is_multiple_of(align_bytes)
                    || !start.0.is_multiple_of(disk.align)
                {
                    return Err(fail(BlkParseError::Unaligned));
                }
                let len = SectorCount(total / 512);
                check_range(start, len, disk).map_err(fail)?;
                if writing {
                    BlkOp::Write { start, len, bufs }
                } else {
                    BlkOp::Read { start, len, bufs }
                }
            }
            req_type::FLUSH => {
                if !data.is_empty() {
                    return Err(fail(BlkParseError::BadData));
                }
                BlkOp::Flush
            }
            req_type::GET_ID => {
                want_dir(true)?;
                match bufs.as_slice() {
                    [buf] => BlkOp::GetId { buf: *buf },
                    _ => return Err(fail(BlkParseError::BadData)),
                }
            }
            req_type::DISCARD | req_type::WRITE_ZEROES => {
                want_dir(false)?;
                if disk.read_only {
                    return Err(fail(BlkParseError::ReadOnly));
                }
                let extents = parse_extents(mem, &bufs, disk, kind == req_type::WRITE_ZEROES)
                    .map_err(fail)?;
                if kind == req_type::DISCARD {
                    BlkOp::Discard { extents }
                } else {
                    BlkOp::WriteZeroes { extents }
                }
            }
            other => return Err(fail(BlkParseError::UnknownType(other))),
        };
        Ok(Self {
            op,
            status: status_addr,
        })
    }
}

fn check_range(start: Sector, len: SectorCount, disk: &DiskLimits) -> Result<(), BlkParseError> {
    let end = start.0.checked_add(len.0).ok_or(BlkParseError::PastEnd)?;
    if end > disk.capacity.0 {
        return Err(BlkParseError::PastEnd);
    }
    Ok(())
}

/// Buffers (and the status byte) must not overlap: a guest could otherwise make the card read
/// back its own output mid-request.
fn check_overlap(bufs: &[GuestBuf], status: GuestAddress) -> Result<(), BlkParseError> {
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(bufs.len() + 1);
    for b in bufs {
        let end = b
            .addr
            .0
            .checked_add(u64::from(b.len))
            .ok_or(BlkParseError::OutsideMemory)?;
        spans.push((b.addr.0, end));
    }
    spans.push((
        status.0,
        status
            .0
            .checked_add(1)
            .ok_or(BlkParseError::OutsideMemory)?,
    ));
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [a, b] = pair {
            if b.0 < a.1 {
                return Err(BlkParseError::Overlap);
            }
        }
    }
    Ok(())
}

fn parse_extents<M: GuestMemory>(
    mem: &M,
    bufs: &[GuestBuf],
    disk: &DiskLimits,
    zeroes: bool,
) -> Result<Vec<Extent>, BlkParseError> {
    let [buf] = bufs else {
        return Err(BlkParseError::BadData);
    };
    if !buf.len.is_multiple_of(SEGMENT_LEN) || buf.len == 0 {
        return Err(BlkParseError::BadData);
    }
    let count = buf.len / SEGMENT_LEN;
    if count > MAX_DISCARD_SEGMENTS {
        return Err(BlkParseError::TooLarge);
    }
    let mut extents =
        Vec::with_capacity(usize::try_from(count).map_err(|_| BlkParseError::TooLarge)?);
    for i in 0..count {
        let off = u64::from(i) * u64::from(SEGMENT_LEN);
        let addr = buf
            .addr
            .checked_add(off)
            .ok_or(BlkParseError::OutsideMemory)?;
        let seg: RawSegment = mem
            .read_obj(addr)
            .map_err(|_| BlkParseError::OutsideMemory)?;
        let start = Sector(u64::from_le(seg.sector));
        let num = u32::from_le(seg.num_sectors);
        let flags = u32::from_le(seg.flags);
        // Only UNMAP (bit 0) is defined, and only for write-zeroes.
        let allowed = if zeroes { 1 } else { 0 };
        if flags & !allowed != 0 {
            return Err(BlkParseError::BadData);
        }
        if num == 0 {
            return Err(BlkParseError::BadData);
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(BlkParseError::TooLarge);
        }
        let len = SectorCount(u64::from(num));
        if !start.0.is_multiple_of(disk.align) || !len.0.is_multiple_of(disk.align) {
            return Err(BlkParseError::Unaligned);
        }
        check_range(start, len, disk)?;
        extents.push(Extent {
            start,
            len,
            unmap: flags & 1 != 0,
        });
    }
    Ok(extents)
}

/// Builds descriptors from plain values (unit tests and fuzzing).
pub fn descriptor(addr: u64, len: u32, write_only: bool, next: Option<u16>) -> Descriptor {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    let mut flags = 0u16;
    if write_only {
        flags |= u16::try_from(VRING_DESC_F_WRITE).unwrap_or(0);
    }
    if next.is_some() {
        flags |= u16::try_from(VRING_DESC_F_NEXT).unwrap_or(0);
    }
    Descriptor::new(addr, len, flags, next.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: usize = 1 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem")
    }

    fn disk() -> DiskLimits {
        DiskLimits {
            capacity: SectorCount(2048),
            align: 1,
            read_only: false,
        }
    }

    fn header(m: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
        m.write_obj(
            RawHeader {
                kind: kind.to_le(),
                reserved: 0,
                sector: sector.to_le(),
            },
            GuestAddress(0x100),
        )
        .expect("hdr");
    }

    fn chain(data: &[(u64, u32, bool)]) -> Vec<Descriptor> {
        let mut v = vec![descriptor(0x100, 16, false, Some(1))];
        for (i, (a, l, w)) in data.iter().enumerate() {
            v.push(descriptor(*a, *l, *w, u16::try_from(i + 2).ok()));
        }
        v.push(descriptor(0x200, 1, true, None));
        v
    }

    fn parse(m: &GuestMemoryMmap<()>, c: Vec<Descriptor>) -> Result<BlkRequest, Rejected> {
        BlkRequest::parse(c.into_iter(), m, &disk())
    }

    #[test]
    fn read_write_flush_getid_ok() {
        let m = mem();
        header(&m, req_type::IN, 8);
        let r = parse(&m, chain(&[(0x1000, 4096, true)])).expect("read");
        assert_eq!(
            r.op,
            BlkOp::Read {
                start: Sector(8),
                len: SectorCount(8),
                bufs: vec![GuestBuf {
                    addr: GuestAddress(0x1000),
                    len: 4096
                }]
            }
        );
        assert_eq!(r.status, GuestAddress(0x200));
        header(&m, req_type::OUT, 0);
        assert!(matches!(
            parse(&m, chain(&[(0x1000, 512, false), (0x3000, 512, false)]))
                .expect("w")
                .op,
            BlkOp::Write { .. }
        ));
        header(&m, req_type::FLUSH, 0);
        assert_eq!(parse(&m, chain(&[])).expect("flush").op, BlkOp::Flush);
        header(&m, req_type::GET_ID, 0);
        assert!(matches!(
            parse(&m, chain(&[(0x1000, 20, true)])).expect("id").op,
            BlkOp::GetId { .. }
        ));
    }

    #[test]
    fn bad_chains_are_rejected_with_status() {
        let m = mem();
        let err = |c| parse(&m, c).expect_err("must reject");
        header(&m, req_type::IN, 0);
        // Wrong direction: read into a device-readable buffer.
        assert_eq!(
            err(chain(&[(0x1000, 512, false)])).error,
            BlkParseError::WrongDirection
        );
        // Outside memory.
        assert_eq!(
            err(chain(&[(MEM as u64 - 256, 512, true)])).error,
            BlkParseError::OutsideMemory
        );
        // Past end.
        header(&m, req_type::IN, 2047);
        assert_eq!(
            err(chain(&[(0x1000, 1024, true)])).error,
            BlkParseError::PastEnd
        );
        header(&m, req_type::IN, u64::MAX);
        assert_eq!(
            err(chain(&[(0x1000, 512, true)])).error,
            BlkParseError::PastEnd
        );
        // Unaligned length.
        header(&m, req_type::IN, 0);
        assert_eq!(
            err(chain(&[(0x1000, 100, true)])).error,
            BlkParseError::Unaligned
        );
        // Oversized single segment.
        assert_eq!(
            err(chain(&[(0x1000, MAX_SEGMENT_BYTES + 512, true)])).error,
            BlkParseError::OutsideMemory
        );
        // Overlap with the status byte.
        assert_eq!(
            err(chain(&[(0x0, 1024, true)])).error,
            BlkParseError::Overlap
        );
        // Unknown type -> UNSUPP.
        header(&m, 99, 0);
        let r = err(chain(&[]));
        assert_eq!(r.error, BlkParseError::UnknownType(99));
        assert_eq!(r.status_code(), status::UNSUPP);
        assert_eq!(r.status, Some(GuestAddress(0x200)));
    }

    #[test]
    fn structural_errors() {
        let m = mem();
        header(&m, req_type::IN, 0);
        // Too long.
        let mut long = vec![descriptor(0x100, 16, false, Some(1))];
        for i in 0..MAX_DESCRIPTORS {
            long.push(descriptor(0x1000 + 512 * i as u64, 512, true, Some(0)));
        }
        assert_eq!(
            parse(&m, long).expect_err("long").error,
            BlkParseError::ChainTooLong
        );
        // Loop cut short by the queue: last still has NEXT.
        let looped = vec![
            descriptor(0x100, 16, false, Some(1)),
            descriptor(0x200, 1, true, Some(0)),
        ];
        assert_eq!(
            parse(&m, looped).expect_err("loop").error,
            BlkParseError::ChainTooLong
        );
        // Status not writable: no status to report in.
        let mut c = chain(&[]);
        c[1] = descriptor(0x200, 1, false, None);
        assert_eq!(
            parse(&m, c).expect_err("dir"),
            Rejected {
                error: BlkParseError::WrongDirection,
                status: None
            }
        );
        // Only one descriptor.
        assert_eq!(
            parse(&m, vec![descriptor(0x200, 1, true, None)])
                .expect_err("short")
                .error,
            BlkParseError::ChainTooShort(1)
        );
        // Short header.
        let mut c = chain(&[]);
        c[0] = descriptor(0x100, 8, false, Some(1));
        assert_eq!(
            parse(&m, c).expect_err("hdr").error,
            BlkParseError::ShortHeader { got: 8 }
        );
    }

    #[test]
    fn discard_segments_checked() {
        let m = mem();
        let seg = |sector: u64, n: u32, flags: u32| RawSegment {
            sector: sector.to_le(),
            num_sectors: n.to_le(),
            flags: flags.to_le(),
        };
        m.write_obj(seg(0, 8, 0), GuestAddress(0x1000))
            .expect("seg");
        header(&m, req_type::DISCARD, 0);
        let r = parse(&m, chain(&[(0x1000, 16, false)])).expect("discard");
        assert_eq!(
            r.op,
            BlkOp::Discard {
                extents: vec![Extent {
                    start: Sector(0),
                    len: SectorCount(8),
                    unmap: false
                }]
            }
        );
        m.write_obj(seg(2040, 16, 0), GuestAddress(0x1000))
            .expect("seg");
        assert_eq!(
            parse(&m, chain(&[(0x1000, 16, false)]))
                .expect_err("past")
                .error,
            BlkParseError::PastEnd
        );
        m.write_obj(seg(0, 8, 1), GuestAddress(0x1000))
            .expect("seg");
        assert_eq!(
            parse(&m, chain(&[(0x1000, 16, false)]))
                .expect_err("flag")
                .error,
            BlkParseError::BadData
        );
        header(&m, req_type::WRITE_ZEROES, 0);
        assert!(parse(&m, chain(&[(0x1000, 16, false)])).is_ok());
        let ro = DiskLimits {
            read_only: true,
            ..disk()
        };
        assert_eq!(
            BlkRequest::parse(chain(&[(0x1000, 16, false)]).into_iter(), &m, &ro)
                .expect_err("ro")
                .error,
            BlkParseError::ReadOnly
        );
    }
}
