//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! Every register access from the guest lands here. Invalid accesses (wrong width, unknown
//! offsets, writes in the wrong device state, queue addresses outside RAM) are counted and
//! ignored or turn the device to `DEVICE_NEEDS_RESET`; they never reach the host.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b48_4c42; // "BLHK"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Offset of the QueueNotify register (where ioeventfds are registered).
pub const QUEUE_NOTIFY: u64 = 0x50;
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
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub memfd_regions: &'a [(GuestAddress, usize, u64)],
    pub memfd: std::os::fd::RawFd,
    pub queues: &'a [QueueRegs],
    pub acked_features: u64,
    pub irq: &'a Arc<EventFd>,
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
    fn reset(&mut self);
    /// vhost-user devices signal the guest directly through the irqfd, so the transport
    /// cannot know which interrupt cause was raised: it always reports "used buffer".
    fn interrupt_always_vring(&self) -> bool {
        false
    }
    /// Whether queue notifications go to ioeventfds (handled outside the VMM).
    fn wants_ioeventfd(&self) -> bool {
        false
    }
}

/// One virtio-mmio slot with its device.
pub struct MmioTransport {
    pub device: Box<dyn VirtioDevice>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    irq_status: Arc<AtomicU32>,
    config_generation: u32,
    pub irq: Arc<EventFd>,
    pub kicks: Vec<EventFd>,
    bad_accesses: Arc<AtomicU64>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
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
        Ok(MmioTransport {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            irq_status: Arc::new(AtomicU32::new(0)),
            config_generation: 0,
            irq: Arc::new(irq),
            kicks,
            bad_accesses,
        })
    }

    fn bad(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    fn queue(&mut self) -> Option<&mut QueueRegs> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn set_low(v: &mut u64, lo: u32) {
        *v = (*v & 0xffff_ffff_0000_0000) | u64::from(lo);
    }
    fn set_high(v: &mut u64, hi: u32) {
        *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
    }

    /// A guest read of `data.len()` bytes at `offset` in this slot's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            self.bad();
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => crate::bits::lo32(f),
                    1 => crate::bits::hi32(f),
                    _ => 0,
                }
            }
            0x34 => self.queue().map(|q| u32::from(q.max_size)).unwrap_or(0),
            0x44 => self.queue().map(|q| u32::from(q.ready)).unwrap_or(0),
            0x60 => {
                if self.device.interrupt_always_vring() {
                    INT_VRING
                } else {
                    self.irq_status.load(Ordering::SeqCst)
                }
            }
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                self.bad();
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset`. Returns true when the device was just activated.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        mem: &GuestMemoryMmap,
        regions: &[(GuestAddress, usize, u64)],
        memfd: std::os::fd::RawFd,
    ) {
        if offset >= 0x100 {
            if self.status & STATUS_DRIVER_OK == 0 {
                self.device.write_config(offset - 0x100, data);
            } else {
                self.bad();
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad();
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_phase = self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
        let queue_phase =
            self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if features_phase => {
                let offered = self.device.features() | VIRTIO_F_VERSION_1;
                match self.driver_features_sel {
                    0 => Self::set_low(&mut self.acked_features, v & crate::bits::lo32(offered)),
                    1 => Self::set_high(&mut self.acked_features, v & crate::bits::hi32(offered)),
                    _ => self.bad(),
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if queue_phase => {
                if let Some(q) = self.queue() {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            0x44 if queue_phase => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            0x50 => {
                if self.status & STATUS_DRIVER_OK != 0 {
                    if let Ok(q) = u16::try_from(v) {
                        self.device.notify(q, mem);
                    }
                }
            }
            0x64 => {
                self.irq_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.write_status(v, mem, regions, memfd),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_phase => {
                if let Some(q) = self.queue() {
                    match offset {
                        0x80 => Self::set_low(&mut q.desc, v),
                        0x84 => Self::set_high(&mut q.desc, v),
                        0x90 => Self::set_low(&mut q.avail, v),
                        0x94 => Self::set_high(&mut q.avail, v),
                        0xa0 => Self::set_low(&mut q.used, v),
                        _ => Self::set_high(&mut q.used, v),
                    }
                }
            }
            _ => self.bad(),
        }
    }

    fn write_status(
        &mut self,
        v: u32,
        mem: &GuestMemoryMmap,
        regions: &[(GuestAddress, usize, u64)],
        memfd: std::os::fd::RawFd,
    ) {
        if v == 0 {
            self.reset();
            return;
        }
        // Status bits only ever get added by the driver (virtio 1.x 2.1.2).
        if v & self.status != self.status {
            self.bad();
            return;
        }
        let newly = v & !self.status;
        self.status = v;
        if newly & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: refuse the feature set.
            self.status &= !STATUS_FEATURES_OK;
            return;
        }
        if newly & STATUS_DRIVER_OK != 0 {
            let ready: Vec<QueueRegs> = self.queues.iter().copied().filter(|q| q.ready).collect();
            if let Some(bad) = ready.iter().position(|q| !q.is_valid(mem)) {
                tracing::warn!(queue = bad, "guest set up an invalid virtqueue");
                self.bad();
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            let act = Activation {
                mem,
                memfd_regions: regions,
                memfd,
                queues: &ready,
                acked_features: self.acked_features,
                irq: &self.irq,
                irq_status: &self.irq_status,
                kicks: &self.kicks,
            };
            if let Err(e) = self.device.activate(act) {
                tracing::warn!(error = %e, "device activation failed");
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
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
