//! vhost-user-net mode: the card is the guest's virtio-net device. The VMM (QEMU or
//! `bulkhead-hypervisor`) connects to `--vhost-socket`, shares guest memory and hands over the
//! queues; the card reads frames straight from the guest's TX buffers and writes frames into
//! its RX buffers. What happens to a frame is the shared data path ([`crate::datapath`]).
//!
//! * Queue 0 = RX, queue 1 = TX (one pair; no `VIRTIO_NET_F_MQ`).
//! * Features: `VERSION_1`, `MAC`, `MTU`, `STATUS`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`,
//!   and `VHOST_USER_F_PROTOCOL_FEATURES` with `CONFIG`: `GET_CONFIG` returns the card's
//!   `virtio_net_config` (MAC, `LINK_UP`, one queue pair, MTU). No checksum/TSO offloads.
//! * One epoll thread (vhost-user-backend's) serves both queues **and the UDP socket**
//!   (registered as an extra listener, event id [`UDP_EVENT`]): frames from peers and the
//!   responder's answers go into the RX queue from the same thread that owns it, with no
//!   cross-thread hand-off. Frames for the guest wait in a bounded backlog
//!   ([`RX_BACKLOG`]) while the guest has no RX buffer; more are dropped and counted; the
//!   backlog is retried on the next RX kick.
//! * The control socket has its own thread (it must answer before any frontend connects).
//! * Frontends come and go: after a disconnect the card accepts the next one; keys, replay
//!   windows and conntrack live in the data path and survive.

use crate::datapath::{self, datagram_buf, CardConfig, DataPath, RECV_BUF};
use crate::keyring::{Receiver, SeqSource};
use crate::metrics::Counters;
use crate::sandbox;
use crate::virtio::{read_tx, write_rx, ChainError, Desc, NET_HDR_LEN};
use crate::{NetcardError, Result};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// virtio-net feature bits the card offers.
pub mod feature {
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const STATUS: u64 = 1 << 16;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
/// Epoll event id of the UDP socket (ids up to `NUM_QUEUES` are the queues' and the exit
/// event's).
pub const UDP_EVENT: u16 = 3;
const _: () = assert!(UDP_EVENT as usize == NUM_QUEUES + 1);
/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Frames for the guest held while it has no RX buffer.
pub const RX_BACKLOG: usize = 256;
/// Datagrams read per UDP event (the socket is level-triggered; the rest wait for the next
/// round so TX kicks are not starved).
const UDP_BATCH: usize = 64;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
/// Ethernet header plus an 802.1Q tag on top of the MTU.
const L2_OVERHEAD: usize = 18;

struct TxState {
    seq: SeqSource,
    frame: Vec<u8>,
    out: Vec<u8>,
}

struct RxState {
    receiver: Receiver,
    backlog: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    frame: Vec<u8>,
}

/// The vhost-user-net backend.
pub struct NetBackend {
    dp: Arc<DataPath>,
    tx: Mutex<TxState>,
    rx: Mutex<RxState>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>>,
    event_idx: AtomicBool,
    acked: AtomicU64,
    config: [u8; 12],
    max_frame: usize,
    /// Per ring (RX, TX): whether the ring's next used index was taken from the used ring in
    /// guest memory since the frontend last sent its memory table. A frontend that hands a
    /// running device over to this card (a restarted card, reconnected in place) starts each
    /// ring at SET_VRING_BASE = the guest's used index; vhost-user-backend only moves the next
    /// *available* index there, so the used index is synced here before the ring is used.
    synced: [AtomicBool; 2],
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn count_chain_error(c: &Counters, e: ChainError, tx: bool) {
    inc(match e {
        ChainError::Oversized => &c.tx_oversized,
        ChainError::ShortHeader => &c.tx_short_header,
        ChainError::BadHeader => &c.tx_bad_header,
        ChainError::BufferTooSmall => &c.rx_buffer_too_small,
        _ if tx => &c.tx_bad_chain,
        _ => &c.rx_bad_chain,
    });
}

fn qerr(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// `virtio_net_config`: mac[6], status, max_virtqueue_pairs, mtu (little-endian).
pub fn net_config(mac: [u8; 6], mtu: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

impl NetBackend {
    pub fn new(dp: Arc<DataPath>, seq: SeqSource) -> Self {
        let config = net_config(dp.iface.mac.0, dp.iface.mtu);
        let max_frame = usize::from(dp.iface.mtu) + L2_OVERHEAD;
        NetBackend {
            dp,
            tx: Mutex::new(TxState {
                seq,
                frame: Vec::with_capacity(max_frame),
                out: datagram_buf(),
            }),
            rx: Mutex::new(RxState {
                receiver: Receiver::new(),
                backlog: VecDeque::new(),
                buf: vec![0u8; RECV_BUF],
                frame: datagram_buf(),
            }),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            config,
            max_frame,
            synced: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// Takes each ready ring's next used index from the used ring in guest memory, once per
    /// memory table (see [`NetBackend::synced`]). On a fresh activation that index is 0.
    fn sync_used(&self, rings: [(usize, &VringRwLock); 2]) -> io::Result<()> {
        for (i, vring) in rings {
            let Some(flag) = self.synced.get(i) else {
                continue;
            };
            if flag.load(Ordering::Acquire) || !vring.get_ref().get_queue().ready() {
                continue;
            }
            let used = vring.queue_used_idx().map_err(qerr)?;
            vring.set_queue_next_used(used);
            flag.store(true, Ordering::Release);
            if used != 0 {
                info!(ring = i, used, "ring taken over at the guest's used index");
            }
        }
        Ok(())
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap<()>>> {
        match self.mem.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Forgets the frontend's memory (after a disconnect).
    pub fn disconnected(&self) {
        match self.mem.write() {
            Ok(mut g) => *g = None,
            Err(p) => *p.into_inner() = None,
        }
    }

    fn enqueue(&self, rx: &mut RxState, frame: Vec<u8>) {
        if rx.backlog.len() >= RX_BACKLOG {
            inc(&self.dp.counters.rx_no_buffer);
            return;
        }
        rx.backlog.push_back(frame);
    }

    /// Moves backlogged frames into the guest's RX buffers. Returns whether any buffer was used.
    fn flush_rx(&self, rx: &mut RxState, vring: &VringRwLock) -> io::Result<bool> {
        if rx.backlog.is_empty() {
            return Ok(false);
        }
        let Some(atomic) = self.memory() else {
            return Ok(false);
        };
        if !vring.get_ref().get_queue().ready() || !vring.get_ref().is_enabled() {
            return Ok(false);
        }
        let mem = atomic.memory();
        let mut used = false;
        loop {
            if rx.backlog.is_empty() {
                break;
            }
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                // No buffer: ask for a kick when the guest adds some, and retry once in case
                // it already did (EVENT_IDX race).
                if vring.enable_notification().map_err(qerr)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let Some(frame) = rx.backlog.pop_front() else {
                break;
            };
            let written = write_rx(chain.map(Desc::from), &*mem, &frame);
            used = true;
            if vring
                .add_used(head, *written.as_ref().unwrap_or(&0))
                .is_err()
            {
                inc(&self.dp.counters.rx_bad_chain);
                continue;
            }
            match written {
                Ok(_) => self.dp.delivered(frame.len()),
                Err(e) => {
                    debug!(error = %e, "RX chain refused");
                    count_chain_error(&self.dp.counters, e, false);
                }
            }
        }
        Ok(used)
    }

    /// Drains the TX queue through the data path; answers go to the RX backlog.
    fn process_tx(&self, vring: &VringRwLock, rx: &mut RxState) -> io::Result<bool> {
        let Some(atomic) = self.memory() else {
            return Ok(false);
        };
        let mem = atomic.memory();
        let mut tx = lock(&self.tx);
        let TxState { seq, frame, out } = &mut *tx;
        let mut used = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let parsed = read_tx(chain.map(Desc::from), &*mem, self.max_frame, frame);
            // The descriptor goes back to the guest whatever the frame's fate. A head the
            // used ring cannot take (an index beyond the queue) is counted, not fatal.
            used = true;
            if vring.add_used(head, 0).is_err() {
                inc(&self.dp.counters.tx_bad_chain);
                continue;
            }
            match parsed {
                Ok(()) => {
                    if let Some(reply) = self.dp.from_guest(seq, frame, out) {
                        self.enqueue(rx, reply);
                    }
                }
                Err(e) => {
                    debug!(error = %e, "TX chain refused");
                    count_chain_error(&self.dp.counters, e, true);
                }
            }
        }
        Ok(used)
    }

    /// Reads up to [`UDP_BATCH`] datagrams; opened frames go to the RX backlog.
    fn process_udp(&self, rx: &mut RxState) {
        for _ in 0..UDP_BATCH {
            let RxState {
                receiver,
                buf,
                frame,
                ..
            } = rx;
            match self.dp.recv_one(receiver, buf, frame) {
                None => break,
                Some(false) => {}
                Some(true) => {
                    let f = frame.clone();
                    self.enqueue(rx, f);
                }
            }
        }
    }

    fn signal(&self, vring: &VringRwLock) -> io::Result<()> {
        if vring.needs_notification().map_err(qerr)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        feature::VERSION_1
            | feature::MAC
            | feature::MTU
            | feature::STATUS
            | feature::RING_EVENT_IDX
            | feature::RING_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        info!(
            features = format!("{features:#x}"),
            "frontend acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (Ok(off), Ok(n)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        let mut out = vec![0u8; n.min(256)];
        if let Some(src) = self.config.get(off..) {
            let k = src.len().min(out.len());
            if let (Some(dst), Some(src)) = (out.get_mut(..k), src.get(..k)) {
                dst.copy_from_slice(src);
            }
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        for f in &self.synced {
            f.store(false, Ordering::Release);
        }
        match self.mem.write() {
            Ok(mut g) => *g = Some(mem),
            Err(p) => *p.into_inner() = Some(mem),
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the queue thread (and with it the UDP listener) until the
        // frontend reconnects; a broken ring (bad addresses) is counted and logged instead.
        if let Err(e) = self.event(device_event, evset, vrings) {
            inc(&self.dp.counters.io_errors);
            warn!(error = %e, event = device_event, "queue event failed");
        }
        Ok(())
    }
}

impl NetBackend {
    fn event(&self, device_event: u16, evset: EventSet, vrings: &[VringRwLock]) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let (Some(rxq), Some(txq)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Err(io::Error::other("queues missing"));
        };
        let mut rx = lock(&self.rx);
        self.sync_used([(RX_QUEUE, rxq), (TX_QUEUE, txq)])?;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        match usize::from(device_event) {
            RX_QUEUE => {}
            TX_QUEUE => {
                let mut any = false;
                if event_idx {
                    loop {
                        txq.disable_notification().map_err(qerr)?;
                        any |= self.process_tx(txq, &mut rx)?;
                        if !txq.enable_notification().map_err(qerr)? {
                            break;
                        }
                    }
                } else {
                    any = self.process_tx(txq, &mut rx)?;
                }
                if any {
                    self.signal(txq)?;
                }
            }
            e if e == usize::from(UDP_EVENT) => self.process_udp(&mut rx),
            _ => return Err(io::Error::other("event for an unknown queue")),
        }
        if self.flush_rx(&mut rx, rxq)? {
            self.signal(rxq)?;
        }
        Ok(())
    }
}

/// Runs vhost-user-net mode until SIGTERM/SIGINT/SIGHUP.
pub fn run(cfg: CardConfig, vhost_socket: PathBuf) -> Result<()> {
    let (uid, gid, control_path, listen) = (cfg.uid, cfg.gid, cfg.control.clone(), cfg.listen);
    let card = datapath::open_card(cfg)?;
    let vio = |e: &dyn std::fmt::Display| NetcardError::Vhost(e.to_string());
    let mut listener =
        vhost::vhost_user::Listener::new(&vhost_socket, true).map_err(|e| vio(&e))?;
    std::fs::set_permissions(
        &vhost_socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|source| NetcardError::Io {
        op: "chmod vhost socket",
        source,
    })?;
    card.dp
        .sock
        .set_nonblocking(true)
        .map_err(|source| NetcardError::Io {
            op: "UDP socket non-blocking",
            source,
        })?;
    if let Err(e) = bulkhead_harden::lock_current_memory() {
        warn!(error = %e, "memory not locked (key pages are locked on their own)");
    }
    bulkhead_harden::drop_privileges_if_given(uid, gid)?;
    sandbox::install_vhost_seccomp()?;
    let dp = Arc::new(card.dp);
    info!(
        vhost = %vhost_socket.display(), listen = %listen, vpc = dp.vpc().0,
        epoch = ?dp.send_epoch(), local = dp.local().0, ip = %dp.iface.ip, mac = %dp.iface.mac,
        mtu = dp.iface.mtu, control = ?control_path, "net card running (vhost-user-net, sandboxed)"
    );
    if let Some(l) = card.control {
        let dp = Arc::clone(&dp);
        datapath::spawn("control", move || dp.control_loop(l))?;
    }
    {
        let dp = Arc::clone(&dp);
        let signals = card.signals;
        datapath::spawn("signals", move || {
            datapath::wait_for_stop(&dp, &signals);
            dp.wipe_keys();
            dp.print_counters(Some(crate::encap::key_pages_wiped()));
            std::process::exit(0);
        })?;
    }
    let backend = Arc::new(NetBackend::new(Arc::clone(&dp), card.seq));
    let udp_fd = dp.sock.as_raw_fd();
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let mut daemon = VhostUserDaemon::new("bulkhead-netcard".into(), backend.clone(), mem)
            .map_err(|e| vio(&e))?;
        let handlers = daemon.get_epoll_handlers();
        for h in handlers.iter().take(1) {
            h.register_listener(udp_fd, EventSet::IN, u64::from(UDP_EVENT))
                .map_err(|e| vio(&e))?;
        }
        daemon.start(&mut listener).map_err(|e| vio(&e))?;
        info!("frontend connected");
        let res = daemon.wait();
        for h in &handlers {
            h.send_exit_event();
        }
        drop(handlers);
        backend.disconnected();
        match res {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => info!(reason = %e, "frontend disconnected"),
        }
    }
}

/// The header length, for tests.
pub const HEADER_LEN: usize = NET_HDR_LEN;
