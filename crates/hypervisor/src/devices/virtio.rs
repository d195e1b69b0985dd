//! What every virtio transport shares: the device trait, the queue registers the driver
//! writes, and the device-status state machine (virtio 1.x section 2.1 and 3.1).
//!
//! The transports (virtio-mmio for devices present at boot, virtio-pci for block devices that
//! can be hot-plugged) only map their register layouts onto [`VirtioCore`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bulkhead_channel::BackendFailure;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const INT_VRING: u32 = 1;

/// Where a virtqueue lives in guest memory, as the driver wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueRegs {
    /// Checks size and ring placement against guest RAM (virtio 1.x split ring).
    pub fn is_valid(&self, mem: &GuestMemoryMmap) -> bool {
        let n = u64::from(self.size);
        self.size != 0
            && self.size <= self.max_size
            && self.size.is_power_of_two()
            && self.desc.is_multiple_of(16)
            && self.avail.is_multiple_of(2)
            && self.used.is_multiple_of(4)
            && mem.check_range(
                GuestAddress(self.desc),
                usize::try_from(16 * n).unwrap_or(usize::MAX),
            )
            && mem.check_range(
                GuestAddress(self.avail),
                usize::try_from(6 + 2 * n).unwrap_or(usize::MAX),
            )
            && mem.check_range(
                GuestAddress(self.used),
                usize::try_from(6 + 8 * n).unwrap_or(usize::MAX),
            )
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid")]
    BadQueue(usize),
    #[error("vhost-user backend: {0}")]
    Backend(#[from] vhost::Error),
    #[error("guest address {0:#x} is not in RAM")]
    NotInRam(u64),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("the vhost-user backend is dead (it stopped answering or its connection failed)")]
    BackendDead,
    #[error("the vhost-user backend's rings are still being stopped")]
    BackendBusy,
}

/// Work on a device's backend that waits for the backend's answers (stopping a vhost-user
/// backend's rings). The transport does not run it: whoever drove the transport takes it out
/// ([`VirtioCore::take_backend_work`]) and runs it after letting go of the locks other threads
/// need. Bounded by the backend watchdog.
pub struct BackendWork(Box<dyn FnOnce() -> Option<BackendFailure> + Send>);

impl BackendWork {
    /// Work that answers why the backend is dead, if it is, once it is done.
    pub fn new(f: impl FnOnce() -> Option<BackendFailure> + Send + 'static) -> Self {
        BackendWork(Box::new(f))
    }

    /// Runs the work: `Some` if the backend is dead.
    pub fn run(self) -> Option<BackendFailure> {
        (self.0)()
    }

    /// `self`, then `next`.
    pub fn then(self, next: BackendWork) -> BackendWork {
        BackendWork::new(move || {
            let first = self.run();
            next.run().or(first)
        })
    }
}

impl std::fmt::Debug for BackendWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendWork")
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub memfd_regions: &'a [(GuestAddress, usize, u64)],
    pub memfd: std::os::fd::RawFd,
    pub queues: &'a [QueueRegs],
    pub acked_features: u64,
    /// The interrupt of each ready queue (the same eventfd for every queue on virtio-mmio; one
    /// per MSI-X vector on virtio-pci).
    pub irqs: &'a [Arc<EventFd>],
    pub irq_status: &'a Arc<AtomicU32>,
    pub kicks: &'a [EventFd],
}

/// A device behind the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, act: Activation<'_>) -> Result<(), ActivateError>;
    /// The driver wrote QueueNotify (only for devices served inside the VMM).
    fn notify(&mut self, _queue: u16, _mem: &GuestMemoryMmap) {}
    /// The driver reset the device. Work that must wait for a backend is returned, not done
    /// (see [`BackendWork`]).
    fn reset(&mut self) -> Option<BackendWork>;
    /// Why the device's backend failed for good, if it did (a vhost-user backend that
    /// stopped answering).
    fn failed(&self) -> Option<BackendFailure> {
        None
    }
    /// Whether no backend work a reset returned is still running (until then the driver's
    /// reset is not over).
    fn settled(&self) -> bool {
        true
    }
    /// vhost-user devices signal the guest directly through the irqfd, so the transport
    /// cannot know which interrupt cause was raised: it always reports "used buffer".
    fn interrupt_always_vring(&self) -> bool {
        false
    }
    /// Whether queue notifications go to ioeventfds (handled outside the VMM).
    fn wants_ioeventfd(&self) -> bool {
        false
    }
    /// (next available, next used) of each active queue, for a live update (devices served
    /// inside the VMM; a vhost-user device's positions are its backend's).
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
    /// Puts back the positions [`VirtioDevice::queue_positions`] gave in the old process,
    /// after the device was activated again with the same queues.
    fn set_queue_positions(&mut self, _positions: &[(u16, u16)]) {}
    /// For a vhost-user device: what a live update hands over to the new process, or `None`
    /// if it cannot be handed over now (its backend is dead or its rings are being stopped).
    /// Devices served inside the VMM answer `None`.
    fn handover(&self) -> Option<DeviceHandover> {
        None
    }
    /// Card update, on the device being replaced: stops every ring handed to its backend and
    /// returns each ring's position as the backend gives it (GET_VRING_BASE). `None`: the
    /// device has no backend rings to move.
    fn stop_for_replace(&mut self) -> Option<Result<Vec<u16>, ActivateError>> {
        None
    }
    /// Card update: takes over (or takes back) a running device's rings at `bases` (see
    /// `VhostUserConn::resume`). Devices without a backend refuse.
    fn resume_at(&mut self, _act: &Activation<'_>, _bases: &[u16]) -> Result<(), ActivateError> {
        Err(ActivateError::BackendDead)
    }
}

/// What a vhost-user device hands over in a live update (see
/// [`crate::live_update::state::CardState`]).
pub struct DeviceHandover {
    pub vhost: crate::live_update::state::VhostUserState,
    /// The device configuration as the backend reported it (what the guest reads).
    pub config: Vec<u8>,
    pub read_only: bool,
    /// The vhost-user connection; it stays owned by the device.
    pub conn_fd: std::os::fd::RawFd,
}

/// What a status write asks the transport to do.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing beyond recording the new status.
    None,
    /// The driver wrote 0: the device was reset.
    Reset,
    /// The driver set DRIVER_OK with valid queues: wire interrupts and notifications, then call
    /// [`VirtioCore::activate`].
    Activate,
}

/// Device status, feature negotiation and queue registers of one virtio device.
pub struct VirtioCore {
    pub device: Box<dyn VirtioDevice>,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegs>,
    pub irq_status: Arc<AtomicU32>,
    pub config_generation: u32,
    /// One ioeventfd per queue for devices served outside the VMM.
    pub kicks: Vec<EventFd>,
    active: bool,
    bad_accesses: Arc<AtomicU64>,
    /// Backend work left by the last reset, for the caller to run outside its locks.
    backend_work: Option<BackendWork>,
    /// Counts resets and activations: a backend replacement prepared outside the locks is
    /// only swapped in if nothing of the kind happened meanwhile.
    epoch: u64,
}

/// What replacing a running device's backend in place needs, taken under the bus lock and
/// used after it is let go (see [`VirtioCore::backend_state`]).
pub struct BackendState {
    /// [`VirtioCore`]'s epoch when this was taken.
    pub epoch: u64,
    /// Whether the driver has the device running (DRIVER_OK, activated).
    pub active: bool,
    /// Whether no ring-stopping work of the old backend is still running.
    pub settled: bool,
    pub acked_features: u64,
    /// The first bytes of the device configuration, as the guest reads them.
    pub config: Vec<u8>,
    /// The ready queues, in order.
    pub queues: Vec<QueueRegs>,
    /// Each ready queue's interrupt eventfd.
    pub irqs: Vec<Arc<EventFd>>,
    /// Duplicates of each queue's ioeventfd (the same eventfds KVM signals).
    pub kicks: Vec<EventFd>,
}

/// Duplicates an eventfd with `fcntl(F_DUPFD_CLOEXEC)` (the sandbox allows `fcntl`, not `dup`).
fn dup_eventfd(e: &EventFd) -> std::io::Result<EventFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1; it touches no memory.
    let fd = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh duplicate of an eventfd, owned by nobody else.
    Ok(unsafe { EventFd::from_raw_fd(fd) })
}

impl VirtioCore {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bad_accesses: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .into_iter()
            .map(|max_size| QueueRegs {
                max_size,
                ..Default::default()
            })
            .collect();
        let kicks = if device.wants_ioeventfd() {
            queues
                .iter()
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(VirtioCore {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            irq_status: Arc::new(AtomicU32::new(0)),
            config_generation: 0,
            kicks,
            active: false,
            bad_accesses,
            backend_work: None,
            epoch: 0,
        })
    }

    /// A core around a device taken over in a live update: the registers of the old process
    /// (`st`), the same kick eventfds, and the device active if it was, without activating it
    /// again (its backend keeps running the rings). `None` if `st` does not fit the device.
    pub fn adopt(
        device: Box<dyn VirtioDevice>,
        bad_accesses: Arc<AtomicU64>,
        st: &crate::live_update::state::MmioState,
        kicks: Vec<EventFd>,
    ) -> Option<Self> {
        let max = device.queue_max_sizes();
        let fits = st.device_type == device.device_type()
            && device.wants_ioeventfd()
            && st.queues.len() == max.len()
            && kicks.len() == max.len()
            && st.queues.iter().zip(&max).all(|(q, m)| q.max_size == *m);
        if !fits {
            return None;
        }
        Some(VirtioCore {
            device,
            status: st.status,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            acked_features: st.acked_features,
            queue_sel: st.queue_sel,
            queues: st.queues.clone(),
            irq_status: Arc::new(AtomicU32::new(st.irq_status)),
            config_generation: st.config_generation,
            kicks,
            active: st.active,
            bad_accesses,
            backend_work: None,
            epoch: 0,
        })
    }

    /// Counts a guest access that made no sense.
    pub fn bad(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    /// The queue selected by `queue_sel`.
    pub fn queue(&mut self) -> Option<&mut QueueRegs> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    /// Whether the device was activated and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The 32 feature bits selected by `device_features_sel`.
    pub fn device_features_word(&self) -> u32 {
        let f = self.device.features() | VIRTIO_F_VERSION_1;
        match self.device_features_sel {
            0 => crate::bits::lo32(f),
            1 => crate::bits::hi32(f),
            _ => 0,
        }
    }

    /// Between DRIVER and FEATURES_OK: the driver may write features.
    pub fn features_phase(&self) -> bool {
        self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER
    }

    /// Between FEATURES_OK and DRIVER_OK: the driver may set up queues.
    pub fn queue_phase(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    /// The driver acks 32 feature bits (selected by `driver_features_sel`); bits the device did
    /// not offer are dropped.
    pub fn write_driver_features(&mut self, v: u32) {
        if !self.features_phase() {
            self.bad();
            return;
        }
        self.epoch = self.epoch.wrapping_add(1);
        let offered = self.device.features() | VIRTIO_F_VERSION_1;
        match self.driver_features_sel {
            0 => set_low(&mut self.acked_features, v & crate::bits::lo32(offered)),
            1 => set_high(&mut self.acked_features, v & crate::bits::hi32(offered)),
            _ => self.bad(),
        }
    }

    /// The driver wrote the device status register.
    pub fn write_status(&mut self, v: u32, mem: &GuestMemoryMmap) -> StatusAction {
        if v == 0 {
            self.reset();
            return StatusAction::Reset;
        }
        // Status bits only ever get added by the driver (virtio 1.x 2.1.2).
        if v & self.status != self.status {
            self.bad();
            return StatusAction::None;
        }
        let newly = v & !self.status;
        self.status = v;
        if newly & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: refuse the feature set.
            self.status &= !STATUS_FEATURES_OK;
            return StatusAction::None;
        }
        if newly & STATUS_DRIVER_OK != 0 {
            if let Some(bad) = self.ready_queues().iter().position(|q| !q.is_valid(mem)) {
                tracing::warn!(queue = bad, "guest set up an invalid virtqueue");
                self.bad();
                self.status |= STATUS_NEEDS_RESET;
                return StatusAction::None;
            }
            return StatusAction::Activate;
        }
        StatusAction::None
    }

    /// The queues the driver marked ready, in order.
    pub fn ready_queues(&self) -> Vec<QueueRegs> {
        self.queues.iter().copied().filter(|q| q.ready).collect()
    }

    /// Hands the ready queues to the device; on failure the device asks for a reset.
    pub fn activate(&mut self, ram: &GuestRam, irqs: &[Arc<EventFd>]) -> bool {
        let ready = self.ready_queues();
        let act = Activation {
            mem: &ram.mem,
            memfd_regions: &ram.regions,
            memfd: std::os::fd::AsRawFd::as_raw_fd(&ram.memfd),
            queues: &ready,
            acked_features: self.acked_features,
            irqs,
            irq_status: &self.irq_status,
            kicks: &self.kicks,
        };
        self.epoch = self.epoch.wrapping_add(1);
        match self.device.activate(act) {
            Ok(()) => {
                self.active = true;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "device activation failed");
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                false
            }
        }
    }

    /// What replacing the backend in place needs (see [`BackendState`]); `irqs` are the
    /// transport's interrupt eventfds, one per queue as given to [`VirtioCore::activate`].
    pub fn backend_state(
        &self,
        irqs: &[Arc<EventFd>],
        config_len: usize,
    ) -> std::io::Result<BackendState> {
        let mut config = vec![0u8; config_len];
        self.device.read_config(0, &mut config);
        let active = self.active;
        let (queues, irqs, kicks) = if active {
            let kicks = self
                .kicks
                .iter()
                .map(dup_eventfd)
                .collect::<std::io::Result<Vec<_>>>()?;
            (self.ready_queues(), irqs.to_vec(), kicks)
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        Ok(BackendState {
            epoch: self.epoch,
            active,
            settled: self.device.settled(),
            acked_features: self.acked_features,
            config,
            queues,
            irqs,
            kicks,
        })
    }

    /// Puts `device` in place of the current one if nothing reset or activated the device
    /// since [`VirtioCore::backend_state`] returned `epoch`; gives back the old device, or
    /// `device` itself when refused.
    pub fn replace_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
        epoch: u64,
    ) -> Result<Box<dyn VirtioDevice>, Box<dyn VirtioDevice>> {
        if epoch != self.epoch || !self.device.settled() || self.backend_work.is_some() {
            return Err(device);
        }
        self.epoch = self.epoch.wrapping_add(1);
        // A device that asked for a reset because its dead backend refused an activation
        // keeps asking: the guest driver resets it and the new backend gets the rings then.
        Ok(std::mem::replace(&mut self.device, device))
    }

    /// Backend work the last reset left (see [`BackendWork`]). The guest's access that caused
    /// it must not complete before it ran: run it on the same thread before re-entering the
    /// guest.
    pub fn take_backend_work(&mut self) -> Option<BackendWork> {
        self.backend_work.take()
    }

    /// Whether a reset left backend work nobody has run yet.
    pub fn has_backend_work(&self) -> bool {
        self.backend_work.is_some()
    }

    /// The transport-independent state of an in-VMM device for a live update.
    pub fn state(&self) -> crate::live_update::state::MmioState {
        crate::live_update::state::MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            irq_status: self.irq_status.load(Ordering::SeqCst),
            active: self.active,
            queues: self.queues.clone(),
            positions: if self.active {
                self.device.queue_positions()
            } else {
                Vec::new()
            },
        }
    }

    /// Puts back a state [`VirtioCore::state`] gave in the old process: registers, then (for
    /// an active device) activation with the same queues and interrupts, then the queue
    /// positions. `false` if it does not fit this device.
    pub fn restore(
        &mut self,
        st: &crate::live_update::state::MmioState,
        ram: &GuestRam,
        irqs: &[Arc<EventFd>],
    ) -> bool {
        let fits = st.device_type == self.device.device_type()
            && st.queues.len() == self.queues.len()
            && st
                .queues
                .iter()
                .zip(&self.queues)
                .all(|(a, b)| a.max_size == b.max_size);
        if !fits {
            return false;
        }
        self.status = st.status;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.acked_features = st.acked_features;
        self.queue_sel = st.queue_sel;
        self.config_generation = st.config_generation;
        self.queues.clone_from(&st.queues);
        if st.active {
            if !self.activate(ram, irqs) {
                return false;
            }
            self.device.set_queue_positions(&st.positions);
        }
        self.irq_status.store(st.irq_status, Ordering::SeqCst);
        true
    }

    /// Device reset: every register returns to its initial value; stopping the backend is
    /// left as [`VirtioCore::take_backend_work`].
    pub fn reset(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if let Some(w) = self.device.reset() {
            self.backend_work = Some(match self.backend_work.take() {
                Some(earlier) => earlier.then(w),
                None => w,
            });
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs {
                max_size: q.max_size,
                ..Default::default()
            };
        }
        self.irq_status.store(0, Ordering::SeqCst);
    }
}

/// Replaces the low 32 bits of `v`.
pub fn set_low(v: &mut u64, lo: u32) {
    *v = (*v & 0xffff_ffff_0000_0000) | u64::from(lo);
}

/// Replaces the high 32 bits of `v`.
pub fn set_high(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_rng::VirtioRng;

    fn core() -> VirtioCore {
        VirtioCore::new(Box::new(VirtioRng::new()), Arc::default()).expect("core")
    }

    /// A backend replacement prepared outside the bus lock is swapped in only if the driver did
    /// not reset the device, activate it or ack features meanwhile.
    #[test]
    fn a_replacement_is_refused_if_the_driver_moved_meanwhile() {
        let mut c = core();
        let st = c.backend_state(&[], 4).expect("state");
        assert!(!st.active && st.settled && st.queues.is_empty());
        assert!(c
            .replace_device(Box::new(VirtioRng::new()), st.epoch)
            .is_ok());
        // The swap itself moves the epoch: the same state cannot be used twice.
        assert!(c
            .replace_device(Box::new(VirtioRng::new()), st.epoch)
            .is_err());

        let st = c.backend_state(&[], 4).expect("state");
        c.reset();
        assert!(c
            .replace_device(Box::new(VirtioRng::new()), st.epoch)
            .is_err());

        let st = c.backend_state(&[], 4).expect("state");
        c.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        c.write_driver_features(0);
        assert!(c
            .replace_device(Box::new(VirtioRng::new()), st.epoch)
            .is_err());
        let st = c.backend_state(&[], 4).expect("state");
        assert!(c
            .replace_device(Box::new(VirtioRng::new()), st.epoch)
            .is_ok());
    }
}
