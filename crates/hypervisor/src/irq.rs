//! Interrupt routing: the legacy IOAPIC/PIC lines and the MSI routes of PCI devices.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the router keeps every route and
//! re-sends all of them on each change: GSIs 0-23 to the IOAPIC (0-15 also to the PIC), as
//! KVM's default table has them, then one MSI route per vector a PCI device uses.
//!
//! Devices and the PCI bus reach the router only through [`MsiRouting`], handed to them by the
//! VM on each access that needs it: this module knows no device and no bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::{lock, Error};

/// What a PCI device model or the bus may do with interrupts: reserve GSIs for its vectors,
/// point them at MSI messages, raise one MSI, and reach the VM to attach irqfds/ioeventfds.
pub trait MsiRouting: Send + Sync {
    /// Reserves `n` consecutive GSIs for a device's MSI vectors.
    fn allocate(&self, n: u32) -> Result<u32, Error>;
    /// Points `gsi` at `msg` (or removes its route when `msg` is `None`).
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error>;
    /// Injects one MSI directly (for interrupts the VMM itself raises).
    fn signal(&self, msg: MsiMessage);
    /// The VM the routes belong to (for irqfd and ioeventfd registration).
    fn vm(&self) -> &VmFd;
}

impl MsiRouting for IrqRouter {
    fn allocate(&self, n: u32) -> Result<u32, Error> {
        IrqRouter::allocate(self, n)
    }
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        IrqRouter::set_msi(self, gsi, msg)
    }
    fn signal(&self, msg: MsiMessage) {
        IrqRouter::signal(self, msg)
    }
    fn vm(&self) -> &VmFd {
        IrqRouter::vm(self)
    }
}

/// GSIs below this are IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// Most MSI routes one VM may have.
pub const MAX_MSI_ROUTES: u32 = 512;

/// An MSI message: where the device writes and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    /// An address outside the LAPIC window is not an interrupt on x86.
    pub fn is_valid(&self) -> bool {
        self.address & 0xfff0_0000 == 0xfee0_0000 && self.address >> 32 == 0
    }
}

/// The routing table of one VM.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: Mutex<u32>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
        }
    }

    /// The VM these routes belong to.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Reserves `n` consecutive GSIs for a device's MSI vectors.
    pub fn allocate(&self, n: u32) -> Result<u32, Error> {
        let mut next = lock(&self.next_gsi);
        let base = *next;
        let end = base
            .checked_add(n)
            .filter(|e| *e <= IOAPIC_PINS + MAX_MSI_ROUTES)
            .ok_or(Error::OutOfMsiRoutes)?;
        *next = end;
        Ok(base)
    }

    /// Points `gsi` at `msg` (or removes its route when `msg` is `None`) and updates KVM.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        let mut msi = lock(&self.msi);
        let changed = match msg {
            Some(m) => msi.insert(gsi, m) != Some(m),
            None => msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&msi)?;
        }
        Ok(())
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), Error> {
        let mut entries = Vec::with_capacity(40 + msi.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, m) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = crate::bits::lo32(m.address);
            e.u.msi.address_hi = crate::bits::hi32(m.address);
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| Error::RoutingTableFull)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| Error::Kvm("KVM_SET_GSI_ROUTING", e))
    }

    /// Every MSI route as (gsi, address, data) and the next free GSI (live update).
    pub fn routes(&self) -> (Vec<(u32, u64, u32)>, u32) {
        let msi = lock(&self.msi);
        let routes = msi.iter().map(|(g, m)| (*g, m.address, m.data)).collect();
        (routes, *lock(&self.next_gsi))
    }

    /// Puts back the routes [`IrqRouter::routes`] gave in the old process and commits them.
    pub fn restore_routes(&self, routes: &[(u32, u64, u32)], next_gsi: u32) -> Result<(), Error> {
        let mut msi = lock(&self.msi);
        msi.clear();
        for (gsi, address, data) in routes {
            if *gsi < IOAPIC_PINS || *gsi >= next_gsi {
                return Err(Error::RoutingTableFull);
            }
            msi.insert(
                *gsi,
                MsiMessage {
                    address: *address,
                    data: *data,
                },
            );
        }
        if !(IOAPIC_PINS..=IOAPIC_PINS + MAX_MSI_ROUTES).contains(&next_gsi) {
            return Err(Error::RoutingTableFull);
        }
        *lock(&self.next_gsi) = next_gsi;
        if !msi.is_empty() {
            self.commit(&msi)?;
        }
        Ok(())
    }

    /// Injects one MSI directly (for interrupts the VMM itself raises).
    pub fn signal(&self, msg: MsiMessage) {
        if !msg.is_valid() {
            return;
        }
        let m = kvm_msi {
            address_lo: crate::bits::lo32(msg.address),
            address_hi: crate::bits::hi32(msg.address),
            data: msg.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(m) {
            tracing::warn!(error = %e, "KVM_SIGNAL_MSI failed");
        }
    }
}
