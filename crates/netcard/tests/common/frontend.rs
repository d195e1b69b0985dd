//! A real vhost-user-net frontend for the tests: the `vhost` crate's `Frontend`, guest memory
//! in a shared memfd (sent with SET_MEM_TABLE), and the two split virtqueues (0 = RX, 1 = TX)
//! laid out by hand in that memory, so a test can put any descriptor it likes in a ring. It
//! plays VMM + guest driver against the real `bulkhead-netcard vhost` binary.

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
pub const MEM_SIZE: usize = 16 << 20;
const QUEUE_AREA: u64 = 0x4000;
/// RX buffer i at RX_BASE + i * RX_BUF.
const RX_BASE: u64 = 0x10_0000;
pub const RX_BUF: u32 = 2048;
/// TX slot i at TX_BASE + i * TX_SLOT.
const TX_BASE: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x4000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const RX: usize = 0;
pub const TX: usize = 1;

pub const VERSION_1: u64 = 1 << 32;
pub const MAC: u64 = 1 << 5;
pub const MTU: u64 = 1 << 3;
pub const STATUS: u64 = 1 << 16;
pub const EVENT_IDX: u64 = 1 << 29;

struct Vq {
    base: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A connected frontend with an RX and a TX queue.
pub struct NetFrontend {
    _fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    vqs: Vec<Vq>,
    pub offered: u64,
    pub features: u64,
    pub config: Vec<u8>,
    tx_next: u16,
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

impl NetFrontend {
    /// Connects and negotiates like QEMU's vhost-user-net does (no EVENT_IDX: a simple driver).
    pub fn connect(socket: &std::path::Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut fe = loop {
            match Frontend::connect(socket, 2) {
                Ok(f) => break f,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        };
        fe.set_owner().expect("set_owner");
        let offered = fe.get_features().expect("get_features");
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        let pf = fe.get_protocol_features().expect("get_protocol_features");
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG), "{pf:?}");
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
            .expect("set_protocol_features");
        let wanted =
            VERSION_1 | MAC | MTU | STATUS | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & wanted;
        fe.set_features(features).expect("set_features");
        let (_, config) = fe
            .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
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
        for i in 0..2 {
            let base = QUEUE_AREA * i as u64;
            fe.set_vring_num(i, QUEUE_SIZE).expect("vring_num");
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: hva + base,
                    used_ring_addr: hva + base + 0x2000,
                    avail_ring_addr: hva + base + 0x1000,
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
            offered,
            features,
            config,
            tx_next: 0,
        }
    }

    /// Writes descriptor `idx` of queue `q`.
    pub fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.vqs[q].base + 16 * u64::from(idx);
        self.mem
            .write_obj(addr.to_le(), GuestAddress(a))
            .expect("desc");
        self.mem
            .write_obj(len.to_le(), GuestAddress(a + 8))
            .expect("desc");
        self.mem
            .write_obj(flags.to_le(), GuestAddress(a + 12))
            .expect("desc");
        self.mem
            .write_obj(next.to_le(), GuestAddress(a + 14))
            .expect("desc");
    }

    /// Puts `head` in the avail ring of `q` (no kick).
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

    /// Completions already in the used ring of `q`: (head, len).
    pub fn poll_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let vq = &mut self.vqs[q];
        let used = vq.base + 0x2000;
        fence(Ordering::SeqCst);
        let idx = u16::from_le(self.mem.read_obj(GuestAddress(used + 2)).expect("used idx"));
        let mut out = Vec::new();
        while vq.last_used != idx {
            let e = used + 4 + 8 * u64::from(vq.last_used % QUEUE_SIZE);
            let id = u32::from_le(self.mem.read_obj(GuestAddress(e)).expect("id"));
            let len = u32::from_le(self.mem.read_obj(GuestAddress(e + 4)).expect("len"));
            out.push((id as u16, len));
            vq.last_used = vq.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until `q` has completions (or `timeout`); returns them (maybe none).
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.poll_used(q);
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                return got;
            }
            let mut pfd = libc::pollfd {
                fd: self.vqs[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.vqs[q].call.read();
        }
    }

    /// Posts RX buffers `first..first+n` (descriptor i = buffer i) and kicks RX.
    pub fn post_rx(&mut self, first: u16, n: u16) {
        for i in first..first + n {
            let addr = RX_BASE + u64::from(i) * u64::from(RX_BUF);
            self.write_desc(RX, i, addr, RX_BUF, F_WRITE, 0);
            self.publish(RX, i);
        }
        self.kick(RX);
    }

    /// Receives up to `max` frames (header checked and stripped), re-posting each buffer.
    pub fn recv(&mut self, max: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            for (head, len) in self.wait_used(RX, left) {
                let addr = RX_BASE + u64::from(head) * u64::from(RX_BUF);
                let mut buf = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut buf, GuestAddress(addr))
                    .expect("rx");
                assert!(len >= 12, "used length {len} shorter than the header");
                assert_eq!(&buf[..10], &[0u8; 10], "header not zeroed");
                assert_eq!(&buf[10..12], &[1, 0], "num_buffers");
                frames.push(buf[12..].to_vec());
                // Give the buffer back.
                self.write_desc(RX, head, addr, RX_BUF, F_WRITE, 0);
                self.publish(RX, head);
                self.kick(RX);
            }
        }
        frames
    }

    /// Sends one frame with a zeroed header, as two descriptors (header, frame) like Linux
    /// may; returns the head.
    pub fn send(&mut self, frame: &[u8]) -> u16 {
        let slot = self.tx_next % 64;
        self.tx_next = self.tx_next.wrapping_add(1);
        let addr = TX_BASE + u64::from(slot) * TX_SLOT;
        self.mem
            .write_slice(&[0u8; 12], GuestAddress(addr))
            .expect("hdr");
        self.mem
            .write_slice(frame, GuestAddress(addr + 12))
            .expect("frame");
        let d = slot * 2;
        self.write_desc(TX, d, addr, 12, F_NEXT, d + 1);
        self.write_desc(TX, d + 1, addr + 12, frame.len() as u32, 0, 0);
        self.publish(TX, d);
        self.kick(TX);
        d
    }

    /// Zeroes `len` bytes of guest memory at `addr`.
    pub fn mem_zero(&self, addr: u64, len: usize) {
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(addr))
            .expect("zero");
    }

    /// Address of TX slot `slot`'s data area (for hand-made chains).
    pub fn tx_area(&self, slot: u16) -> u64 {
        TX_BASE + u64::from(slot) * TX_SLOT
    }

    /// Waits for TX descriptor `head` to come back; returns its used length.
    pub fn wait_tx(&mut self, head: u16) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (h, len) in self.wait_used(TX, Duration::from_millis(200)) {
                if h == head {
                    return len;
                }
            }
            assert!(Instant::now() < deadline, "TX head {head} never returned");
        }
    }
}
