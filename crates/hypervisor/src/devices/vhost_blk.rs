//! virtio-blk as a vhost-user frontend: the block card (or qemu-storage-daemon) is the backend.
//!
//! The hypervisor never touches disk data. It negotiates features, hands the backend the
//! guest-memory memfd and the virtqueue addresses, and wires the queue notify register
//! (ioeventfd) and the device interrupt (irqfd) straight to the backend, so I/O flows between
//! the guest and the card without passing through the hypervisor.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::virtio::{ActivateError, Activation, VirtioDevice};

const VIRTIO_ID_BLOCK: u32 = 2;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio_blk_config is 60 bytes in virtio 1.2; read what the backend gives us.
const BLK_CONFIG_LEN: u32 = 60;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Offset of `num_queues` (le16) in virtio_blk_config.
const CONFIG_NUM_QUEUES: usize = 34;
const QUEUE_SIZE: u16 = 256;
/// Features the guest may see from a block backend.
const ALLOWED_FEATURES: u64 = (1 << 1) // SIZE_MAX
    | (1 << 2) // SEG_MAX
    | (1 << 4) // GEOMETRY
    | VIRTIO_BLK_F_RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 10) // TOPOLOGY
    | (1 << 11) // CONFIG_WCE
    | (1 << 12) // MQ
    | (1 << 13) // DISCARD
    | (1 << 14) // WRITE_ZEROES
    | (1 << 28) // RING_INDIRECT_DESC
    | (1 << 29) // RING_EVENT_IDX
    | (1 << 32); // VERSION_1

/// Why connecting to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("vhost-user handshake: {0}")]
    Handshake(vhost::Error),
    #[error("backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("reading the device config: {0}")]
    Config(vhost::Error),
}

pub struct VhostUserBlk {
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    config: Vec<u8>,
    queues: u16,
    read_only: bool,
    active: bool,
}

impl VhostUserBlk {
    /// Performs the handshake on an already connected socket. The device gets as many queues
    /// as the backend serves, at most `max_queues` (one per vCPU is what the guest uses).
    pub fn connect(
        stream: UnixStream,
        read_only: bool,
        max_queues: u16,
    ) -> Result<Self, ConnectError> {
        let mut frontend = Frontend::from_stream(stream, 1);
        frontend.set_owner().map_err(ConnectError::Handshake)?;
        let backend_features = frontend.get_features().map_err(ConnectError::Handshake)?;
        if backend_features & (1 << 32) == 0 {
            return Err(ConnectError::NotModern);
        }
        let protocol = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let mut config = vec![0u8; BLK_CONFIG_LEN as usize];
        let mut queues = 1u16;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(ConnectError::Handshake)?;
            let want =
                offered & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
            frontend
                .set_protocol_features(want)
                .map_err(ConnectError::Handshake)?;
            if want.contains(VhostUserProtocolFeatures::MQ)
                && backend_features & VIRTIO_BLK_F_MQ != 0
            {
                let n = frontend.get_queue_num().map_err(ConnectError::Handshake)?;
                queues = u16::try_from(n)
                    .unwrap_or(u16::MAX)
                    .clamp(1, max_queues.max(1));
            }
            if want.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, payload) = frontend
                    .get_config(0, BLK_CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &config)
                    .map_err(ConnectError::Config)?;
                let n = payload.len().min(config.len());
                config[..n].copy_from_slice(&payload[..n]);
            }
        }
        if let Some(nq) = config.get_mut(CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2) {
            nq.copy_from_slice(&queues.to_le_bytes());
        }
        Ok(VhostUserBlk {
            frontend,
            backend_features,
            protocol,
            config,
            queues,
            read_only,
            active: false,
        })
    }

    /// Number of request queues the guest will see.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Capacity in 512-byte sectors, as the backend reports it.
    pub fn capacity_sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(b)
    }

    fn host_addr(act: &Activation<'_>, gpa: u64) -> Result<u64, ActivateError> {
        act.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| ActivateError::NotInRam(gpa))
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn features(&self) -> u64 {
        let mut f = self.backend_features & ALLOWED_FEATURES;
        if self.queues <= 1 {
            f &= !VIRTIO_BLK_F_MQ;
        }
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.queues)]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.config.get(start..start.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }
    fn wants_ioeventfd(&self) -> bool {
        true
    }
    fn interrupt_always_vring(&self) -> bool {
        true
    }
    fn activate(&mut self, act: Activation<'_>) -> Result<(), ActivateError> {
        let mut features = act.acked_features & self.backend_features;
        if self.protocol {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(features)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = act
            .memfd_regions
            .iter()
            .map(|(gpa, size, off)| {
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa.0,
                    memory_size: *size as u64,
                    userspace_addr: Self::host_addr(&act, gpa.0)?,
                    mmap_offset: *off,
                    mmap_handle: act.memfd,
                })
            })
            .collect::<Result<_, ActivateError>>()?;
        self.frontend.set_mem_table(&regions)?;
        for (i, q) in act.queues.iter().enumerate() {
            let cfg = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: Self::host_addr(&act, q.desc)?,
                used_ring_addr: Self::host_addr(&act, q.used)?,
                avail_ring_addr: Self::host_addr(&act, q.avail)?,
                log_addr: None,
            };
            self.frontend.set_vring_num(i, q.size)?;
            self.frontend.set_vring_addr(i, &cfg)?;
            self.frontend.set_vring_base(i, 0)?;
            let call = act.irqs.get(i).ok_or(ActivateError::BadQueue(i))?;
            self.frontend.set_vring_call(i, call)?;
            let kick = act.kicks.get(i).ok_or(ActivateError::BadQueue(i))?;
            self.frontend.set_vring_kick(i, kick)?;
            if self.protocol {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        if self.active {
            for i in 0..usize::from(self.queues) {
                if self.protocol {
                    let _ = self.frontend.set_vring_enable(i, false);
                }
                let _ = self.frontend.get_vring_base(i);
            }
            self.active = false;
        }
    }
}
