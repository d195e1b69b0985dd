//! The guest side of the card-update bench: a virtio-blk driver on a split virtqueue in the
//! hypervisor's own guest memory (`GuestRam`, a memfd), run on its own thread like a vCPU
//! (rings in guest memory, kick = the queue's ioeventfd, completions = its irqfd). It keeps
//! `qd` random 4 KiB requests in flight (half writes, half reads of blocks written before),
//! checks every status and every read against what was last written there, and records when
//! each request completed. A wrong status, a wrong read or a request that never completes
//! panics: the bench fails loudly.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_hypervisor::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
pub const DESC: u64 = 0x10_0000;
pub const AVAIL: u64 = 0x10_1000;
pub const USED: u64 = 0x10_2000;
const HEADERS: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;
const DATA: u64 = 0x20_0000;
const BS: u64 = 4096;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// A request not completed after this long fails the bench.
const STUCK: Duration = Duration::from_secs(15);

/// What a run of the driver saw.
pub struct Record {
    /// When each request completed, since `begin`.
    pub completions: Vec<Duration>,
    pub writes: u64,
    pub reads_checked: u64,
    /// Blocks read back and checked after the run (every block written during it).
    pub final_checked: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    block: u64,
    gen: u32,
    write: bool,
}

/// The content of `block` after its write number `gen`: every 8-byte word names both.
fn pattern(block: u64, gen: u32) -> Vec<u8> {
    (0..BS / 8)
        .flat_map(|i| {
            ((block << 40) ^ (u64::from(gen) << 12) ^ i ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes()
        })
        .collect()
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

pub struct Driver {
    ram: Arc<GuestRam>,
    kick: EventFd,
    irq: Arc<EventFd>,
    blocks: u64,
    qd: u16,
    avail_idx: u16,
    last_used: u16,
    /// Last completed write generation of each block (0: never written in this run).
    shadow: Vec<u32>,
    busy: Vec<bool>,
    next_gen: u32,
    seed: u64,
    slots: Vec<Option<Slot>>,
    started: Vec<Instant>,
}

impl Driver {
    pub fn new(ram: Arc<GuestRam>, kick: EventFd, irq: Arc<EventFd>, blocks: u64, qd: u16) -> Self {
        assert!(qd >= 1 && u32::from(qd) * 3 <= u32::from(QUEUE_SIZE));
        let n = usize::try_from(blocks).expect("blocks");
        Driver {
            ram,
            kick,
            irq,
            blocks,
            qd,
            avail_idx: 0,
            last_used: 0,
            shadow: vec![0; n],
            busy: vec![false; n],
            next_gen: 0,
            seed: 0x2545_f491_4f6c_dd1d,
            slots: vec![None; usize::from(qd)],
            started: vec![Instant::now(); usize::from(qd)],
        }
    }

    fn w<T: vm_memory::ByteValued>(&self, at: u64, v: T) {
        self.ram
            .mem
            .write_obj(v, GuestAddress(at))
            .expect("guest write");
    }

    fn submit(&mut self, slot: u16, s: Slot) {
        let i = usize::from(slot);
        let b = usize::try_from(s.block).expect("block");
        self.busy[b] = true;
        let head = slot * 3;
        let hdr = HEADERS + u64::from(slot) * 16;
        let data = DATA + u64::from(slot) * BS;
        let status = STATUS + u64::from(slot);
        self.w(hdr, if s.write { T_OUT } else { T_IN });
        self.w(hdr + 4, 0u32);
        self.w(hdr + 8, s.block * (BS / 512));
        if s.write {
            self.ram
                .mem
                .write_slice(&pattern(s.block, s.gen), GuestAddress(data))
                .expect("data");
        } else {
            self.ram
                .mem
                .write_slice(&[0u8; 4096], GuestAddress(data))
                .expect("data");
        }
        self.w(status, 0xffu8);
        let desc = |idx: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let d = DESC + u64::from(idx) * 16;
            self.w(d, addr);
            self.w(d + 8, len);
            self.w(d + 12, flags);
            self.w(d + 14, next);
        };
        desc(head, hdr, 16, F_NEXT, head + 1);
        desc(
            head + 1,
            data,
            4096,
            F_NEXT | if s.write { 0 } else { F_WRITE },
            head + 2,
        );
        desc(head + 2, status, 1, F_WRITE, 0);
        self.w(AVAIL + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.w(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.slots[i] = Some(s);
        self.started[i] = Instant::now();
    }

    /// The next request: a read of a written, idle block half the time, else a write.
    fn pick(&mut self, reads: bool) -> Slot {
        loop {
            let r = xorshift(&mut self.seed);
            let block = r % self.blocks;
            let b = usize::try_from(block).expect("block");
            if self.busy[b] {
                continue;
            }
            if reads && r & (1 << 62) != 0 && self.shadow[b] != 0 {
                return Slot {
                    block,
                    gen: self.shadow[b],
                    write: false,
                };
            }
            if r & (1 << 62) != 0 {
                continue;
            }
            self.next_gen += 1;
            return Slot {
                block,
                gen: self.next_gen,
                write: true,
            };
        }
    }

    /// Reaps completed requests; checks each. Returns the freed slots.
    fn reap(&mut self) -> Vec<u16> {
        let used: u16 = self
            .ram
            .mem
            .read_obj(GuestAddress(USED + 2))
            .expect("used idx");
        fence(Ordering::SeqCst);
        let mut freed = Vec::new();
        while self.last_used != used {
            let e = USED + 4 + u64::from(self.last_used % QUEUE_SIZE) * 8;
            let id: u32 = self.ram.mem.read_obj(GuestAddress(e)).expect("used elem");
            self.last_used = self.last_used.wrapping_add(1);
            // Every chain is three descriptors from `slot * 3` (see `submit`).
            assert!(
                id.is_multiple_of(3),
                "used ring returned id {id}, which is no chain's head"
            );
            let slot = u16::try_from(id / 3).expect("head");
            let Some(s) = self.slots.get_mut(usize::from(slot)).and_then(Option::take) else {
                panic!("used ring returned head {id}, which is not in flight");
            };
            let st: u8 = self
                .ram
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(slot)))
                .expect("status");
            assert_eq!(
                st, 0,
                "request on block {} (write: {}) completed with status {st}",
                s.block, s.write
            );
            let b = usize::try_from(s.block).expect("block");
            if s.write {
                self.shadow[b] = s.gen;
            } else {
                let mut got = vec![0u8; 4096];
                self.ram
                    .mem
                    .read_slice(&mut got, GuestAddress(DATA + u64::from(slot) * BS))
                    .expect("data");
                assert!(
                    got == pattern(s.block, s.gen),
                    "block {} read back wrong data (want write {}): a lost or wrong write",
                    s.block,
                    s.gen
                );
            }
            self.busy[b] = false;
            freed.push(slot);
        }
        freed
    }

    /// Waits (bounded) for the irqfd, or returns after 20 ms to look at the used ring anyway.
    fn wait_irq(&self) {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.irq.as_ref()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd on the stack for the duration of the call.
        let _ = unsafe { libc::poll(&mut p, 1, 20) };
        let _ = self.irq.read();
    }

    fn stuck(&self) {
        for (i, s) in self.slots.iter().enumerate() {
            if s.is_some() && self.started[i].elapsed() > STUCK {
                panic!("request in slot {i} not completed after {STUCK:?}");
            }
        }
    }

    /// Runs until `stop`, then drains and reads back every block written in this run.
    pub fn run(mut self, begin: Instant, stop: Arc<AtomicBool>) -> Record {
        let mut rec = Record {
            completions: Vec::with_capacity(1 << 20),
            writes: 0,
            reads_checked: 0,
            final_checked: 0,
        };
        for slot in 0..self.qd {
            let s = self.pick(slot > 0);
            self.submit(slot, s);
        }
        let _ = self.kick.write(1);
        loop {
            self.wait_irq();
            let freed = self.reap();
            let now = begin.elapsed();
            let stopping = stop.load(Ordering::Relaxed);
            for &slot in &freed {
                rec.completions.push(now);
                if !stopping {
                    let s = self.pick(true);
                    self.submit(slot, s);
                }
            }
            if !freed.is_empty() && !stopping {
                let _ = self.kick.write(1);
            }
            self.stuck();
            if stopping && self.slots.iter().all(Option::is_none) {
                break;
            }
        }
        rec.writes = u64::from(self.next_gen);
        rec.reads_checked = u64::try_from(rec.completions.len()).unwrap_or(0) - rec.writes;
        // Read back every block written in this run, `qd` at a time.
        let written: Vec<u64> = (0..self.blocks)
            .filter(|&b| self.shadow[usize::try_from(b).expect("b")] != 0)
            .collect();
        for chunk in written.chunks(usize::from(self.qd)) {
            for (slot, &block) in (0u16..).zip(chunk) {
                let gen = self.shadow[usize::try_from(block).expect("b")];
                self.submit(
                    slot,
                    Slot {
                        block,
                        gen,
                        write: false,
                    },
                );
            }
            let _ = self.kick.write(1);
            while self.slots.iter().any(Option::is_some) {
                self.wait_irq();
                self.reap();
                self.stuck();
            }
            rec.final_checked += u64::try_from(chunk.len()).unwrap_or(0);
        }
        rec
    }
}
