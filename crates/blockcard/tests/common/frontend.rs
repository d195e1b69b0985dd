//! A real vhost-user-blk frontend: the `vhost` crate's `Frontend`, guest memory in a shared memfd
//! (sent with SET_MEM_TABLE), and split virtqueues laid out by hand in that memory. It plays the
//! VMM + guest driver against the real `bulkhead-blockcard` binary.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
/// Guest memory size.
pub const MEM_SIZE: usize = 256 << 20;
/// Per-slot data area.
pub const SLOT_DATA: u64 = 1 << 20;
/// Slots (outstanding requests) per queue.
pub const SLOTS: u16 = 64;
const QUEUE_AREA: u64 = 0x4000;
const META_BASE: u64 = 0x10_0000;
const DATA_BASE: u64 = 0x100_0000;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

struct Vq {
    base: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A connected frontend with `queues` live virtqueues.
pub struct Harness {
    _fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    vqs: Vec<Vq>,
    pub features: u64,
    pub config: Vec<u8>,
}

/// A request's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub len: u32,
}

fn memfd(size: usize) -> std::fs::File {
    let name = c"bulkhead-test-guest";
    // SAFETY: `name` is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("ftruncate");
    f
}

impl Harness {
    /// Connects and negotiates like QEMU's vhost-user-blk does.
    pub fn connect(socket: &std::path::Path, queues: usize) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut fe = loop {
            match Frontend::connect(socket, queues as u64) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        };
        fe.set_owner().expect("set_owner");
        let offered = fe.get_features().expect("get_features");
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        let pf = fe.get_protocol_features().expect("get_protocol_features");
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .expect("set_protocol_features");
        let nq = fe.get_queue_num().expect("get_queue_num");
        assert!(nq as usize >= queues, "card offers {nq} queues");
        // No EVENT_IDX / INDIRECT: keep the test driver simple.
        let wanted: u64 = (1 << 32)
            | (1 << 1)
            | (1 << 2)
            | (1 << 5)
            | (1 << 6)
            | (1 << 9)
            | (1 << 10)
            | (1 << 12)
            | (1 << 13)
            | (1 << 14)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & wanted;
        fe.set_features(features).expect("set_features");
        let (_, config) = fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("get_config");

        let file = memfd(MEM_SIZE);
        let fd = file.as_raw_fd();
        let region = GuestRegionMmap::<()>::from_range(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )
        .expect("region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("mem");
        let hva = mem.get_host_address(GuestAddress(0)).expect("hva") as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: hva,
            mmap_offset: 0,
            mmap_handle: fd,
        }])
        .expect("set_mem_table");

        let mut vqs = Vec::new();
        for i in 0..queues {
            let base = QUEUE_AREA * i as u64;
            let desc = base;
            let avail = base + 0x1000;
            let used = base + 0x2000;
            fe.set_vring_num(i, QUEUE_SIZE).expect("vring_num");
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: hva + desc,
                    used_ring_addr: hva + used,
                    avail_ring_addr: hva + avail,
                    log_addr: None,
                },
            )
            .expect("vring_addr");
            fe.set_vring_base(i, 0).expect("vring_base");
            let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            fe.set_vring_call(i, &call).expect("vring_call");
            fe.set_vring_kick(i, &kick).expect("vring_kick");
            fe.set_vring_enable(i, true).expect("vring_enable");
            vqs.push(Vq {
                base,
                next_avail: 0,
                last_used: 0,
                kick,
                call,
            });
        }
        Self {
            _fe: fe,
            mem,
            vqs,
            features,
            config,
        }
    }

    /// Capacity in 512-byte sectors, from the config space.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[..8].try_into().expect("cap"))
    }

    /// Logical block size from the config space.
    pub fn blk_size(&self) -> u32 {
        u32::from_le_bytes(self.config[20..24].try_into().expect("blk"))
    }

    pub fn queues(&self) -> usize {
        self.vqs.len()
    }

    /// Writes descriptor `idx` of queue `q`.
    pub fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.vqs[q].base + 16 * u64::from(idx));
        self.mem.write_obj(addr.to_le(), a).expect("desc");
        self.mem
            .write_obj(len.to_le(), GuestAddress(a.0 + 8))
            .expect("desc");
        self.mem
            .write_obj(flags.to_le(), GuestAddress(a.0 + 12))
            .expect("desc");
        self.mem
            .write_obj(next.to_le(), GuestAddress(a.0 + 14))
            .expect("desc");
    }

    /// Puts `head` in the avail ring (no kick).
    pub fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.vqs[q];
        let avail = vq.base + 0x1000;
        let slot = vq.next_avail % QUEUE_SIZE;
        self.mem
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .expect("ring");
        vq.next_avail = vq.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(vq.next_avail.to_le(), GuestAddress(avail + 2))
            .expect("idx");
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self, q: usize) {
        self.vqs[q].kick.write(1).expect("kick");
    }

    /// Waits for at least one completion on queue `q`; returns all that are ready.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Vec<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.poll_used(q);
            if !got.is_empty() {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for completions on queue {q}"
            );
            let mut pfd = libc::pollfd {
                fd: self.vqs[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(100) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.vqs[q].call.read();
        }
    }

    /// Returns completions already in the used ring.
    pub fn poll_used(&mut self, q: usize) -> Vec<Completion> {
        let vq = &mut self.vqs[q];
        let used = vq.base + 0x2000;
        fence(Ordering::SeqCst);
        let idx: u16 = u16::from_le(self.mem.read_obj(GuestAddress(used + 2)).expect("used idx"));
        let mut out = Vec::new();
        while vq.last_used != idx {
            let slot = vq.last_used % QUEUE_SIZE;
            let e = used + 4 + 8 * u64::from(slot);
            let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e)).expect("id"));
            let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e + 4)).expect("len"));
            out.push(Completion {
                head: id as u16,
                len,
            });
            vq.last_used = vq.last_used.wrapping_add(1);
        }
        out
    }

    /// Guest addresses of a slot's header, status byte and data area.
    pub fn slot_addrs(&self, q: usize, slot: u16) -> (u64, u64, u64) {
        let n = q as u64 * u64::from(SLOTS) + u64::from(slot);
        let meta = META_BASE + n * 64;
        (meta, meta + 32, DATA_BASE + n * SLOT_DATA)
    }

    /// Lays out a standard request in slot `slot` (descriptors 3*slot..3*slot+2) and publishes
    /// it. `data_len` = 0 means no data descriptor. Returns the head index.
    pub fn prepare(
        &mut self,
        q: usize,
        slot: u16,
        kind: u32,
        sector: u64,
        data_len: u32,
        device_writes: bool,
    ) -> u16 {
        let (hdr, status, data) = self.slot_addrs(q, slot);
        self.mem
            .write_obj(kind.to_le(), GuestAddress(hdr))
            .expect("hdr");
        self.mem
            .write_obj(0u32, GuestAddress(hdr + 4))
            .expect("hdr");
        self.mem
            .write_obj(sector.to_le(), GuestAddress(hdr + 8))
            .expect("hdr");
        self.mem
            .write_obj(0xAAu8, GuestAddress(status))
            .expect("status");
        let d0 = slot * 3;
        if data_len == 0 {
            self.write_desc(q, d0, hdr, 16, F_NEXT, d0 + 2);
        } else {
            self.write_desc(q, d0, hdr, 16, F_NEXT, d0 + 1);
            let fl = F_NEXT | if device_writes { F_WRITE } else { 0 };
            self.write_desc(q, d0 + 1, data, data_len, fl, d0 + 2);
        }
        self.write_desc(q, d0 + 2, status, 1, F_WRITE, 0);
        self.publish(q, d0);
        d0
    }

    pub fn status_of(&self, q: usize, slot: u16) -> u8 {
        let (_, status, _) = self.slot_addrs(q, slot);
        self.mem.read_obj(GuestAddress(status)).expect("status")
    }

    fn run_one(
        &mut self,
        q: usize,
        slot: u16,
        kind: u32,
        sector: u64,
        data_len: u32,
        device_writes: bool,
    ) -> (u8, u32) {
        let head = self.prepare(q, slot, kind, sector, data_len, device_writes);
        self.kick(q);
        let c = self.wait_used(q, Duration::from_secs(30));
        assert_eq!(c.len(), 1, "one completion expected");
        assert_eq!(c[0].head, head);
        (self.status_of(q, slot), c[0].len)
    }

    /// Writes `data` at `sector`; returns the virtio status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        let (_, _, d) = self.slot_addrs(q, 0);
        self.mem.write_slice(data, GuestAddress(d)).expect("data");
        self.run_one(q, 0, VIRTIO_BLK_T_OUT, sector, data.len() as u32, false)
            .0
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, q: usize, sector: u64, len: usize) -> Result<Vec<u8>, u8> {
        let (_, _, d) = self.slot_addrs(q, 0);
        let (st, used) = self.run_one(q, 0, VIRTIO_BLK_T_IN, sector, len as u32, true);
        if st != 0 {
            return Err(st);
        }
        assert_eq!(used as usize, len + 1, "used length of a read");
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(d))
            .expect("data");
        Ok(out)
    }

    pub fn flush(&mut self, q: usize) -> u8 {
        self.run_one(q, 0, VIRTIO_BLK_T_FLUSH, 0, 0, false).0
    }

    pub fn get_id(&mut self, q: usize) -> Vec<u8> {
        let (_, _, d) = self.slot_addrs(q, 0);
        let (st, _) = self.run_one(q, 0, VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!(st, 0);
        let mut out = vec![0u8; 20];
        self.mem.read_slice(&mut out, GuestAddress(d)).expect("id");
        out
    }

    /// Discard (or write-zeroes) one extent.
    pub fn discard_like(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> u8 {
        let (_, _, d) = self.slot_addrs(q, 0);
        self.mem
            .write_obj(sector.to_le(), GuestAddress(d))
            .expect("seg");
        self.mem
            .write_obj(sectors.to_le(), GuestAddress(d + 8))
            .expect("seg");
        self.mem
            .write_obj(flags.to_le(), GuestAddress(d + 12))
            .expect("seg");
        self.run_one(q, 0, kind, 0, 16, false).0
    }
}
