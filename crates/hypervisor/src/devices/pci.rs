//! A minimal PCI Express topology for hot-plug: a host bridge and a few root ports, each with
//! one hot-plug slot (PCIe native hot-plug, handled by Linux's stock `pciehp` driver).
//!
//! Configuration space is reached through configuration mechanism #1 (ports 0xCF8/0xCFC), which
//! a guest without ACPI finds by itself; no MMCONFIG, so only the first 256 bytes of each
//! function exist. Bus 0 holds the host bridge (device 0) and the root ports (devices 1..=N);
//! each root port's secondary bus holds at most one device, the card in its slot.
//!
//! The slot models a surprise-removal-capable slot without power controller, indicators,
//! attention button or latch, and with "no command completed support": the simplest slot
//! `pciehp` drives. Plugging sets Presence Detect State and Data Link Layer Link Active and
//! raises Presence Detect Changed + Data Link Layer State Changed with the port's MSI; pulling
//! clears both and raises the same events.

use std::sync::Arc;

use super::config_space::ConfigSpace;
use super::virtio::{BackendState, BackendWork, VirtioDevice};
use bulkhead_channel::BackendFailure;

/// What taking a card out left to do: the work that stops its backend (run it once the bus is
/// unlocked) and whether its backend had already failed.
#[must_use = "the backend is only stopped when `finish` runs"]
#[derive(Debug, Default)]
pub struct Unplugged {
    work: Option<BackendWork>,
    failure: Option<BackendFailure>,
}

impl Unplugged {
    /// Stops the backend (bounded by the backend watchdog); `Some` if it is dead.
    pub fn finish(self) -> Option<BackendFailure> {
        let later = self.work.and_then(BackendWork::run);
        self.failure.or(later)
    }
}
use crate::irq::{MsiMessage, MsiRouting};
use crate::memory::GuestRam;

/// CONFIG_ADDRESS and CONFIG_DATA of configuration mechanism #1.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;

/// A card in a root port's slot, as the bus sees it: a configuration space, one memory BAR, and
/// a reset. The bus owns cards as `Box<dyn PciDevice>` and knows no device model; interrupt
/// routing and guest memory are handed in by the caller on the accesses that need them.
pub trait PciDevice: Send {
    /// The id the controller attached it under.
    fn id(&self) -> &str;
    /// A guest configuration read at `off`.
    fn config_read(&mut self, off: usize, data: &mut [u8]);
    /// A guest configuration write at `off`.
    fn config_write(&mut self, off: usize, data: &[u8], irq: &dyn MsiRouting);
    /// Where the guest put the memory BAR, once it enabled memory decoding.
    fn bar_base(&self) -> Option<u64>;
    /// Size of the memory BAR.
    fn bar_size(&self) -> u64;
    /// The 24-bit class code (base class, subclass, programming interface) the card reports.
    fn class_code(&self) -> u32;
    /// A guest read at `off` in the BAR.
    fn bar_read(&mut self, off: u64, data: &mut [u8]);
    /// A guest write at `off` in the BAR.
    fn bar_write(&mut self, off: u64, data: &[u8], ram: &GuestRam, irq: &dyn MsiRouting);
    /// The card leaves: reset it and release everything it registered with KVM. Stopping its
    /// backend is left as [`PciDevice::take_backend_work`].
    fn reset(&mut self, irq: &dyn MsiRouting);
    /// Backend work the last guest access or reset left, to run once the bus is unlocked
    /// (see [`BackendWork`]).
    fn take_backend_work(&mut self) -> Option<BackendWork>;
    /// Why the card's backend failed for good, if it did.
    fn backend_failure(&self) -> Option<BackendFailure>;
    /// Whether the guest has read the configuration space (it has started to enumerate it).
    fn touched(&self) -> bool;
    /// Whether a guest driver has the device running.
    fn driver_ready(&self) -> bool;
    /// Whether a guest driver has started to drive the device (and not reset it since).
    fn driver_attached(&self) -> bool;
    /// For a virtio card: its device model (a card update stops the old backend's rings
    /// through it). `None` for other cards.
    fn virtio_device_mut(&mut self) -> Option<&mut dyn VirtioDevice> {
        None
    }
    /// For a virtio card: what replacing its backend in place needs (`config_len` bytes of
    /// the device configuration as the guest reads them). `None` for other cards.
    fn backend_state(&self, _config_len: usize) -> Option<std::io::Result<BackendState>> {
        None
    }
    /// For a virtio card: puts `device` in place of its device model if nothing changed
    /// since [`PciDevice::backend_state`] gave `epoch` (see
    /// [`super::virtio::VirtioCore::replace_device`]); the old device comes back, or `device`
    /// when refused.
    fn replace_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
        _epoch: u64,
    ) -> Result<Box<dyn VirtioDevice>, Box<dyn VirtioDevice>> {
        Err(device)
    }
    /// For a vhost-user card: what a live update hands over for it, sitting in root port
    /// `port`, and the fds that ride beside the state (see
    /// [`crate::live_update::state::CardState::fd_count`]). `None` if it cannot be handed
    /// over now.
    fn handover_state(
        &self,
        _port: u8,
    ) -> Option<(
        crate::live_update::state::CardState,
        Vec<std::os::fd::RawFd>,
    )> {
        None
    }
    /// Live update, old process: unbinds the card's interrupt eventfds from this VM (an
    /// eventfd drives one irqfd only), so the new process can bind them.
    fn release_calls(&mut self, _irq: &dyn MsiRouting) -> Result<(), crate::Error> {
        Ok(())
    }
    /// Undoes [`PciDevice::release_calls`] after a failed hand-over.
    fn rebind_calls(&mut self, _irq: &dyn MsiRouting) {}
}

const PCI_VENDOR_REDHAT: u16 = 0x1b36;
/// "PCIe root port" as QEMU numbers it; Linux applies no quirk to it.
const PCI_DEVICE_ROOT_PORT: u16 = 0x000c;
/// "PCIe host bridge".
const PCI_DEVICE_HOST_BRIDGE: u16 = 0x0008;

const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
const CLASS_PCI_BRIDGE: u32 = 0x06_04_00;

// Root port capability offsets.
const MSI_CAP_AT: u8 = 0x40;
const EXP_CAP_AT: u8 = 0x50;
const MSI_CAP: usize = MSI_CAP_AT as usize;
const EXP_CAP: usize = EXP_CAP_AT as usize;
const LNKSTA: usize = EXP_CAP + 0x12;
const SLTCTL: usize = EXP_CAP + 0x18;
const SLTSTA: usize = EXP_CAP + 0x1a;

// Slot control bits.
const SLTCTL_PDCE: u16 = 1 << 3;
const SLTCTL_HPIE: u16 = 1 << 5;
const SLTCTL_DLLSCE: u16 = 1 << 12;
// Slot status bits.
const SLTSTA_PDC: u16 = 1 << 3;
const SLTSTA_PDS: u16 = 1 << 6;
const SLTSTA_DLLSC: u16 = 1 << 8;
// Link status bits: 2.5 GT/s, x1, and Data Link Layer Link Active.
const LNKSTA_UP: u16 = 0x0011;
const LNKSTA_DLLLA: u16 = 1 << 13;

/// A PCIe root port with one hot-plug slot.
pub struct RootPort {
    cfg: ConfigSpace,
    /// The card in the slot. While it is being pulled it stays here (its BAR still answers so
    /// the guest driver can reset it) but the slot reports empty.
    pub card: Option<Box<dyn PciDevice>>,
    /// BAR of a card that was pulled while a guest driver may still touch it: reads return
    /// zeros (a reset device), writes are dropped. It stays until a later card of this slot
    /// leaves a husk of its own (a card that claims the same addresses answers first): a card
    /// plugged into the slot has no BAR until the guest enumerates it, and the old card's
    /// driver may not have finished its reset by then.
    husk_bar: Option<(u64, u64)>,
    present: bool,
}

impl RootPort {
    fn new(index: u8) -> Self {
        let mut c = ConfigSpace::default();
        c.header(
            PCI_VENDOR_REDHAT,
            PCI_DEVICE_ROOT_PORT,
            CLASS_PCI_BRIDGE,
            0,
            0x01,
        );
        // Primary, secondary, subordinate bus numbers and secondary latency: the guest numbers
        // the buses.
        c.writable(0x18, &[0xff, 0xff, 0xff, 0xff]);
        // A 32-bit memory window; no I/O and no prefetchable window (read-only zero).
        c.writable(0x20, &[0xf0, 0xff, 0xf0, 0xff]);
        c.writable(0x3e, &[0xff, 0x0f]);
        c.set(0x34, &[MSI_CAP_AT]);
        // MSI: 64-bit capable, one vector.
        c.set(MSI_CAP, &[0x05, EXP_CAP_AT]);
        c.set_u16(MSI_CAP + 2, 0x0080);
        c.writable(MSI_CAP + 2, &[0x71, 0x00]);
        c.writable(
            MSI_CAP + 4,
            &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        );
        c.writable(MSI_CAP + 12, &[0xff, 0xff]);
        // PCI Express capability v2, root port, slot implemented.
        c.set(EXP_CAP, &[0x10, 0x00]);
        c.set_u16(EXP_CAP + 2, 0x0142);
        c.writable(EXP_CAP + 8, &[0xff, 0xff]);
        c.clear_on_write(EXP_CAP + 0x0a, &[0x0f]);
        // Link: 2.5 GT/s x1, Data Link Layer Link Active reporting, port number.
        c.set_u32(
            EXP_CAP + 0x0c,
            0x1 | (1 << 4) | (1 << 20) | (u32::from(index) << 24),
        );
        c.writable(EXP_CAP + 0x10, &[0xff, 0x0f]);
        c.set_u16(LNKSTA, LNKSTA_UP);
        // Slot: hot-plug surprise, hot-plug capable, no command completed support, physical
        // slot number index+1.
        let sltcap = (1 << 5) | (1 << 6) | (1 << 18) | ((u32::from(index) + 1) << 19);
        c.set_u32(EXP_CAP + 0x14, sltcap);
        c.writable(SLTCTL, &[0xff, 0x1f]);
        c.clear_on_write(SLTSTA, &[0x1f, 0x01]);
        c.writable(EXP_CAP + 0x1c, &[0x1f]);
        RootPort {
            cfg: c,
            card: None,
            husk_bar: None,
            present: false,
        }
    }

    /// The bus number the guest gave this port's slot (0 until it has numbered it).
    pub fn secondary_bus(&self) -> u8 {
        self.cfg.u8_at(0x19)
    }

    /// Whether the slot reports a card present.
    pub fn is_present(&self) -> bool {
        self.present
    }

    fn set_presence(&mut self, present: bool) {
        self.present = present;
        let mut sta = self.cfg.u16_at(SLTSTA) & !SLTSTA_PDS;
        let mut lnk = LNKSTA_UP;
        if present {
            sta |= SLTSTA_PDS;
            lnk |= LNKSTA_DLLLA;
        }
        self.cfg.set_u16(SLTSTA, sta);
        self.cfg.set_u16(LNKSTA, lnk);
    }

    /// Puts `card` in the slot. With `announce`, raises the hot-plug events (a running guest);
    /// without, the card is simply there when the guest enumerates (cold plug).
    pub fn plug(&mut self, card: Box<dyn PciDevice>, announce: bool, router: &dyn MsiRouting) {
        self.card = Some(card);
        self.set_presence(true);
        if announce {
            self.event(router);
        }
    }

    /// Reports the slot empty and tells the guest; the card stays until [`RootPort::take`].
    pub fn pull(&mut self, router: &dyn MsiRouting) {
        self.set_presence(false);
        self.event(router);
    }

    /// Takes the card out; the work that stops its backend is returned, for the caller to run
    /// once it unlocked the bus (the connection closes when that work is done). With
    /// `leave_husk` (a guest that may still drive the card), its BAR keeps answering as a
    /// reset device, so that a guest driver still tearing it down does not wait forever on a
    /// register that reads all ones: Linux's virtio-pci `vp_reset()` writes 0 to the device
    /// status and then polls it until it reads 0, holding the PCI rescan/remove lock that
    /// every later hot-plug in the guest needs.
    pub fn unplug(&mut self, router: &dyn MsiRouting, leave_husk: bool) -> Unplugged {
        if self.present {
            self.set_presence(false);
        }
        if let Some(mut c) = self.card.take() {
            if leave_husk {
                if let Some(bar) = c.bar_base() {
                    self.husk_bar = Some((bar, c.bar_size()));
                }
            } else {
                self.husk_bar = None;
            }
            let failure = c.backend_failure();
            c.reset(router);
            return Unplugged {
                work: c.take_backend_work(),
                failure,
            };
        }
        Unplugged::default()
    }

    /// Raises the plug event again for a card the guest has not started to enumerate (an
    /// interrupt it may have missed). Never for a card it has touched: pciehp treats a new
    /// presence event on an occupied slot as a removal.
    pub fn reannounce(&mut self, router: &dyn MsiRouting) -> bool {
        if self.present && self.card.as_ref().is_some_and(|c| !c.touched()) {
            self.event(router);
            return true;
        }
        false
    }

    /// Latches Presence Detect Changed and Data Link Layer State Changed and, if the guest
    /// enabled hot-plug interrupts, sends the port's MSI.
    fn event(&mut self, router: &dyn MsiRouting) {
        let sta = self.cfg.u16_at(SLTSTA) | SLTSTA_PDC | SLTSTA_DLLSC;
        self.cfg.set_u16(SLTSTA, sta);
        let ctl = self.cfg.u16_at(SLTCTL);
        let msi_on = self.cfg.u16_at(MSI_CAP + 2) & 1 != 0;
        if msi_on && ctl & SLTCTL_HPIE != 0 && ctl & (SLTCTL_PDCE | SLTCTL_DLLSCE) != 0 {
            let address = u64::from(self.cfg.u32_at(MSI_CAP + 4))
                | (u64::from(self.cfg.u32_at(MSI_CAP + 8)) << 32);
            let data = u32::from(self.cfg.u16_at(MSI_CAP + 12));
            router.signal(MsiMessage { address, data });
        } else {
            tracing::debug!(
                ctl,
                msi_on,
                "hot-plug event latched; guest has no interrupt enabled"
            );
        }
    }
}

/// Where a configuration access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    HostBridge,
    Port(usize),
    Card(usize),
    Nothing,
}

/// The PCI side of a VM: host bridge, root ports, configuration mechanism #1.
pub struct PciBus {
    address: u32,
    host: ConfigSpace,
    pub ports: Vec<RootPort>,
    pub router: Arc<dyn MsiRouting>,
    /// Where the search for a free slot starts: slots are used in turn, so a card plugged right
    /// after another was pulled lands in a slot the guest is not still tearing down.
    rotor: usize,
}

impl PciBus {
    pub fn new(slots: u8, router: Arc<dyn MsiRouting>) -> Self {
        let mut host = ConfigSpace::default();
        host.header(
            PCI_VENDOR_REDHAT,
            PCI_DEVICE_HOST_BRIDGE,
            CLASS_HOST_BRIDGE,
            0,
            0x00,
        );
        host.set_u16(0x06, 0);
        PciBus {
            address: 0,
            host,
            ports: (0..slots).map(RootPort::new).collect(),
            router,
            rotor: 0,
        }
    }

    /// Whether `port` is one of ours (0xCF8-0xCFF).
    pub fn claims_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// The function a data-port access at `port` reaches, with the offset in its space.
    fn target(&self, port: u16) -> Option<(Target, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || port < CONFIG_DATA {
            return None;
        }
        let bus = ((a >> 16) & 0xff) as u8;
        let dev = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        let reg = (a & 0xfc) as usize;
        if func != 0 {
            return Some((Target::Nothing, reg));
        }
        let t = if bus == 0 {
            match dev {
                0 => Target::HostBridge,
                d if d <= self.ports.len() => Target::Port(d - 1),
                _ => Target::Nothing,
            }
        } else {
            match self
                .ports
                .iter()
                .position(|p| p.secondary_bus() == bus && p.present && p.card.is_some())
            {
                Some(i) if dev == 0 => Target::Card(i),
                _ => Target::Nothing,
            }
        };
        Some((t, reg + usize::from(port - CONFIG_DATA)))
    }

    /// A guest `in` from 0xCF8-0xCFF.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        data.fill(0xff);
        let Some((t, off)) = self.target(port) else {
            return;
        };
        match t {
            Target::HostBridge => self.host.read(off, data),
            Target::Port(i) => {
                if let Some(p) = self.ports.get(i) {
                    p.cfg.read(off, data)
                }
            }
            Target::Card(i) => {
                if let Some(c) = self.ports.get_mut(i).and_then(|p| p.card.as_mut()) {
                    c.config_read(off, data)
                }
            }
            Target::Nothing => {}
        }
    }

    /// A guest `out` to 0xCF8-0xCFF.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        let Some((t, off)) = self.target(port) else {
            return;
        };
        match t {
            Target::HostBridge => self.host.write(off, data),
            Target::Port(i) => {
                if let Some(p) = self.ports.get_mut(i) {
                    p.cfg.write(off, data)
                }
            }
            Target::Card(i) => {
                let router = self.router.clone();
                if let Some(c) = self.ports.get_mut(i).and_then(|p| p.card.as_mut()) {
                    c.config_write(off, data, router.as_ref())
                }
            }
            Target::Nothing => {}
        }
    }

    /// The card whose memory BAR holds `addr`, with the offset into the BAR.
    pub fn card_at(&mut self, addr: u64) -> Option<(&mut dyn PciDevice, u64)> {
        self.ports.iter_mut().find_map(|p| {
            let c = p.card.as_mut()?;
            let base = c.bar_base()?;
            let off = addr.checked_sub(base)?;
            (off < c.bar_size()).then_some((c.as_mut() as &mut dyn PciDevice, off))
        })
    }

    /// Whether `addr` is in the BAR of a pulled card.
    pub fn husk_at(&self, addr: u64) -> bool {
        self.ports.iter().any(|p| {
            p.husk_bar
                .and_then(|(base, size)| Some((addr.checked_sub(base)?, size)))
                .is_some_and(|(off, size)| off < size)
        })
    }

    /// The port holding the card named `id`.
    pub fn port_of(&self, id: &str) -> Option<usize> {
        self.ports
            .iter()
            .position(|p| p.card.as_ref().is_some_and(|c| c.id() == id))
    }

    /// A port with an empty slot, taking slots in turn.
    pub fn free_port(&self) -> Option<usize> {
        let n = self.ports.len();
        (0..n)
            .map(|i| (self.rotor + i) % n)
            .find(|i| self.ports.get(*i).is_some_and(|p| p.card.is_none()))
    }

    /// The bus's state for a live update, with each card's state and the fds that ride beside
    /// it. `None` if a card cannot be handed over now: it is being pulled (the slot reports
    /// it gone), or [`PciDevice::handover_state`] refused.
    #[allow(clippy::type_complexity)]
    pub fn state(
        &self,
    ) -> Option<(
        crate::live_update::state::PciState,
        Vec<(
            crate::live_update::state::CardState,
            Vec<std::os::fd::RawFd>,
        )>,
    )> {
        use crate::live_update::state::{PciState, PortState};
        let mut ports = Vec::with_capacity(self.ports.len());
        let mut cards = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(c) = &p.card {
                if !p.present {
                    return None;
                }
                cards.push(c.handover_state(u8::try_from(i).ok()?)?);
            }
            ports.push(PortState {
                cfg: p.cfg.bytes(),
                present: p.present,
                husk: p.husk_bar,
            });
        }
        let st = PciState {
            address: self.address,
            host: self.host.bytes(),
            ports,
            rotor: u32::try_from(self.rotor).unwrap_or(0),
        };
        Some((st, cards))
    }

    /// Puts back the state [`PciBus::state`] gave in the old process, with `cards` (port,
    /// card) in their slots; `None` if it has another number of ports, or a slot that reports
    /// a card gets none (or one is given for a slot that reports none).
    pub fn restore(
        &mut self,
        st: &crate::live_update::state::PciState,
        cards: Vec<(usize, Box<dyn PciDevice>)>,
    ) -> Option<()> {
        if st.ports.len() != self.ports.len() {
            return None;
        }
        let mut slots: Vec<Option<Box<dyn PciDevice>>> = self.ports.iter().map(|_| None).collect();
        for (port, card) in cards {
            let slot = slots.get_mut(port)?;
            if slot.is_some() {
                return None;
            }
            *slot = Some(card);
        }
        if st
            .ports
            .iter()
            .zip(&slots)
            .any(|(p, c)| p.present != c.is_some())
        {
            return None;
        }
        self.address = st.address;
        self.host.restore_bytes(&st.host);
        for ((p, s), card) in self.ports.iter_mut().zip(&st.ports).zip(slots) {
            p.cfg.restore_bytes(&s.cfg);
            p.present = s.present;
            p.husk_bar = s.husk;
            p.card = card;
        }
        self.rotor = usize::try_from(st.rotor).ok()?;
        Some(())
    }

    /// [`PciDevice::release_calls`] for every card; on failure the ones done are bound again.
    pub fn release_calls(&mut self) -> Result<(), crate::Error> {
        let router = self.router.clone();
        let mut done = 0;
        for p in &mut self.ports {
            if let Some(c) = p.card.as_mut() {
                if let Err(e) = c.release_calls(router.as_ref()) {
                    c.rebind_calls(router.as_ref());
                    self.rebind_calls_of(done);
                    return Err(e);
                }
                done += 1;
            }
        }
        Ok(())
    }

    /// [`PciDevice::rebind_calls`] for every card.
    pub fn rebind_calls(&mut self) {
        self.rebind_calls_of(usize::MAX);
    }

    fn rebind_calls_of(&mut self, n: usize) {
        let router = self.router.clone();
        for c in self
            .ports
            .iter_mut()
            .filter_map(|p| p.card.as_mut())
            .take(n)
        {
            c.rebind_calls(router.as_ref());
        }
    }

    /// Records that `port` was just used, so the next search starts after it.
    pub fn used(&mut self, port: usize) {
        self.rotor = port + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_port_reports_a_hotplug_slot_and_presence() {
        let mut p = RootPort::new(2);
        // Capabilities: MSI then PCIe, a root port with a slot.
        assert_eq!(p.cfg.u8_at(0x34) as usize, MSI_CAP);
        assert_eq!(p.cfg.u8_at(MSI_CAP + 1) as usize, EXP_CAP);
        assert_eq!(p.cfg.u16_at(EXP_CAP + 2) & 0x01f0, 0x0140);
        let sltcap = p.cfg.u32_at(EXP_CAP + 0x14);
        assert_ne!(sltcap & (1 << 6), 0, "hot-plug capable");
        assert_eq!(sltcap >> 19, 3, "physical slot number");
        assert_eq!(p.cfg.u16_at(SLTSTA) & SLTSTA_PDS, 0);
        p.set_presence(true);
        assert_ne!(p.cfg.u16_at(SLTSTA) & SLTSTA_PDS, 0);
        assert_ne!(p.cfg.u16_at(LNKSTA) & LNKSTA_DLLLA, 0);
        // The guest cannot clear presence by writing the status register.
        p.cfg.write(SLTSTA, &[0xff, 0xff]);
        assert_ne!(p.cfg.u16_at(SLTSTA) & SLTSTA_PDS, 0);
        // Bus numbers are the guest's to assign.
        p.cfg.write(0x18, &[0, 5, 5, 0]);
        assert_eq!(p.secondary_bus(), 5);
    }
}
