//! A test-only vhost-user-net backend: the *peer* on the far side of the hypervisor's virtio-net
//! frontend (the frontend is what is under test; the real backend is `bulkhead-netcard vhost`).
//! Built on the `vhost-user-backend` crate, it offers a fixed MAC and MTU over GET_CONFIG,
//! records the features the frontend set and every frame the guest transmits (the RX queue is
//! left alone: the real card's DHCP answers prove that direction).
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub const VERSION_1: u64 = 1 << 32;
pub const NET_F_CSUM: u64 = 1;
pub const NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const NET_F_HOST_TSO4: u64 = 1 << 11;
pub const NET_F_MTU: u64 = 1 << 3;
pub const NET_F_MAC: u64 = 1 << 5;
pub const NET_F_STATUS: u64 = 1 << 16;
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
pub const NET_F_MQ: u64 = 1 << 22;
/// The virtio_net_hdr with VERSION_1.
const NET_HDR_LEN: usize = 12;

/// How the peer behaves.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Virtio feature bits offered (PROTOCOL_FEATURES is added).
    pub features: u64,
    /// Whether the CONFIG protocol feature is offered.
    pub config: bool,
}

impl PeerSpec {
    /// A well-behaved card, which also offers offloads and multi-queue the frontend must hide.
    pub fn good(mac: [u8; 6]) -> Self {
        PeerSpec {
            mac,
            mtu: 1400,
            features: VERSION_1
                | NET_F_MAC
                | NET_F_MTU
                | NET_F_STATUS
                | NET_F_CSUM
                | NET_F_GUEST_TSO4
                | NET_F_HOST_TSO4
                | NET_F_CTRL_VQ
                | NET_F_MQ,
            config: true,
        }
    }
}

struct Inner {
    spec: PeerSpec,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    acked: AtomicU64,
    tx_frames: Mutex<Vec<Vec<u8>>>,
}

#[derive(Clone)]
struct Backend(Arc<Inner>);

impl Backend {
    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.0.mem.read().ok()?.clone()
    }

    /// Drains the TX queue, recording each frame (without the virtio-net header).
    fn drain_tx(&self, vring: &VringRwLock) -> io::Result<bool> {
        let Some(atomic) = self.memory() else {
            return Ok(false);
        };
        let mem = atomic.memory();
        let mut any = false;
        while let Some(chain) = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())
        {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            for d in chain.clone() {
                if d.is_write_only() {
                    continue;
                }
                let mut b = vec![0u8; d.len() as usize];
                mem.read_slice(&mut b, d.addr()).map_err(io::Error::other)?;
                bytes.extend_from_slice(&b);
            }
            if bytes.len() > NET_HDR_LEN {
                self.0
                    .tx_frames
                    .lock()
                    .expect("lock")
                    .push(bytes[NET_HDR_LEN..].to_vec());
            }
            vring.add_used(head, 0).map_err(io::Error::other)?;
            any = true;
        }
        Ok(any)
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        self.0.spec.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::SeqCst);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if self.0.spec.config {
            VhostUserProtocolFeatures::CONFIG
        } else {
            VhostUserProtocolFeatures::empty()
        }
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = self.0.spec.mac.to_vec();
        c.extend_from_slice(&1u16.to_le_bytes()); // LINK_UP
        c.extend_from_slice(&4u16.to_le_bytes()); // 4 pairs: the frontend shows 1
        c.extend_from_slice(&self.0.spec.mtu.to_le_bytes());
        let mut out = vec![0u8; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
        out
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.0.mem.write().expect("lock") = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let Some(tx) = vrings.get(1) else {
            return Ok(());
        };
        if device_event == 1 && self.drain_tx(tx)? {
            tx.signal_used_queue()?;
        }
        Ok(())
    }
}

/// A running peer listening on its socket, serving every frontend that connects.
pub struct NetPeer {
    pub sock: PathBuf,
    inner: Arc<Inner>,
    _thread: JoinHandle<()>,
}

impl NetPeer {
    pub fn start(dir: &Path, name: &str, spec: PeerSpec) -> NetPeer {
        let sock = dir.join(name);
        let mut listener = Listener::new(&sock, true).expect("peer listener");
        let inner = Arc::new(Inner {
            spec,
            mem: RwLock::new(None),
            acked: AtomicU64::new(0),
            tx_frames: Mutex::new(Vec::new()),
        });
        let backend = Backend(inner.clone());
        // Every accepted connection gets its own daemon (and thread), so several frontends
        // can be connected at once.
        let thread = std::thread::spawn(move || loop {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
            let Ok(mut daemon) = VhostUserDaemon::new("net-peer".into(), backend.clone(), mem)
            else {
                return;
            };
            if daemon.start(&mut listener).is_err() {
                return;
            }
            std::thread::spawn(move || {
                let _ = daemon.wait();
            });
        });
        NetPeer {
            sock,
            inner,
            _thread: thread,
        }
    }

    /// A new connection to the peer.
    pub fn connect(&self) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::connect(&self.sock).expect("connect to the net peer")
    }

    /// The feature bits the frontend set (0 until the guest's driver brought the device up).
    pub fn acked_features(&self) -> u64 {
        self.inner.acked.load(Ordering::SeqCst)
    }

    /// Frames the guest sent so far (Ethernet, without the virtio-net header).
    pub fn tx_frames(&self) -> Vec<Vec<u8>> {
        self.inner.tx_frames.lock().expect("lock").clone()
    }
}
