//! The virtio-pci transport (virtio 1.x "modern" only, no legacy I/O BAR) with MSI-X, for
//! block and net devices that can be hot-plugged into a root port's slot.
//!
//! One 32-bit memory BAR holds every structure:
//!
//! | BAR offset | structure |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications, 4 bytes per queue |
//! | 0x4000 | MSI-X table (16 bytes per vector) |
//! | 0x5000 | MSI-X pending bits |
//!
//! Queue notifications go to ioeventfds registered at the BAR address the guest assigned, and
//! each queue's interrupt is an irqfd on a GSI routed to the MSI-X vector the driver chose, so
//! I/O flows between the guest and the vhost-user backend without the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use super::config_space::ConfigSpace;
use super::pci::PciDevice;
use super::virtio::{set_high, set_low, StatusAction, VirtioCore, VirtioDevice, STATUS_DRIVER_OK};
use crate::irq::{MsiMessage, MsiRouting};
use crate::live_update::state::{
    CardKind, CardState, MsixEntryState, VIRTIO_ID_BLOCK, VIRTIO_ID_NET,
};
use crate::memory::GuestRam;
use crate::Error;
use std::os::fd::RawFd;

const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern virtio-pci device ids are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
/// Network controller, Ethernet.
pub const CLASS_NETWORK_ETHERNET: u32 = 0x02_00_00;
/// Mass storage, "other".
pub const CLASS_STORAGE_OTHER: u32 = 0x01_80_00;
/// "Device does not fit any defined class".
pub const CLASS_UNCLASSIFIED: u32 = 0xff_00_00;

/// The PCI class code a virtio device of `device_type` reports (what QEMU reports too).
pub fn class_for(device_type: u16) -> u32 {
    match device_type {
        1 => CLASS_NETWORK_ETHERNET,
        2 => CLASS_STORAGE_OTHER,
        _ => CLASS_UNCLASSIFIED,
    }
}

/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = COMMON_BYTES as u64;
const COMMON_BYTES: usize = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x100;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// Most MSI-X vectors (queues + 1 for configuration changes).
const MAX_VECTORS: usize = 65;
const NO_VECTOR: u16 = 0xffff;
/// How long a failed live update waits for the new process's VM to let go of a card's
/// interrupt eventfd before binding it here again.
const REBIND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

// Capability offsets in configuration space.
const CAP_COMMON: u8 = 0x40;
const CAP_NOTIFY: u8 = 0x50;
const CAP_ISR: u8 = 0x68;
const CAP_DEVICE: u8 = 0x78;
const CAP_MSIX: u8 = 0x88;

const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;

#[derive(Clone, Copy, Debug, Default)]
struct MsixEntry {
    address: u64,
    data: u32,
    masked: bool,
}

/// What is registered with KVM while the device is active.
struct Wiring {
    notify_base: u64,
    irqfds: Vec<(usize, u32)>,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    /// The id the controller attached it under.
    pub id: String,
    pub core: VirtioCore,
    cfg: ConfigSpace,
    msix: Vec<MsixEntry>,
    msix_config: u16,
    queue_vectors: Vec<u16>,
    gsi_base: u32,
    calls: Vec<Arc<EventFd>>,
    wiring: Option<Wiring>,
    touched: bool,
    bad_accesses: Arc<AtomicU64>,
}

fn vendor_cap(cfg: &mut ConfigSpace, at: u8, next: u8, kind: u8, offset: u64, len: u64) {
    let at = usize::from(at);
    let cap_len: u8 = if kind == CFG_TYPE_NOTIFY { 20 } else { 16 };
    cfg.set(at, &[0x09, next, cap_len, kind, 0, 0, 0, 0]);
    cfg.set_u32(at + 8, u32::try_from(offset).unwrap_or(0));
    cfg.set_u32(at + 12, u32::try_from(len).unwrap_or(0));
}

impl VirtioPciDevice {
    pub fn new(
        id: &str,
        device: Box<dyn VirtioDevice>,
        router: &dyn MsiRouting,
        bad_accesses: Arc<AtomicU64>,
    ) -> Result<Self, Error> {
        let core = VirtioCore::new(device, bad_accesses.clone()).map_err(Error::EventFd)?;
        let nq = core.queues.len();
        let nvec = u16::try_from((nq + 1).min(MAX_VECTORS)).map_err(|_| Error::TooManyQueues)?;
        let gsi_base = router.allocate(u32::from(nvec))?;
        let calls = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::EventFd)?;
        Self::build(id, core, gsi_base, calls, bad_accesses)
    }

    /// The card around `core`: configuration space and MSI-X table in their reset state,
    /// vectors routed from `gsi_base`, `calls` the queues' interrupt eventfds.
    fn build(
        id: &str,
        core: VirtioCore,
        gsi_base: u32,
        calls: Vec<Arc<EventFd>>,
        bad_accesses: Arc<AtomicU64>,
    ) -> Result<Self, Error> {
        let kind = core.device.device_type();
        let device_type = u16::try_from(kind)
            .ok()
            .filter(|t| *t < 0x40)
            .ok_or(Error::DeviceType(kind))?;
        let nq = core.queues.len();
        let vectors = (nq + 1).min(MAX_VECTORS);
        let nvec = u16::try_from(vectors).map_err(|_| Error::TooManyQueues)?;

        let mut c = ConfigSpace::default();
        c.header(
            VENDOR_VIRTIO,
            DEVICE_ID_BASE + device_type,
            class_for(device_type),
            1,
            0x00,
        );
        // BAR0: 32-bit, non-prefetchable memory; the write mask makes sizing work.
        let bar_mask = u32::try_from(!(BAR_SIZE - 1) & 0xffff_fff0).unwrap_or(0);
        c.writable(0x10, &bar_mask.to_le_bytes());
        c.set_u16(0x2c, VENDOR_VIRTIO);
        c.set_u16(0x2e, 0x0040 + device_type);
        c.set(0x34, &[CAP_COMMON]);
        vendor_cap(
            &mut c,
            CAP_COMMON,
            CAP_NOTIFY,
            CFG_TYPE_COMMON,
            COMMON,
            COMMON_LEN,
        );
        let notify_len = NOTIFY_MULTIPLIER * u64::try_from(nq).unwrap_or(0);
        vendor_cap(
            &mut c,
            CAP_NOTIFY,
            CAP_ISR,
            CFG_TYPE_NOTIFY,
            NOTIFY,
            notify_len,
        );
        c.set_u32(
            usize::from(CAP_NOTIFY) + 16,
            u32::try_from(NOTIFY_MULTIPLIER).unwrap_or(4),
        );
        vendor_cap(&mut c, CAP_ISR, CAP_DEVICE, CFG_TYPE_ISR, ISR, 4);
        vendor_cap(
            &mut c,
            CAP_DEVICE,
            CAP_MSIX,
            CFG_TYPE_DEVICE,
            DEVICE_CFG,
            DEVICE_CFG_LEN,
        );
        // MSI-X: table and PBA in BAR0; enable and function-mask bits writable.
        let m = usize::from(CAP_MSIX);
        c.set(m, &[0x11, 0x00]);
        c.set_u16(m + 2, nvec - 1);
        c.writable(m + 3, &[0xc0]);
        c.set_u32(m + 4, u32::try_from(MSIX_TABLE).unwrap_or(0));
        c.set_u32(m + 8, u32::try_from(MSIX_PBA).unwrap_or(0));

        Ok(VirtioPciDevice {
            id: id.to_owned(),
            core,
            cfg: c,
            msix: vec![
                MsixEntry {
                    masked: true,
                    ..Default::default()
                };
                vectors
            ],
            msix_config: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; nq],
            gsi_base,
            calls,
            wiring: None,
            touched: false,
            bad_accesses,
        })
    }

    fn bad(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    /// What a live update hands over for this card in root port `port`, and the fds that ride
    /// beside it (the vhost-user connection, each queue's kick, each queue's call). `None`
    /// for a device that cannot be handed over now (not vhost-user, backend dead or being
    /// stopped, backend work pending). Called with the vCPUs parked.
    pub fn handover_state(&self, port: u8) -> Option<(CardState, Vec<RawFd>)> {
        use std::os::fd::AsRawFd;
        if self.core.has_backend_work() {
            return None;
        }
        let dev = self.core.device.handover()?;
        let kind = match self.core.device.device_type() {
            VIRTIO_ID_BLOCK => CardKind::Block,
            VIRTIO_ID_NET => CardKind::Net,
            _ => return None,
        };
        if self.core.kicks.len() != self.core.queues.len()
            || self.calls.len() != self.core.queues.len()
        {
            return None;
        }
        let mut core = self.core.state();
        core.positions.clear();
        let st = CardState {
            port,
            id: self.id.clone(),
            kind,
            read_only: dev.read_only,
            cfg: self.cfg.bytes(),
            touched: self.touched,
            core,
            msix: self
                .msix
                .iter()
                .map(|e| MsixEntryState {
                    address: e.address,
                    data: e.data,
                    masked: e.masked,
                })
                .collect(),
            msix_config: self.msix_config,
            queue_vectors: self.queue_vectors.clone(),
            gsi_base: self.gsi_base,
            vhost: dev.vhost,
            device_config: dev.config,
        };
        let mut fds = Vec::with_capacity(st.fd_count());
        fds.push(dev.conn_fd);
        fds.extend(self.core.kicks.iter().map(AsRawFd::as_raw_fd));
        fds.extend(self.calls.iter().map(|c| c.as_raw_fd()));
        Some((st, fds))
    }

    /// Live update, old process, vCPUs parked: unbinds the queues' call eventfds from this
    /// process's VM. The kernel lets an eventfd drive one irqfd only (KVM_IRQFD answers EBUSY
    /// to a second VM), so the new process can bind them only once this one let go. An
    /// interrupt the backend raises from here on is only counted in the eventfd; whoever binds
    /// it next signals it once ([`VirtioPciDevice::rebind_calls`], [`VirtioPciDevice::adopt`]).
    pub fn release_calls(&mut self, router: &dyn MsiRouting) -> Result<(), Error> {
        let Some(w) = &self.wiring else { return Ok(()) };
        let vm = router.vm();
        for (q, gsi) in &w.irqfds {
            if let Some(call) = self.calls.get(*q) {
                vm.unregister_irqfd(call, *gsi)
                    .map_err(|e| Error::Kvm("KVM_IRQFD (deassign)", e))?;
            }
        }
        Ok(())
    }

    /// Undoes [`VirtioPciDevice::release_calls`] (the hand-over failed; the guest stays here),
    /// and signals every call eventfd once for an interrupt raised while they were unbound.
    pub fn rebind_calls(&mut self, router: &dyn MsiRouting) {
        let Some(w) = &self.wiring else { return };
        let vm = router.vm();
        for (q, gsi) in &w.irqfds {
            let Some(call) = self.calls.get(*q) else {
                continue;
            };
            // EBUSY while another VM still holds the eventfd: a new process that bound it and
            // then failed or died lets go when its VM is torn down, which may lag its refusal
            // or its socket closing. (Still bound here, after a release that stopped part-way,
            // is EBUSY for good: the bound is then only a delay.)
            let until = std::time::Instant::now() + REBIND_WAIT;
            loop {
                match vm.register_irqfd(call, *gsi) {
                    Err(e) if e.errno() == libc::EBUSY && std::time::Instant::now() < until => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => {
                        tracing::warn!(device = %self.id, queue = q, error = %e, "rebinding a card's interrupt failed");
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
        for c in &self.calls {
            let _ = c.write(1);
        }
    }

    /// The card a previous hypervisor process handed over (live update): `device` taken over
    /// on the same vhost-user connection, the same `kicks` and `calls` eventfds, and the
    /// registers of `st`. An active device gets its ioeventfds (kicks, at the BAR the guest
    /// placed) and irqfds (calls) registered in this process's VM; nothing is sent to the
    /// backend. Every call eventfd is then signalled once: an interrupt the backend raised
    /// after the old process read its VM's state reached only the old VM, and a spurious one
    /// is harmless to a virtio driver.
    pub fn adopt(
        st: &CardState,
        device: Box<dyn VirtioDevice>,
        kicks: Vec<EventFd>,
        calls: Vec<Arc<EventFd>>,
        router: &dyn MsiRouting,
        bad_accesses: Arc<AtomicU64>,
    ) -> Result<Self, Error> {
        let core = VirtioCore::adopt(device, bad_accesses.clone(), &st.core, kicks)
            .ok_or(Error::WrongDeviceKind)?;
        if calls.len() != core.queues.len() {
            return Err(Error::WrongDeviceKind);
        }
        let mut card = Self::build(&st.id, core, st.gsi_base, calls, bad_accesses)?;
        if st.msix.len() != card.msix.len() || st.queue_vectors.len() != card.queue_vectors.len() {
            return Err(Error::WrongDeviceKind);
        }
        card.cfg.restore_bytes(&st.cfg);
        card.touched = st.touched;
        for (e, s) in card.msix.iter_mut().zip(&st.msix) {
            *e = MsixEntry {
                address: s.address,
                data: s.data,
                masked: s.masked,
            };
        }
        card.msix_config = st.msix_config;
        card.queue_vectors.clone_from(&st.queue_vectors);
        if card.core.is_active() {
            if let Err(e) = card.wire(router) {
                card.unwire(router);
                return Err(e);
            }
            for c in &card.calls {
                let _ = c.write(1);
            }
        }
        Ok(card)
    }

    /// Where the guest put BAR0, if it enabled memory decoding.
    pub fn bar_base(&self) -> Option<u64> {
        let mem_on = self.cfg.u16_at(0x04) & 0x2 != 0;
        let base = u64::from(self.cfg.u32_at(0x10) & 0xffff_fff0);
        (mem_on && base != 0).then_some(base)
    }

    /// Whether the driver has the device running.
    pub fn driver_ok(&self) -> bool {
        self.core.status & STATUS_DRIVER_OK != 0
    }

    pub fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.touched = true;
        self.cfg.read(off, data);
    }

    /// Whether the guest has read this function's configuration space (it has started to
    /// enumerate it).
    pub fn touched(&self) -> bool {
        self.touched
    }

    pub fn config_write(&mut self, off: usize, data: &[u8], router: &dyn MsiRouting) {
        self.cfg.write(off, data);
        if self.wiring.is_some() {
            self.route_all(router);
        }
    }

    fn msix_enabled(&self) -> bool {
        self.cfg.u16_at(usize::from(CAP_MSIX) + 2) & 0x8000 != 0
    }

    fn vector_gsi(&self, v: u16) -> Option<u32> {
        (usize::from(v) < self.msix.len()).then(|| self.gsi_base + u32::from(v))
    }

    /// Points every vector a queue uses at the MSI-X entry the guest wrote.
    fn route_all(&self, router: &dyn MsiRouting) {
        for v in self
            .queue_vectors
            .iter()
            .copied()
            .filter(|v| *v != NO_VECTOR)
        {
            let (Some(gsi), Some(e)) = (self.vector_gsi(v), self.msix.get(usize::from(v))) else {
                continue;
            };
            let msg = MsiMessage {
                address: e.address,
                data: e.data,
            };
            let route = (self.msix_enabled() && msg.is_valid()).then_some(msg);
            if let Err(e) = router.set_msi(gsi, route) {
                tracing::warn!(error = %e, gsi, "MSI route update failed");
            }
        }
    }

    /// Registers ioeventfds and irqfds for the ready queues, at the BAR address in use now.
    fn wire(&mut self, router: &dyn MsiRouting) -> Result<(), Error> {
        let base = self.bar_base().ok_or(Error::BarDisabled)?;
        self.route_all(router);
        let vm = router.vm();
        let notify_base = base + NOTIFY;
        // Recorded first, so that `unwire` also undoes a partial wiring.
        self.wiring = Some(Wiring {
            notify_base,
            irqfds: Vec::new(),
        });
        for (q, kick) in self.core.kicks.iter().enumerate() {
            let addr = notify_base + NOTIFY_MULTIPLIER * u64::try_from(q).unwrap_or(0);
            vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        }
        for q in 0..self.queue_vectors.len() {
            let v = self.queue_vectors[q];
            let (Some(gsi), Some(call)) = (self.vector_gsi(v), self.calls.get(q)) else {
                continue;
            };
            vm.register_irqfd(call, gsi)
                .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
            if let Some(w) = self.wiring.as_mut() {
                w.irqfds.push((q, gsi));
            }
        }
        Ok(())
    }

    /// Undoes [`VirtioPciDevice::wire`].
    fn unwire(&mut self, router: &dyn MsiRouting) {
        let Some(w) = self.wiring.take() else { return };
        let vm = router.vm();
        for (q, kick) in self.core.kicks.iter().enumerate() {
            let addr = w.notify_base + NOTIFY_MULTIPLIER * u64::try_from(q).unwrap_or(0);
            let _ = vm.unregister_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch);
        }
        for (q, gsi) in &w.irqfds {
            if let Some(call) = self.calls.get(*q) {
                let _ = vm.unregister_irqfd(call, *gsi);
            }
            let _ = router.set_msi(*gsi, None);
        }
    }

    /// Stops the backend and releases everything registered with KVM (the card is leaving).
    pub fn shut_down(&mut self, router: &dyn MsiRouting) {
        self.core.reset();
        self.unwire(router);
    }

    /// The common configuration structure as the guest reads it.
    fn common_snapshot(&mut self) -> [u8; COMMON_BYTES] {
        let mut s = [0u8; COMMON_BYTES];
        let c = &mut self.core;
        let acked = match c.driver_features_sel {
            0 => crate::bits::lo32(c.acked_features),
            1 => crate::bits::hi32(c.acked_features),
            _ => 0,
        };
        let nq = u16::try_from(c.queues.len()).unwrap_or(0);
        s[0..4].copy_from_slice(&c.device_features_sel.to_le_bytes());
        s[4..8].copy_from_slice(&c.device_features_word().to_le_bytes());
        s[8..12].copy_from_slice(&c.driver_features_sel.to_le_bytes());
        s[12..16].copy_from_slice(&acked.to_le_bytes());
        s[16..18].copy_from_slice(&self.msix_config.to_le_bytes());
        s[18..20].copy_from_slice(&nq.to_le_bytes());
        s[20] = u8::try_from(c.status & 0xff).unwrap_or(0);
        s[21] = u8::try_from(c.config_generation & 0xff).unwrap_or(0);
        let sel = u16::try_from(c.queue_sel).unwrap_or(u16::MAX);
        s[22..24].copy_from_slice(&sel.to_le_bytes());
        let vector = self
            .queue_vectors
            .get(usize::from(sel))
            .copied()
            .unwrap_or(NO_VECTOR);
        if let Some(q) = self.core.queue() {
            let size = if q.size == 0 { q.max_size } else { q.size };
            s[24..26].copy_from_slice(&size.to_le_bytes());
            s[26..28].copy_from_slice(&vector.to_le_bytes());
            s[28..30].copy_from_slice(&u16::from(q.ready).to_le_bytes());
            s[30..32].copy_from_slice(&sel.to_le_bytes());
            s[32..40].copy_from_slice(&q.desc.to_le_bytes());
            s[40..48].copy_from_slice(&q.avail.to_le_bytes());
            s[48..56].copy_from_slice(&q.used.to_le_bytes());
        }
        s
    }

    fn write_common(&mut self, off: u64, data: &[u8], ram: &GuestRam, router: &dyn MsiRouting) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let v16 = u16::try_from(v & 0xffff).unwrap_or(0);
        let queue_phase = self.core.queue_phase();
        match (off, data.len()) {
            (0x00, 4) => self.core.device_features_sel = v,
            (0x08, 4) => self.core.driver_features_sel = v,
            (0x0c, 4) => self.core.write_driver_features(v),
            (0x10, 2) => {
                self.msix_config = if self.vector_gsi(v16).is_some() {
                    v16
                } else {
                    NO_VECTOR
                }
            }
            (0x14, 1) => self.write_status(v, ram, router),
            (0x16, 2) => self.core.queue_sel = v,
            (0x18, 2) if queue_phase => {
                if let Some(q) = self.core.queue() {
                    q.size = v16;
                }
            }
            (0x1a, 2) => {
                let ok = self.vector_gsi(v16).is_some();
                let sel = usize::try_from(self.core.queue_sel).unwrap_or(usize::MAX);
                if let Some(slot) = self.queue_vectors.get_mut(sel) {
                    *slot = if ok { v16 } else { NO_VECTOR };
                }
            }
            (0x1c, 2) if queue_phase => {
                if let Some(q) = self.core.queue() {
                    q.ready = v16 == 1;
                    if q.size == 0 {
                        q.size = q.max_size;
                    }
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) if queue_phase => {
                if let Some(q) = self.core.queue() {
                    match off {
                        0x20 => set_low(&mut q.desc, v),
                        0x24 => set_high(&mut q.desc, v),
                        0x28 => set_low(&mut q.avail, v),
                        0x2c => set_high(&mut q.avail, v),
                        0x30 => set_low(&mut q.used, v),
                        _ => set_high(&mut q.used, v),
                    }
                }
            }
            _ => self.bad(),
        }
    }

    fn write_status(&mut self, v: u32, ram: &GuestRam, router: &dyn MsiRouting) {
        match self.core.write_status(v, &ram.mem) {
            StatusAction::None => {}
            StatusAction::Reset => self.unwire(router),
            StatusAction::Activate => {
                if let Err(e) = self.wire(router) {
                    tracing::warn!(device = %self.id, error = %e, "cannot wire the device");
                    self.unwire(router);
                    self.core.status |= super::virtio::STATUS_NEEDS_RESET;
                    return;
                }
                let calls = self.calls.clone();
                if self.core.activate(ram, &calls) {
                    tracing::info!(device = %self.id, "virtio-pci device activated");
                } else {
                    self.unwire(router);
                }
            }
        }
    }

    /// A guest read in BAR0.
    pub fn mmio_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        match off {
            o if o < COMMON + COMMON_LEN => {
                let s = self.common_snapshot();
                let start = usize::try_from(o).unwrap_or(usize::MAX);
                match s.get(start..start.saturating_add(data.len())) {
                    Some(src) => data.copy_from_slice(src),
                    None => self.bad(),
                }
            }
            o if (ISR..ISR + 4).contains(&o) => {
                if let Some(b) = data.first_mut() {
                    let st = self.core.irq_status.swap(0, Ordering::SeqCst);
                    *b = u8::try_from(st & 0xff).unwrap_or(0);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.core.device.read_config(o - DEVICE_CFG, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let idx = usize::try_from((o - MSIX_TABLE) / 16).unwrap_or(usize::MAX);
                let (Some(e), 4) = (self.msix.get(idx), data.len()) else {
                    self.bad();
                    return;
                };
                let v = match (o - MSIX_TABLE) % 16 {
                    0 => crate::bits::lo32(e.address),
                    4 => crate::bits::hi32(e.address),
                    8 => e.data,
                    _ => u32::from(e.masked),
                };
                data.copy_from_slice(&v.to_le_bytes());
            }
            o if (MSIX_PBA..MSIX_PBA + 8).contains(&o) => {}
            _ => self.bad(),
        }
    }

    /// A guest write in BAR0.
    pub fn mmio_write(&mut self, off: u64, data: &[u8], ram: &GuestRam, router: &dyn MsiRouting) {
        match off {
            o if o < COMMON + COMMON_LEN => self.write_common(o, data, ram, router),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                if self.driver_ok() {
                    self.bad();
                } else {
                    self.core.device.write_config(o - DEVICE_CFG, data);
                }
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                // Reached only when no ioeventfd matched (e.g. before activation).
                let q = usize::try_from((o - NOTIFY) / NOTIFY_MULTIPLIER).unwrap_or(usize::MAX);
                if !self.core.is_active() {
                    return;
                }
                match self.core.kicks.get(q) {
                    Some(k) => {
                        let _ = k.write(1);
                    }
                    None => {
                        if let Ok(q) = u16::try_from(q) {
                            self.core.device.notify(q, &ram.mem);
                        }
                    }
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let idx = usize::try_from((o - MSIX_TABLE) / 16).unwrap_or(usize::MAX);
                let Ok(b) = <[u8; 4]>::try_from(data) else {
                    self.bad();
                    return;
                };
                let v = u32::from_le_bytes(b);
                let Some(e) = self.msix.get_mut(idx) else {
                    self.bad();
                    return;
                };
                match (o - MSIX_TABLE) % 16 {
                    0 => set_low(&mut e.address, v),
                    4 => set_high(&mut e.address, v),
                    8 => e.data = v,
                    _ => e.masked = v & 1 != 0,
                }
                if self.wiring.is_some() {
                    self.route_all(router);
                }
            }
            _ => self.bad(),
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        VirtioPciDevice::config_read(self, off, data)
    }
    fn config_write(&mut self, off: usize, data: &[u8], irq: &dyn MsiRouting) {
        VirtioPciDevice::config_write(self, off, data, irq)
    }
    fn bar_base(&self) -> Option<u64> {
        VirtioPciDevice::bar_base(self)
    }
    fn bar_size(&self) -> u64 {
        BAR_SIZE
    }
    fn class_code(&self) -> u32 {
        self.cfg.u32_at(0x08) >> 8
    }
    fn bar_read(&mut self, off: u64, data: &mut [u8]) {
        self.mmio_read(off, data)
    }
    fn bar_write(&mut self, off: u64, data: &[u8], ram: &GuestRam, irq: &dyn MsiRouting) {
        self.mmio_write(off, data, ram, irq)
    }
    fn reset(&mut self, irq: &dyn MsiRouting) {
        self.shut_down(irq)
    }
    fn take_backend_work(&mut self) -> Option<super::virtio::BackendWork> {
        self.core.take_backend_work()
    }
    fn backend_failure(&self) -> Option<bulkhead_channel::BackendFailure> {
        self.core.device.failed()
    }
    fn touched(&self) -> bool {
        VirtioPciDevice::touched(self)
    }
    fn driver_ready(&self) -> bool {
        self.driver_ok()
    }
    fn driver_attached(&self) -> bool {
        // A reset is over once the backend's rings are stopped (or it was found dead).
        self.core.status != 0 || !self.core.device.settled()
    }
    fn backend_state(
        &self,
        config_len: usize,
    ) -> Option<std::io::Result<super::virtio::BackendState>> {
        Some(self.core.backend_state(&self.calls, config_len))
    }
    fn replace_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
        epoch: u64,
    ) -> Result<Box<dyn VirtioDevice>, Box<dyn VirtioDevice>> {
        self.core.replace_device(device, epoch)
    }
    fn virtio_device_mut(&mut self) -> Option<&mut dyn VirtioDevice> {
        Some(self.core.device.as_mut())
    }
    fn handover_state(&self, port: u8) -> Option<(CardState, Vec<RawFd>)> {
        VirtioPciDevice::handover_state(self, port)
    }
    fn release_calls(&mut self, irq: &dyn MsiRouting) -> Result<(), Error> {
        VirtioPciDevice::release_calls(self, irq)
    }
    fn rebind_calls(&mut self, irq: &dyn MsiRouting) {
        VirtioPciDevice::rebind_calls(self, irq)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::pci::PciBus;
    use crate::irq::IrqRouter;

    /// A card on `port` of `bus` whose BAR0 the guest put at `bar`, memory decoding on.
    fn card_with_bar(bus: &mut PciBus, port: usize, id: &str, bar: Option<u32>) {
        let router = bus.router.clone();
        let card = VirtioPciDevice::new(
            id,
            Box::new(crate::devices::virtio_rng::VirtioRng::new()),
            router.as_ref(),
            Arc::default(),
        )
        .expect("card");
        let p = bus.ports.get_mut(port).expect("port");
        p.plug(Box::new(card), false, router.as_ref());
        if let (Some(bar), Some(c)) = (bar, p.card.as_mut()) {
            c.config_write(0x10, &bar.to_le_bytes(), router.as_ref());
            c.config_write(0x04, &[0x02, 0x00], router.as_ref());
            assert_eq!(c.bar_base(), Some(u64::from(bar)));
        }
    }

    #[test]
    fn class_codes_follow_the_device_type() {
        assert_eq!(
            class_for(1),
            0x02_00_00,
            "net: network controller, Ethernet"
        );
        assert_eq!(class_for(2), 0x01_80_00, "block: mass storage, other");
        assert_eq!(class_for(4), 0xff_00_00);
    }

    /// The regression behind "a card plugged right after an unplug is never enumerated": a
    /// hot-unplugged card's BAR must keep reading as a reset device (status 0) after the card
    /// is taken out, also once another card sits in the slot, or the guest's `vp_reset()`
    /// polls a status of 0xff forever while holding the PCI rescan/remove lock.
    #[test]
    fn a_pulled_card_leaves_a_husk_that_outlives_the_next_plug() {
        let Ok(vm) = kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()) else {
            bulkhead_testkit::skip_or_fail("husk test: /dev/kvm is not usable");
            return;
        };
        let router = Arc::new(IrqRouter::new(Arc::new(vm)));
        let mut bus = PciBus::new(2, router.clone());
        let bar: u32 = 0x0800_0000;
        let status = u64::from(bar) + 0x14;
        card_with_bar(&mut bus, 0, "a", Some(bar));
        assert!(bus.card_at(status).is_some());

        // Hot-unplug from a running guest: pull, then take the card out.
        let p = bus.ports.get_mut(0).expect("port");
        p.pull(router.as_ref());
        let _ = p.unplug(router.as_ref(), true).finish();
        assert!(bus.card_at(status).is_none());
        assert!(
            bus.husk_at(status),
            "the pulled card's BAR answers as a reset device"
        );

        // Another card in the same slot has no BAR until the guest enumerates it: the husk
        // still answers; once the new card claims the addresses, it answers first.
        card_with_bar(&mut bus, 0, "b", None);
        assert!(bus.card_at(status).is_none());
        assert!(
            bus.husk_at(status),
            "a new card must not drop the old card's husk"
        );
        if let Some(c) = bus.ports.get_mut(0).and_then(|p| p.card.as_mut()) {
            c.config_write(0x10, &bar.to_le_bytes(), router.as_ref());
            c.config_write(0x04, &[0x02, 0x00], router.as_ref());
        }
        assert!(bus
            .card_at(status)
            .is_some_and(|(c, off)| c.id() == "b" && off == 0x14));

        // Taking a card out of a guest that no longer runs leaves nothing behind.
        let _ = bus
            .ports
            .get_mut(0)
            .expect("port")
            .unplug(router.as_ref(), false)
            .finish();
        assert!(!bus.husk_at(status));
    }
}
