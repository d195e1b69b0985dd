//! What every vhost-user frontend device shares: the connection handshake (owner, features,
//! protocol features), reading the device configuration from the backend, handing the backend
//! guest memory and the virtqueues on activation, and stopping the queues on reset.
//!
//! The devices (`vhost_blk`, `vhost_net`) only decide which features and which configuration
//! the guest sees; the hypervisor never touches the data either of them carries.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use bulkhead_channel::BackendFailure;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::virtio::{ActivateError, Activation, BackendWork, VIRTIO_F_VERSION_1};
use super::watchdog::{self, Guard, Watchdog};
use crate::lock;

/// Feature bit 30: the backend speaks the vhost-user protocol-feature extension.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio 1.x ring features every vhost-user device may pass on to the guest.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Longest a backend may take over one sequence of requests (the handshake, reading the
/// configuration, an activation, stopping the rings). Past it the connection is shut down and
/// the backend is dead for good (see [`super::watchdog`]).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why connecting to a backend failed. Every kind maps to one `BackendFailure` on the channel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("vhost-user handshake: {0}")]
    Handshake(vhost::Error),
    #[error("backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("reading the device config: {0}")]
    Config(vhost::Error),
    #[error("backend does not offer the vhost-user CONFIG protocol feature")]
    NoConfig,
    #[error("backend does not offer {0}, which this device requires")]
    MissingFeature(&'static str),
    #[error("the backend's device configuration is invalid: {0}")]
    InvalidConfig(&'static str),
    #[error("the backend did not answer within {REPLY_TIMEOUT:?}")]
    Unresponsive,
    #[error("cannot watch the backend's socket: {0}")]
    Watch(std::io::Error),
}

/// Why a backend is dead, once it is (the first reason sticks).
#[derive(Default)]
struct Dead(AtomicU8);

impl Dead {
    fn set(&self, f: BackendFailure) {
        let code = match f {
            BackendFailure::Unresponsive => 1,
            BackendFailure::MemoryTable => 2,
            _ => 3,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn get(&self) -> Option<BackendFailure> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(BackendFailure::Unresponsive),
            2 => Some(BackendFailure::MemoryTable),
            _ => Some(BackendFailure::Vring),
        }
    }
}

/// Clears a flag when dropped.
struct Clear<'a>(&'a AtomicBool);

impl Drop for Clear<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The connection proper: what only one thread at a time may talk over.
struct Link {
    frontend: Frontend,
    /// How many vrings were handed to the backend at the last activation.
    active_queues: usize,
    /// The feature bits last sent with SET_FEATURES (0: none yet).
    features_sent: u64,
    /// Set on a connection taken over in a live update: this process's `Frontend` never asked
    /// GET_FEATURES nor sent SET_FEATURES, and the vhost crate refuses SET_VRING_ENABLE until
    /// it has done both (it records the acked features as those sent *and* offered). The next
    /// request sequence first asks GET_FEATURES (a query) and, before stopping the rings,
    /// sends the features the backend already has (no change for it). See [`Link::sync`].
    unsynced: bool,
}

/// One connected vhost-user backend, after the handshake.
///
/// Every request sequence runs under a watchdog deadline ([`REPLY_TIMEOUT`]). A backend that
/// misses one, or whose connection fails, is *dead*: the connection is not used again, a
/// later activation fails at once (the transport then asks the guest for a reset), and the
/// device reports [`VhostUserConn::failed`].
///
/// Stopping the rings waits for the backend's answers, so [`VhostUserConn::reset`] does not
/// do it: it returns the work, which the caller runs after letting go of the bus lock (a
/// stuck card then delays only the thread that reset it, never the command loop or the other
/// vCPUs).
pub struct VhostUserConn {
    link: Arc<Mutex<Link>>,
    /// A duplicate of the backend's socket, for the watchdog to shut down.
    sock: Arc<UnixStream>,
    watchdog: &'static Watchdog,
    dead: Arc<Dead>,
    /// Set while the work returned by [`VhostUserConn::reset`] has not finished.
    stopping: Arc<AtomicBool>,
    /// Whether rings may have been handed to the backend since the last reset.
    started: bool,
    backend_features: u64,
    /// Protocol features both sides agreed on (`None`: no protocol-feature extension).
    protocol: Option<VhostUserProtocolFeatures>,
}

/// What a failed request sequence means: `Unresponsive` if the watchdog cut it short.
fn failure(guard: &Guard, e: vhost::Error, kind: fn(vhost::Error) -> ConnectError) -> ConnectError {
    if guard.fired() {
        ConnectError::Unresponsive
    } else {
        kind(e)
    }
}

impl Link {
    /// Brings the vhost crate's bookkeeping of a taken-over connection up to date (see
    /// [`Link::unsynced`]): GET_FEATURES, then, with `resend`, SET_FEATURES of the features
    /// the backend already has. Nothing on a connection this process made.
    fn sync(&mut self, resend: bool) -> Result<(), vhost::Error> {
        if !self.unsynced {
            return Ok(());
        }
        self.frontend.get_features()?;
        if resend && self.features_sent != 0 {
            self.frontend.set_features(self.features_sent)?;
        }
        self.unsynced = false;
        Ok(())
    }
}

impl VhostUserConn {
    /// SET_OWNER, GET_FEATURES (VERSION_1 required) and, if the backend has the extension,
    /// the protocol features in `wanted` that it offers. `queues` is how many vrings the device
    /// has (GET_QUEUE_NUM, if used, replaces it). Called on the main thread.
    pub fn handshake(
        stream: UnixStream,
        wanted: VhostUserProtocolFeatures,
        queues: u16,
    ) -> Result<Self, ConnectError> {
        let watchdog = watchdog::get().map_err(ConnectError::Watch)?;
        let sock = Arc::new(stream.try_clone().map_err(ConnectError::Watch)?);
        let mut frontend = Frontend::from_stream(stream, u64::from(queues.max(1)));
        let guard = watchdog.arm(&sock, REPLY_TIMEOUT);
        let hs = |e| failure(&guard, e, ConnectError::Handshake);
        frontend.set_owner().map_err(hs)?;
        let backend_features = frontend.get_features().map_err(hs)?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ConnectError::NotModern);
        }
        let protocol = if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend.get_protocol_features().map_err(hs)?;
            let agreed = offered & wanted;
            frontend.set_protocol_features(agreed).map_err(hs)?;
            Some(agreed)
        } else {
            None
        };
        drop(guard);
        Ok(VhostUserConn {
            link: Arc::new(Mutex::new(Link {
                frontend,
                active_queues: 0,
                features_sent: 0,
                unsynced: false,
            })),
            sock,
            watchdog,
            dead: Arc::default(),
            stopping: Arc::default(),
            started: false,
            backend_features,
            protocol,
        })
    }

    /// Takes over a connection a previous hypervisor process made (live update): `stream` is
    /// the same connection (received over SCM_RIGHTS), `st` what the handshake and the last
    /// activation left. Sends the backend nothing: it keeps running its rings as they are.
    /// `queues` is how many vrings the device has. Called on the main thread.
    pub fn adopt(
        stream: UnixStream,
        st: &crate::live_update::state::VhostUserState,
        queues: u16,
    ) -> Result<Self, ConnectError> {
        let watchdog = watchdog::get().map_err(ConnectError::Watch)?;
        let sock = Arc::new(stream.try_clone().map_err(ConnectError::Watch)?);
        let frontend = Frontend::from_stream(stream, u64::from(queues.max(1)));
        let active_queues = usize::try_from(st.active_queues).unwrap_or(0);
        Ok(VhostUserConn {
            link: Arc::new(Mutex::new(Link {
                frontend,
                active_queues,
                features_sent: st.acked_features,
                unsynced: true,
            })),
            sock,
            watchdog,
            dead: Arc::default(),
            stopping: Arc::default(),
            started: st.started,
            backend_features: st.backend_features,
            protocol: st
                .protocol
                .map(VhostUserProtocolFeatures::from_bits_truncate),
        })
    }

    /// What a live update hands over, and the connection's fd (which rides beside the state):
    /// `None` for a dead backend, one whose rings are being stopped, or one another thread is
    /// talking to (the vCPUs are parked, so that is only ever a reset's stopping work).
    pub fn handover_state(
        &self,
    ) -> Option<(
        crate::live_update::state::VhostUserState,
        std::os::fd::RawFd,
    )> {
        use std::os::fd::AsRawFd;
        if self.failed().is_some() || !self.settled() {
            return None;
        }
        let link = match self.link.try_lock() {
            Ok(l) => l,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let st = crate::live_update::state::VhostUserState {
            backend_features: self.backend_features,
            protocol: self.protocol.map(|p| p.bits()),
            acked_features: link.features_sent,
            active_queues: u32::try_from(link.active_queues).unwrap_or(u32::MAX),
            started: self.started,
        };
        Some((st, self.sock.as_raw_fd()))
    }

    /// The virtio feature bits the backend offered (unfiltered).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Whether protocol feature `f` was agreed.
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol.is_some_and(|p| p.contains(f))
    }

    /// Why the backend is dead, if it is: it stopped answering, or its connection failed.
    pub fn failed(&self) -> Option<BackendFailure> {
        self.dead.get()
    }

    /// Whether no ring-stopping work is in flight.
    pub fn settled(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst)
    }

    /// GET_QUEUE_NUM (needs the MQ protocol feature). Called on the main thread, right after
    /// the handshake.
    pub fn queue_num(&mut self) -> Result<u64, ConnectError> {
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        lock(&self.link)
            .frontend
            .get_queue_num()
            .map_err(|e| failure(&guard, e, ConnectError::Handshake))
    }

    /// GET_CONFIG of the first `len` bytes of the device configuration (needs the CONFIG
    /// protocol feature; the backend must answer exactly `len` bytes). Called on the main
    /// thread, right after the handshake.
    pub fn read_config(&mut self, len: u32) -> Result<Vec<u8>, ConnectError> {
        if !self.has_protocol(VhostUserProtocolFeatures::CONFIG) {
            return Err(ConnectError::NoConfig);
        }
        let want = usize::try_from(len).unwrap_or(0);
        let zeros = vec![0u8; want];
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        let (_, payload) = lock(&self.link)
            .frontend
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &zeros)
            .map_err(|e| failure(&guard, e, ConnectError::Config))?;
        let mut config = zeros;
        let n = payload.len().min(want);
        config[..n].copy_from_slice(&payload[..n]);
        Ok(config)
    }

    fn host_addr(act: &Activation<'_>, gpa: u64) -> Result<u64, ActivateError> {
        act.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| ActivateError::NotInRam(gpa))
    }

    /// Hands the backend the features the driver acked (only bits the backend offered), the
    /// guest memory table (the memfd) and every ready queue, with its kick (ioeventfd) and call
    /// (irqfd) eventfds, and enables the rings. These requests have no replies (REPLY_ACK is
    /// never agreed), so this only waits if the backend stopped reading, and then no longer
    /// than [`REPLY_TIMEOUT`]. A dead backend, or one whose rings are still being stopped,
    /// is refused at once.
    pub fn activate(&mut self, act: &Activation<'_>) -> Result<(), ActivateError> {
        if self.failed().is_some() {
            return Err(ActivateError::BackendDead);
        }
        let mut link = match self.link.try_lock() {
            Ok(l) => l,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(ActivateError::BackendBusy),
        };
        self.started = true;
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        let r = self.hand_over(&mut link, act, None);
        if let Err(ActivateError::Backend(e)) = &r {
            self.dead.set(if guard.fired() {
                BackendFailure::Unresponsive
            } else {
                BackendFailure::Vring
            });
            tracing::warn!(error = %e, timed_out = guard.fired(), "vhost-user backend failed during activation: device dead");
        }
        r
    }

    /// Takes over a running device from a backend that died: the same hand-over as
    /// [`VhostUserConn::activate`], but each ring starts at `bases[i]` (where the previous
    /// backend left it) instead of 0, and every ring is kicked and its interrupt raised once
    /// afterwards (buffers the guest posted while no backend ran are picked up; used buffers
    /// the dead backend returned without an interrupt are seen). Spurious kicks and
    /// interrupts are harmless. Called on the main thread, on a fresh connection that no
    /// guest access can reach yet, under the watchdog's bound.
    pub fn resume(&mut self, act: &Activation<'_>, bases: &[u16]) -> Result<(), ActivateError> {
        if bases.len() < act.queues.len() {
            return Err(ActivateError::BadQueue(bases.len()));
        }
        let mut link = lock(&self.link);
        self.started = true;
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        let r = self.hand_over(&mut link, act, Some(bases));
        if let Err(ActivateError::Backend(e)) = &r {
            self.dead.set(if guard.fired() {
                BackendFailure::Unresponsive
            } else {
                BackendFailure::Vring
            });
            tracing::warn!(error = %e, timed_out = guard.fired(), "vhost-user backend failed while taking over the rings");
        }
        r?;
        for i in 0..act.queues.len() {
            if let Some(k) = act.kicks.get(i) {
                let _ = k.write(1);
            }
            if let Some(c) = act.irqs.get(i) {
                let _ = c.write(1);
            }
        }
        Ok(())
    }

    /// Card update: stops every ring handed to the backend (disable, then GET_VRING_BASE,
    /// which a block card answers only once every request it took from that ring is in the
    /// used ring) and returns each ring's position, under the watchdog's bound. The rings are
    /// no longer the backend's afterwards; [`VhostUserConn::resume`] hands them back (a
    /// replacement that failed). A backend that fails here is dead.
    pub fn stop_for_replace(&mut self) -> Result<Vec<u16>, ActivateError> {
        if self.failed().is_some() {
            return Err(ActivateError::BackendDead);
        }
        let mut link = match self.link.try_lock() {
            Ok(l) => l,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(ActivateError::BackendBusy),
        };
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        let n = link.active_queues;
        let r = (|| -> Result<Vec<u16>, vhost::Error> {
            link.sync(true)?;
            let mut bases = Vec::with_capacity(n);
            for i in 0..n {
                if self.protocol.is_some() {
                    link.frontend.set_vring_enable(i, false)?;
                }
                let base = link.frontend.get_vring_base(i)?;
                bases.push(u16::try_from(base).unwrap_or(u16::MAX));
            }
            Ok(bases)
        })();
        match r {
            Ok(bases) => {
                link.active_queues = 0;
                self.started = false;
                Ok(bases)
            }
            Err(e) => {
                self.dead.set(if guard.fired() {
                    BackendFailure::Unresponsive
                } else {
                    BackendFailure::Vring
                });
                tracing::warn!(error = %e, timed_out = guard.fired(), "vhost-user backend failed to stop its rings for a replacement: device dead");
                Err(ActivateError::Backend(e))
            }
        }
    }

    /// A request with a reply (GET_FEATURES) after requests without one: the backend answers
    /// only once it processed everything sent before, so a backend that failed one of them
    /// (and closed the connection) is found here instead of silently holding no rings.
    /// Bounded by the watchdog; a failure makes the backend dead.
    pub fn barrier(&mut self) -> Result<(), ActivateError> {
        let link = lock(&self.link);
        let guard = self.watchdog.arm(&self.sock, REPLY_TIMEOUT);
        if let Err(e) = link.frontend.get_features() {
            self.dead.set(if guard.fired() {
                BackendFailure::Unresponsive
            } else {
                BackendFailure::Vring
            });
            tracing::warn!(error = %e, timed_out = guard.fired(), "vhost-user backend failed after taking the rings");
            return Err(ActivateError::Backend(e));
        }
        Ok(())
    }

    fn hand_over(
        &self,
        link: &mut Link,
        act: &Activation<'_>,
        bases: Option<&[u16]>,
    ) -> Result<(), ActivateError> {
        let mut features = act.acked_features & self.backend_features;
        if self.protocol.is_some() {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        link.sync(false)?;
        link.frontend.set_features(features)?;
        link.features_sent = features;
        let regions: Vec<VhostUserMemoryRegionInfo> = act
            .memfd_regions
            .iter()
            .map(|(gpa, size, off)| {
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa.0,
                    memory_size: *size as u64,
                    userspace_addr: Self::host_addr(act, gpa.0)?,
                    mmap_offset: *off,
                    mmap_handle: act.memfd,
                })
            })
            .collect::<Result<_, ActivateError>>()?;
        link.frontend.set_mem_table(&regions)?;
        for (i, q) in act.queues.iter().enumerate() {
            let cfg = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: Self::host_addr(act, q.desc)?,
                used_ring_addr: Self::host_addr(act, q.used)?,
                avail_ring_addr: Self::host_addr(act, q.avail)?,
                log_addr: None,
            };
            link.frontend.set_vring_num(i, q.size)?;
            link.frontend.set_vring_addr(i, &cfg)?;
            let base = bases.and_then(|b| b.get(i)).copied().unwrap_or(0);
            link.frontend.set_vring_base(i, base)?;
            let call = act.irqs.get(i).ok_or(ActivateError::BadQueue(i))?;
            link.frontend.set_vring_call(i, call)?;
            let kick = act.kicks.get(i).ok_or(ActivateError::BadQueue(i))?;
            link.frontend.set_vring_kick(i, kick)?;
            // Recorded per ring, so that `reset` also stops a partly set-up device.
            link.active_queues = i + 1;
            if self.protocol.is_some() {
                link.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }

    /// The work that stops every ring handed to the backend (disable, then GET_VRING_BASE,
    /// which the backend answers once it stopped processing that ring), or `None` if no ring
    /// was handed over since the last reset. The caller runs it once it holds no lock another
    /// thread needs; it waits at most [`REPLY_TIMEOUT`], and a backend that misses that is dead.
    pub fn reset(&mut self) -> Option<BackendWork> {
        if !std::mem::take(&mut self.started) {
            return None;
        }
        let link = self.link.clone();
        let sock = self.sock.clone();
        let dead = self.dead.clone();
        let stopping = self.stopping.clone();
        stopping.store(true, Ordering::SeqCst);
        let watchdog = self.watchdog;
        let protocol = self.protocol.is_some();
        Some(BackendWork::new(move || {
            let _done = Clear(&stopping);
            stop_rings(&link, watchdog, &sock, &dead, protocol);
            dead.get()
        }))
    }
}

fn stop_rings(
    link: &Mutex<Link>,
    watchdog: &'static Watchdog,
    sock: &Arc<UnixStream>,
    dead: &Dead,
    protocol: bool,
) {
    let mut link = lock(link);
    let n = std::mem::take(&mut link.active_queues);
    if n == 0 || dead.get().is_some() {
        return;
    }
    let guard = watchdog.arm(sock, REPLY_TIMEOUT);
    // A connection taken over in a live update (see `Link::unsynced`).
    if let Err(e) = link.sync(true) {
        dead.set(if guard.fired() {
            BackendFailure::Unresponsive
        } else {
            BackendFailure::Vring
        });
        tracing::warn!(error = %e, "vhost-user backend failed a features query: device dead");
        return;
    }
    for i in 0..n {
        let r = if protocol {
            link.frontend.set_vring_enable(i, false)
        } else {
            Ok(())
        };
        if let Err(e) = r.and_then(|()| link.frontend.get_vring_base(i).map(|_| ())) {
            if guard.fired() {
                dead.set(BackendFailure::Unresponsive);
                tracing::warn!(ring = i, timeout = ?REPLY_TIMEOUT, "vhost-user backend did not stop its ring in time: device dead");
            } else {
                dead.set(BackendFailure::Vring);
                tracing::warn!(ring = i, error = %e, "vhost-user backend failed to stop its ring: device dead");
            }
            return;
        }
    }
}
