//! The virtio-mmio transport (virtio 1.x, "version 2" register layout), used for the devices a
//! guest has from boot to power-off (virtio-rng).
//!
//! Every register access from the guest lands here. Invalid accesses (wrong width, unknown
//! offsets, writes in the wrong device state, queue addresses outside RAM) are counted and
//! ignored or turn the device to `DEVICE_NEEDS_RESET`; they never reach the host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::virtio::{
    set_high, set_low, StatusAction, VirtioCore, VirtioDevice, INT_VRING, STATUS_DRIVER_OK,
};
use crate::memory::GuestRam;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b48_4c42; // "BLHK"

/// Offset of the QueueNotify register (where ioeventfds are registered).
pub const QUEUE_NOTIFY: u64 = 0x50;

/// One virtio-mmio slot with its device.
pub struct MmioTransport {
    pub core: VirtioCore,
    pub irq: Arc<EventFd>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
        bad_accesses: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        Ok(MmioTransport {
            core: VirtioCore::new(device, bad_accesses)?,
            irq: Arc::new(irq),
        })
    }

    /// The queue-notify eventfds (registered as ioeventfds by the VM).
    pub fn kicks(&self) -> &[EventFd] {
        &self.core.kicks
    }

    /// A guest read of `data.len()` bytes at `offset` in this slot's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let c = &mut self.core;
        if offset >= 0x100 {
            c.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            c.bad();
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => c.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => c.device_features_word(),
            0x34 => c.queue().map(|q| u32::from(q.max_size)).unwrap_or(0),
            0x44 => c.queue().map(|q| u32::from(q.ready)).unwrap_or(0),
            0x60 => {
                if c.device.interrupt_always_vring() {
                    INT_VRING
                } else {
                    c.irq_status.load(Ordering::SeqCst)
                }
            }
            0x70 => c.status,
            0xfc => c.config_generation,
            _ => {
                c.bad();
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], ram: &GuestRam) {
        let c = &mut self.core;
        if offset >= 0x100 {
            if c.status & STATUS_DRIVER_OK == 0 {
                c.device.write_config(offset - 0x100, data);
            } else {
                c.bad();
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            c.bad();
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let queue_phase = c.queue_phase();
        match offset {
            0x14 => c.device_features_sel = v,
            0x20 => c.write_driver_features(v),
            0x24 => c.driver_features_sel = v,
            0x30 => c.queue_sel = v,
            0x38 if queue_phase => {
                if let Some(q) = c.queue() {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            0x44 if queue_phase => {
                if let Some(q) = c.queue() {
                    q.ready = v == 1;
                }
            }
            0x50 => {
                if c.status & STATUS_DRIVER_OK != 0 {
                    if let Ok(q) = u16::try_from(v) {
                        c.device.notify(q, &ram.mem);
                    }
                }
            }
            0x64 => {
                c.irq_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => {
                if c.write_status(v, &ram.mem) == StatusAction::Activate {
                    let n = c.queues.len();
                    let irqs = vec![self.irq.clone(); n];
                    c.activate(ram, &irqs);
                }
                // Only devices served inside the VMM sit on virtio-mmio: no backend to wait
                // for, whatever a reset left is run here.
                if let Some(w) = c.take_backend_work() {
                    let _ = w.run();
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_phase => {
                if let Some(q) = c.queue() {
                    match offset {
                        0x80 => set_low(&mut q.desc, v),
                        0x84 => set_high(&mut q.desc, v),
                        0x90 => set_low(&mut q.avail, v),
                        0x94 => set_high(&mut q.avail, v),
                        0xa0 => set_low(&mut q.used, v),
                        _ => set_high(&mut q.used, v),
                    }
                }
            }
            _ => c.bad(),
        }
    }
}
