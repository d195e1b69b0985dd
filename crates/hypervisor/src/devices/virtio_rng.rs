//! virtio-rng: hands the guest bytes from the host's `getrandom(2)`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::virtio::{ActivateError, Activation, VirtioDevice, INT_VRING};

const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 64;
/// The most bytes handed out per descriptor, so one request cannot make the VMM spin.
const MAX_CHUNK: u32 = 4096;

#[derive(Default)]
pub struct VirtioRng {
    queue: Option<Queue>,
    irq: Option<Arc<EventFd>>,
    irq_status: Option<Arc<AtomicU32>>,
}

impl VirtioRng {
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes owned by us.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            return false;
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    true
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, act: Activation<'_>) -> Result<(), ActivateError> {
        let regs = act.queues.first().ok_or(ActivateError::BadQueue(0))?;
        let mut q = Queue::new(QUEUE_SIZE).map_err(|_| ActivateError::BadQueue(0))?;
        q.set_size(regs.size);
        q.set_desc_table_address(
            Some(crate::bits::lo32(regs.desc)),
            Some(crate::bits::hi32(regs.desc)),
        );
        q.set_avail_ring_address(
            Some(crate::bits::lo32(regs.avail)),
            Some(crate::bits::hi32(regs.avail)),
        );
        q.set_used_ring_address(
            Some(crate::bits::lo32(regs.used)),
            Some(crate::bits::hi32(regs.used)),
        );
        q.set_ready(true);
        if !q.is_valid(act.mem) {
            return Err(ActivateError::BadQueue(0));
        }
        self.queue = Some(q);
        self.irq = Some(act.irqs.first().ok_or(ActivateError::BadQueue(0))?.clone());
        self.irq_status = Some(act.irq_status.clone());
        Ok(())
    }
    fn notify(&mut self, _queue: u16, mem: &GuestMemoryMmap) {
        let Some(q) = self.queue.as_mut() else { return };
        let mut used_any = false;
        let mut buf = vec![0u8; MAX_CHUNK as usize];
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain {
                if !desc.is_write_only() {
                    continue;
                }
                let len = desc.len().min(MAX_CHUNK - written);
                let Some(slice) = buf.get_mut(..len as usize) else {
                    break;
                };
                if len == 0 || !fill_random(slice) {
                    break;
                }
                if mem.write_slice(slice, desc.addr()).is_err() {
                    break;
                }
                written += len;
            }
            if q.add_used(mem, head, written).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any && q.needs_notification(mem).unwrap_or(true) {
            if let (Some(st), Some(irq)) = (&self.irq_status, &self.irq) {
                st.fetch_or(INT_VRING, Ordering::SeqCst);
                let _ = irq.write(1);
            }
        }
    }
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queue
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }
    fn set_queue_positions(&mut self, positions: &[(u16, u16)]) {
        if let (Some(q), Some((avail, used))) = (self.queue.as_mut(), positions.first()) {
            q.set_next_avail(*avail);
            q.set_next_used(*used);
        }
    }
    fn reset(&mut self) -> Option<super::virtio::BackendWork> {
        self.queue = None;
        None
    }
}
