//! The vhost-user-blk backend: one epoll thread per queue parses the guest's requests and hands
//! them to that queue's pool of [`IO_LANES`] I/O workers, each with its own cipher contexts and
//! aligned bounce buffer; whoever finishes a request puts it in the used ring. Guest data is copied into the private bounce buffer before it is
//! encrypted and written (so the guest cannot change it mid-request), and decrypted in the bounce
//! buffer before it is copied to the guest.

use crate::metrics::BlkMetrics;
use crate::request::{self, BlkOp, BlkRequest, DiskLimits, Extent, GuestBuf, Sector, SectorCount};
use crate::store::{AlignedBuf, Backing, StoreError};
use crate::xts::{CryptoSectorSize, XtsCipher, XtsError};
use bulkhead_sealing::VolumeKey;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Bytes of each large bounce buffer; requests larger than this are processed in chunks.
pub const BOUNCE_BYTES: usize = 1 << 20;
/// Bytes of each I/O worker's own bounce buffer: a request up to this size needs no other.
pub const SMALL_BOUNCE_BYTES: usize = 64 << 10;
/// Large ([`BOUNCE_BYTES`]) bounce buffers per queue: at most this many requests larger than
/// [`SMALL_BOUNCE_BYTES`] run at once on one queue; the others wait for a buffer.
pub const LARGE_BOUNCES: usize = 8;
/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most queues.
pub const MAX_QUEUES: u16 = 16;
/// I/O workers ("lanes") per queue, each a thread with its own cipher contexts and small bounce
/// buffer. The queue's epoll thread parses each request and hands it to the next free worker
/// without waiting for the others (no batch is joined), so up to this many requests per queue
/// are on the backing store at once: the bound on requests in flight is `queues × IO_LANES`
/// (file: that many concurrent pread/pwrite; NBD: that many commands on the connection).
/// Requests in flight together have no ordering guarantee in virtio-blk; a FLUSH waits until
/// every earlier write, discard and write-zeroes of its queue has completed.
pub const IO_LANES: usize = 32;

mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// The per-queue cipher state.
pub enum CipherState {
    /// Unencrypted volume (explicitly requested at attach).
    Plain,
    /// AES-256-XTS.
    Xts(Box<XtsCipher>),
    /// Keys erased at detach: all I/O fails.
    Erased,
}

/// One queue's private state.
pub struct QueueWorker {
    cipher: CipherState,
    bounce: AlignedBuf,
}

impl QueueWorker {
    /// A worker with its own cipher state and bounce buffer.
    pub fn new(cipher: CipherState) -> Result<Self, StoreError> {
        Ok(Self {
            cipher,
            bounce: AlignedBuf::new(SMALL_BOUNCE_BYTES)?,
        })
    }
}

/// Why executing a checked request failed (reported as IOERR).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Xts(#[from] XtsError),
    #[error("guest memory access failed")]
    GuestMemory,
    #[error("keys were erased at detach")]
    Erased,
    #[error("arithmetic overflow")]
    Overflow,
}

/// The volume as the backend serves it.
pub struct Volume {
    pub store: Backing,
    pub limits: DiskLimits,
    pub sector: CryptoSectorSize,
    pub serial: [u8; request::ID_LEN],
}

/// The vhost-user-blk backend.
pub struct BlockBackend {
    vol: Arc<Volume>,
    /// One pool of I/O workers per queue.
    pools: Vec<QueuePool>,
    metrics: Arc<BlkMetrics>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    config: Vec<u8>,
    /// The volume key kept for a card update (`None` for a plain volume).
    retained: Mutex<Option<VolumeKey>>,
}

/// A parsed request handed to a queue's workers.
struct Job {
    req: BlkRequest,
    head: u16,
    mem: Arc<GuestMemoryMmap<()>>,
    vring: VringRwLock,
    /// A write, discard or write-zeroes (what a later FLUSH must wait for).
    mutating: bool,
}

#[derive(Default)]
struct Counts {
    /// Requests handed to workers and not yet completed.
    inflight: usize,
    /// Of those, the writes, discards and write-zeroes.
    mutating: usize,
    /// Threads waiting in `wait_mutating_done` / `wait_idle` (only they need a wake-up).
    waiters: usize,
    /// Queue threads inside `handle_event` (taking chains from the avail ring).
    processing: usize,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// Workers asleep waiting for a job (a submission wakes one only if there is one).
    idle: usize,
}

/// One queue's I/O workers, the jobs waiting for them and the large bounce buffers they share.
struct QueuePool {
    workers: Vec<Mutex<QueueWorker>>,
    large: Mutex<Vec<AlignedBuf>>,
    large_cv: Condvar,
    jobs: Mutex<Jobs>,
    jobs_cv: Condvar,
    counts: Mutex<Counts>,
    counts_cv: Condvar,
    /// Worker threads running (set by [`BlockBackend::start_workers`]); until then requests
    /// run on the queue's epoll thread.
    started: AtomicBool,
}

impl QueuePool {
    fn take_large(&self) -> AlignedBuf {
        let mut free = lock(&self.large);
        loop {
            if let Some(b) = free.pop() {
                return b;
            }
            free = wait(&self.large_cv, free);
        }
    }

    fn put_large(&self, b: AlignedBuf) {
        lock(&self.large).push(b);
        self.large_cv.notify_one();
    }

    /// Queues a job for the workers; returns the requests now in flight on this queue.
    fn submit(&self, job: Job) -> usize {
        let n = {
            let mut c = lock(&self.counts);
            c.inflight += 1;
            if job.mutating {
                c.mutating += 1;
            }
            c.inflight
        };
        let idle = {
            let mut j = lock(&self.jobs);
            j.queue.push_back(job);
            j.idle
        };
        if idle > 0 {
            self.jobs_cv.notify_one();
        }
        n
    }

    fn next_job(&self) -> Job {
        let mut q = lock(&self.jobs);
        loop {
            if let Some(j) = q.queue.pop_front() {
                return j;
            }
            q.idle += 1;
            q = wait(&self.jobs_cv, q);
            q.idle = q.idle.saturating_sub(1);
        }
    }

    fn finish(&self, mutating: bool) {
        let mut c = lock(&self.counts);
        c.inflight = c.inflight.saturating_sub(1);
        if mutating {
            c.mutating = c.mutating.saturating_sub(1);
        }
        if c.waiters > 0 && (c.mutating == 0 || c.inflight == 0) {
            self.counts_cv.notify_all();
        }
    }

    fn inflight(&self) -> usize {
        lock(&self.counts).inflight
    }

    /// Blocks until every write, discard and write-zeroes handed out so far has completed.
    fn wait_mutating_done(&self) {
        let mut c = lock(&self.counts);
        while c.mutating > 0 {
            c.waiters += 1;
            c = wait(&self.counts_cv, c);
            c.waiters = c.waiters.saturating_sub(1);
        }
    }

    /// Marks the queue thread as taking chains; `false` (nothing marked) if the ring was
    /// stopped, so nothing may be taken from it any more.
    fn begin_processing(&self, vring: &VringRwLock) -> bool {
        lock(&self.counts).processing += 1;
        if vring.get_ref().get_queue().ready() {
            return true;
        }
        self.end_processing();
        false
    }

    fn end_processing(&self) {
        let mut c = lock(&self.counts);
        c.processing = c.processing.saturating_sub(1);
        if c.waiters > 0 {
            self.counts_cv.notify_all();
        }
    }

    /// Blocks until no queue thread is taking chains and nothing is in flight: every chain
    /// taken from the avail ring is in the used ring.
    fn wait_drained(&self) {
        let mut c = lock(&self.counts);
        while c.inflight > 0 || c.processing > 0 {
            c.waiters += 1;
            c = wait(&self.counts_cv, c);
            c.waiters = c.waiters.saturating_sub(1);
        }
    }

    /// Blocks until nothing is in flight.
    fn wait_idle(&self) {
        let mut c = lock(&self.counts);
        while c.inflight > 0 {
            c.waiters += 1;
            c = wait(&self.counts_cv, c);
            c.waiters = c.waiters.saturating_sub(1);
        }
    }
}

/// Puts a completed request in the used ring and notifies the driver if it asked for it.
fn complete(vring: &VringRwLock, head: u16, used: u32) {
    let mut st = vring.get_mut();
    if let Err(e) = st.add_used(head, used) {
        warn!(error = %e, "add_used failed");
        return;
    }
    if st.needs_notification().unwrap_or(true) {
        if let Err(e) = st.signal_used_queue() {
            debug!(error = %e, "used-queue signal failed");
        }
    }
}

/// Bytes of bounce buffer a request needs to run in one piece.
fn bounce_need(op: &BlkOp) -> u64 {
    match op {
        BlkOp::Read { len, .. } | BlkOp::Write { len, .. } => len.bytes().unwrap_or(u64::MAX),
        BlkOp::WriteZeroes { extents } => extents
            .iter()
            .map(|e| e.len.bytes().unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add),
        BlkOp::Flush | BlkOp::GetId { .. } | BlkOp::Discard { .. } => 0,
    }
}

impl BlockBackend {
    /// `workers` holds `queues * IO_LANES` workers (queue-major).
    pub fn new(
        vol: Arc<Volume>,
        workers: Vec<QueueWorker>,
        metrics: Arc<BlkMetrics>,
    ) -> Result<Self, StoreError> {
        let mut per_queue: Vec<Vec<Mutex<QueueWorker>>> = Vec::new();
        for w in workers {
            match per_queue.last_mut() {
                Some(l) if l.len() < IO_LANES => l.push(Mutex::new(w)),
                _ => per_queue.push(vec![Mutex::new(w)]),
            }
        }
        let mut pools = Vec::with_capacity(per_queue.len());
        for workers in per_queue {
            let large = (0..LARGE_BOUNCES)
                .map(|_| AlignedBuf::new(BOUNCE_BYTES))
                .collect::<Result<Vec<_>, _>>()?;
            pools.push(QueuePool {
                workers,
                large: Mutex::new(large),
                large_cv: Condvar::new(),
                jobs: Mutex::new(Jobs::default()),
                jobs_cv: Condvar::new(),
                counts: Mutex::new(Counts::default()),
                counts_cv: Condvar::new(),
                started: AtomicBool::new(false),
            });
        }
        let config = build_config(&vol, pools.len());
        Ok(Self {
            vol,
            pools,
            metrics,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            config,
            retained: Mutex::new(None),
        })
    }

    /// Starts every queue's worker threads. Call it after the sandbox is in place and the exit
    /// signals are blocked, so the threads inherit both.
    pub fn start_workers(self: &Arc<Self>) -> io::Result<()> {
        for (q, pool) in self.pools.iter().enumerate() {
            for i in 0..pool.workers.len() {
                let me = Arc::clone(self);
                std::thread::Builder::new()
                    .name(format!("io-{q}-{i}"))
                    .spawn(move || me.worker_loop(q, i))?;
            }
            pool.started.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Waits until no request handed to a worker is still running (a frontend that went away
    /// must not have requests completed into the rings of the next one).
    pub fn quiesce(&self) {
        for p in &self.pools {
            p.wait_idle();
        }
    }

    /// Drops every cipher context: each one's locked key page is zeroized, verified and unmapped
    /// (counted in [`crate::xts::key_pages_wiped`]), and the retained volume key (see
    /// [`BlockBackend::retain_key`]). Waits for the request each worker is running to finish
    /// first.
    pub fn erase_keys(&self) {
        for w in self.pools.iter().flat_map(|p| p.workers.iter()) {
            lock(w).cipher = CipherState::Erased;
        }
        drop(lock(&self.retained).take());
    }

    /// Keeps the volume key (in its locked, non-dumpable page) for a card update, which hands
    /// it to the successor card ([`crate::handover`]). Dropped (zeroized) by `erase_keys`.
    pub fn retain_key(&self, key: Option<VolumeKey>) {
        *lock(&self.retained) = key;
    }

    /// Runs `f` on the retained key (`None`: unencrypted volume or erased).
    pub fn with_key<R>(&self, f: impl FnOnce(Option<&VolumeKey>) -> R) -> R {
        f(lock(&self.retained).as_ref())
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    fn worker_loop(&self, q: usize, i: usize) {
        let (Some(pool), Some(worker)) = (
            self.pools.get(q),
            self.pools.get(q).and_then(|p| p.workers.get(i)),
        ) else {
            return;
        };
        loop {
            let job = pool.next_job();
            let used = {
                let mut w = lock(worker);
                self.run_request(&job.req, &job.mem, &mut w, pool)
            };
            complete(&job.vring, job.head, used);
            pool.finish(job.mutating);
        }
    }

    fn process_queue(&self, vring: &VringRwLock, pool: &QueuePool) -> io::Result<()> {
        let atomic = match self.mem.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let Some(atomic) = atomic else {
            return Ok(());
        };
        let mem: Arc<GuestMemoryMmap<()>> = atomic.memory().into_inner();
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                // The avail ring itself is bogus: the device is broken until reset (virtio 2.1.2).
                BlkMetrics::inc(&self.metrics.io_errors);
                warn!(error = %e, "avail ring invalid; stopping queue");
                return Err(io::Error::other("invalid avail ring"));
            }
        };
        if chains.is_empty() {
            return Ok(());
        }
        // A lone request with nothing in flight (QD 1) runs here: no hand-off to a worker.
        let inline =
            !pool.started.load(Ordering::Acquire) || (chains.len() == 1 && pool.inflight() == 0);
        for chain in chains {
            let head = chain.head_index();
            let req = match BlkRequest::parse(chain, &*mem, &self.vol.limits) {
                Ok(r) => r,
                Err(rej) => {
                    self.metrics.count_reject(&rej.error, rej.status.is_some());
                    debug!(error = %rej.error, "rejected descriptor chain");
                    let used = match rej.status {
                        Some(addr) if mem.write_obj(rej.status_code(), addr).is_ok() => 1,
                        _ => 0,
                    };
                    complete(vring, head, used);
                    continue;
                }
            };
            if matches!(req.op, BlkOp::Flush) {
                // Everything written before the flush must be on the store before it syncs.
                pool.wait_mutating_done();
            }
            if inline {
                let Some(worker) = pool.workers.first() else {
                    return Err(io::Error::other("queue without workers"));
                };
                let used = {
                    let mut w = lock(worker);
                    self.run_request(&req, &mem, &mut w, pool)
                };
                complete(vring, head, used);
            } else {
                let mutating = matches!(
                    req.op,
                    BlkOp::Write { .. } | BlkOp::Discard { .. } | BlkOp::WriteZeroes { .. }
                );
                let n = pool.submit(Job {
                    req,
                    head,
                    mem: mem.clone(),
                    vring: vring.clone(),
                    mutating,
                });
                self.metrics
                    .inflight_peak
                    .fetch_max(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Runs a checked request and writes its status; returns the used length.
    fn run_request(
        &self,
        req: &BlkRequest,
        mem: &GuestMemoryMmap<()>,
        w: &mut QueueWorker,
        pool: &QueuePool,
    ) -> u32 {
        let small = u64::try_from(w.bounce.len()).unwrap_or(0);
        let res = if bounce_need(&req.op) > small {
            let mut big = pool.take_large();
            let r = self.execute(req, mem, &mut w.cipher, &mut big);
            pool.put_large(big);
            r
        } else {
            self.execute(req, mem, &mut w.cipher, &mut w.bounce)
        };
        let (code, written) = match res {
            Ok(n) => (request::status::OK, n),
            Err(e) => {
                BlkMetrics::inc(&self.metrics.io_errors);
                if matches!(e, ExecError::Erased) {
                    BlkMetrics::inc(&self.metrics.rejected_after_detach);
                }
                warn!(error = %e, "request failed");
                (request::status::IOERR, 0)
            }
        };
        if mem.write_obj(code, req.status).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// Runs a checked request; returns the bytes written into guest buffers (excluding status).
    fn execute(
        &self,
        req: &BlkRequest,
        mem: &GuestMemoryMmap<()>,
        cipher: &mut CipherState,
        bounce: &mut [u8],
    ) -> Result<u32, ExecError> {
        if matches!(cipher, CipherState::Erased) {
            return Err(ExecError::Erased);
        }
        let m = &self.metrics;
        match &req.op {
            BlkOp::Read { start, len, bufs } => {
                self.read(*start, *len, bufs, mem, cipher, bounce)?;
                BlkMetrics::inc(&m.reads);
                let bytes = len.bytes().ok_or(ExecError::Overflow)?;
                BlkMetrics::add(&m.read_bytes, bytes);
                u32::try_from(bytes).map_err(|_| ExecError::Overflow)
            }
            BlkOp::Write { start, len, bufs } => {
                self.write(*start, *len, bufs, mem, cipher, bounce)?;
                BlkMetrics::inc(&m.writes);
                BlkMetrics::add(&m.write_bytes, len.bytes().ok_or(ExecError::Overflow)?);
                Ok(0)
            }
            BlkOp::Flush => {
                self.vol.store.flush()?;
                BlkMetrics::inc(&m.flushes);
                Ok(0)
            }
            BlkOp::GetId { buf } => {
                let n = usize::try_from(buf.len)
                    .map_err(|_| ExecError::Overflow)?
                    .min(request::ID_LEN);
                let id = self.vol.serial.get(..n).ok_or(ExecError::Overflow)?;
                mem.write_slice(id, buf.addr)
                    .map_err(|_| ExecError::GuestMemory)?;
                BlkMetrics::inc(&m.get_ids);
                u32::try_from(n).map_err(|_| ExecError::Overflow)
            }
            BlkOp::Discard { extents } => {
                for e in extents {
                    let off = e.start.0.checked_mul(512).ok_or(ExecError::Overflow)?;
                    let n = e.len.bytes().ok_or(ExecError::Overflow)?;
                    // Discard is advisory: a store that cannot punch holes keeps the data.
                    if let Err(err) = self.vol.store.discard(off, n) {
                        debug!(error = %err, "discard not supported by the backing store");
                    }
                }
                BlkMetrics::inc(&m.discards);
                Ok(0)
            }
            BlkOp::WriteZeroes { extents } => {
                for e in extents {
                    self.write_zeroes(e, cipher, bounce)?;
                }
                BlkMetrics::inc(&m.write_zeroes);
                Ok(0)
            }
        }
    }

    fn read(
        &self,
        start: Sector,
        len: SectorCount,
        bufs: &[GuestBuf],
        mem: &GuestMemoryMmap<()>,
        cipher: &mut CipherState,
        bounce: &mut [u8],
    ) -> Result<(), ExecError> {
        let total = usize::try_from(len.bytes().ok_or(ExecError::Overflow)?)
            .map_err(|_| ExecError::Overflow)?;
        let base = start.0.checked_mul(512).ok_or(ExecError::Overflow)?;
        let sector_bytes = self.vol.sector.bytes();
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(bounce.len());
            let off = base
                .checked_add(u64::try_from(done).map_err(|_| ExecError::Overflow)?)
                .ok_or(ExecError::Overflow)?;
            let chunk = bounce.get_mut(..n).ok_or(ExecError::Overflow)?;
            self.vol.store.read_at(chunk, off)?;
            if let CipherState::Xts(x) = cipher {
                x.decrypt(chunk, off / sector_bytes)?;
            }
            scatter(mem, bufs, done, chunk)?;
            done += n;
        }
        Ok(())
    }

    fn write(
        &self,
        start: Sector,
        len: SectorCount,
        bufs: &[GuestBuf],
        mem: &GuestMemoryMmap<()>,
        cipher: &mut CipherState,
        bounce: &mut [u8],
    ) -> Result<(), ExecError> {
        let total = usize::try_from(len.bytes().ok_or(ExecError::Overflow)?)
            .map_err(|_| ExecError::Overflow)?;
        let base = start.0.checked_mul(512).ok_or(ExecError::Overflow)?;
        let sector_bytes = self.vol.sector.bytes();
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(bounce.len());
            let off = base
                .checked_add(u64::try_from(done).map_err(|_| ExecError::Overflow)?)
                .ok_or(ExecError::Overflow)?;
            let chunk = bounce.get_mut(..n).ok_or(ExecError::Overflow)?;
            gather(mem, bufs, done, chunk)?;
            if let CipherState::Xts(x) = cipher {
                x.encrypt(chunk, off / sector_bytes)?;
            }
            self.vol.store.write_at(chunk, off)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        e: &Extent,
        cipher: &mut CipherState,
        bounce: &mut [u8],
    ) -> Result<(), ExecError> {
        let total = e.len.bytes().ok_or(ExecError::Overflow)?;
        let base = e.start.0.checked_mul(512).ok_or(ExecError::Overflow)?;
        let sector_bytes = self.vol.sector.bytes();
        let mut done = 0u64;
        while done < total {
            let n =
                (total - done).min(u64::try_from(bounce.len()).map_err(|_| ExecError::Overflow)?);
            let off = base.checked_add(done).ok_or(ExecError::Overflow)?;
            let chunk = bounce
                .get_mut(..usize::try_from(n).map_err(|_| ExecError::Overflow)?)
                .ok_or(ExecError::Overflow)?;
            chunk.fill(0);
            if let CipherState::Xts(x) = cipher {
                // Encrypted zeros, so the guest reads back zeros (a hole would decrypt to noise).
                x.encrypt(chunk, off / sector_bytes)?;
            }
            self.vol.store.write_at(chunk, off)?;
            done += n;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Calls `f(guest_addr, range_in_chunk)` for each piece of `bufs` that overlaps the byte range
/// `[off, off + len)` of the request's data.
fn pieces(
    bufs: &[GuestBuf],
    off: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ExecError>,
) -> Result<(), ExecError> {
    let end = off.checked_add(len).ok_or(ExecError::Overflow)?;
    let mut pos = 0usize;
    for b in bufs {
        let blen = usize::try_from(b.len).map_err(|_| ExecError::Overflow)?;
        let bstart = pos;
        let bend = pos.checked_add(blen).ok_or(ExecError::Overflow)?;
        pos = bend;
        let s = bstart.max(off);
        let e = bend.min(end);
        if s < e {
            let addr = b
                .addr
                .checked_add(u64::try_from(s - bstart).map_err(|_| ExecError::Overflow)?)
                .ok_or(ExecError::Overflow)?;
            f(addr, (s - off)..(e - off))?;
        }
        if pos >= end {
            break;
        }
    }
    Ok(())
}

fn gather(
    mem: &GuestMemoryMmap<()>,
    bufs: &[GuestBuf],
    off: usize,
    chunk: &mut [u8],
) -> Result<(), ExecError> {
    let len = chunk.len();
    pieces(bufs, off, len, |addr, r| {
        let dst = chunk.get_mut(r).ok_or(ExecError::Overflow)?;
        mem.read_slice(dst, addr)
            .map_err(|_| ExecError::GuestMemory)
    })
}

fn scatter(
    mem: &GuestMemoryMmap<()>,
    bufs: &[GuestBuf],
    off: usize,
    chunk: &[u8],
) -> Result<(), ExecError> {
    pieces(bufs, off, chunk.len(), |addr, r| {
        let src = chunk.get(r).ok_or(ExecError::Overflow)?;
        mem.write_slice(src, addr)
            .map_err(|_| ExecError::GuestMemory)
    })
}

fn build_config(vol: &Volume, queues: usize) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put = |c: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(&mut c, 0, &vol.limits.capacity.0.to_le_bytes());
    put(&mut c, 8, &request::MAX_SEGMENT_BYTES.to_le_bytes());
    let seg_max = u32::try_from(request::MAX_DATA_SEGMENTS).unwrap_or(1);
    put(&mut c, 12, &seg_max.to_le_bytes());
    let blk_size = u32::try_from(vol.sector.bytes()).unwrap_or(512);
    put(&mut c, 20, &blk_size.to_le_bytes());
    // Topology: one logical block per physical block, min I/O one block.
    put(&mut c, 26, &1u16.to_le_bytes());
    put(
        &mut c,
        34,
        &u16::try_from(queues).unwrap_or(1).to_le_bytes(),
    );
    put(&mut c, 36, &request::MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &request::MAX_DISCARD_SEGMENTS.to_le_bytes());
    let align = u32::try_from(vol.limits.align).unwrap_or(1);
    put(&mut c, 44, &align.to_le_bytes());
    put(&mut c, 48, &request::MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 52, &request::MAX_DISCARD_SEGMENTS.to_le_bytes());
    c
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.pools.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::TOPOLOGY
            | feature::MQ
            | feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
            | feature::VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.vol.limits.read_only {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (Ok(off), Ok(n)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        let mut out = vec![0u8; n];
        if let Some(src) = self.config.get(off..) {
            let k = src.len().min(n);
            if let (Some(dst), Some(src)) = (out.get_mut(..k), src.get(..k)) {
                dst.copy_from_slice(src);
            }
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        match self.mem.write() {
            Ok(mut g) => *g = Some(mem),
            Err(p) => *p.into_inner() = Some(mem),
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets a queue thread be stopped when its frontend goes away, so a new frontend (a VMM
        // reconnecting after a guest reboot) gets fresh threads.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// GET_VRING_BASE (the frontend stops the ring; the vhost-user crate has already marked it
    /// not ready and stopped watching its kick): waits until every chain this card took from
    /// the ring is completed into the used ring, so the base it answers equals the used index
    /// and no completion arrives after it — the next backend (a card update) resumes exactly
    /// there.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let pool = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.pools.get(i))
            .ok_or_else(|| io::Error::other("stop for an unknown queue"))?;
        pool.wait_drained();
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pools.len()).map(|i| 1u64 << i).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected epoll event"));
        }
        let idx = usize::from(device_event);
        let (Some(vring), Some(pool)) = (vrings.get(idx), self.pools.get(idx)) else {
            return Err(io::Error::other("event for an unknown queue"));
        };
        // A ring being stopped (GET_VRING_BASE) is left alone; `stop_vring` waits for this.
        if !pool.begin_processing(vring) {
            return Ok(());
        }
        let r = self.take_chains(vring, pool);
        pool.end_processing();
        r
    }
}

impl BlockBackend {
    fn take_chains(&self, vring: &VringRwLock, pool: &QueuePool) -> io::Result<()> {
        // Completions are put in the used ring (and signalled) by whoever finishes a request:
        // this thread for rejected chains and lone requests, a worker otherwise.
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e}")))?;
                self.process_queue(vring, pool)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e}")))?
                {
                    break;
                }
            }
        } else {
            self.process_queue(vring, pool)?;
        }
        Ok(())
    }
}
