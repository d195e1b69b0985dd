//! virtio-blk as a vhost-user frontend: the block card (or qemu-storage-daemon) is the backend.
//!
//! The hypervisor never touches disk data. It negotiates features, hands the backend the
//! guest-memory memfd and the virtqueue addresses, and wires the queue notify register
//! (ioeventfd) and the device interrupt (irqfd) straight to the backend, so I/O flows between
//! the guest and the card without passing through the hypervisor.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::VhostUserProtocolFeatures;

use super::vhost_user::{VhostUserConn, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use super::virtio::{ActivateError, Activation, BackendWork, VirtioDevice, VIRTIO_F_VERSION_1};

pub use super::vhost_user::ConnectError;

const VIRTIO_ID_BLOCK: u32 = 2;
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
    | VIRTIO_BLK_F_MQ
    | (1 << 13) // DISCARD
    | (1 << 14) // WRITE_ZEROES
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_VERSION_1;

pub struct VhostUserBlk {
    conn: VhostUserConn,
    config: Vec<u8>,
    queues: u16,
    read_only: bool,
}

impl VhostUserBlk {
    /// Performs the handshake on an already connected socket. The device gets as many queues
    /// as the backend serves, at most `max_queues` (one per vCPU is what the guest uses).
    pub fn connect(
        stream: UnixStream,
        read_only: bool,
        max_queues: u16,
    ) -> Result<Self, ConnectError> {
        let mut conn = VhostUserConn::handshake(
            stream,
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ,
            1,
        )?;
        let mut queues = 1u16;
        if conn.has_protocol(VhostUserProtocolFeatures::MQ)
            && conn.backend_features() & VIRTIO_BLK_F_MQ != 0
        {
            let n = conn.queue_num()?;
            queues = u16::try_from(n)
                .unwrap_or(u16::MAX)
                .clamp(1, max_queues.max(1));
        }
        let mut config = if conn.has_protocol(VhostUserProtocolFeatures::CONFIG) {
            conn.read_config(BLK_CONFIG_LEN)?
        } else {
            vec![0u8; BLK_CONFIG_LEN as usize]
        };
        if let Some(nq) = config.get_mut(CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2) {
            nq.copy_from_slice(&queues.to_le_bytes());
        }
        Ok(VhostUserBlk {
            conn,
            config,
            queues,
            read_only,
        })
    }

    /// Takes over a card a previous hypervisor process connected (live update): the same
    /// connection, nothing sent (see [`VhostUserConn::adopt`]). `config` is the device
    /// configuration the old process read from the card (at most [`BLK_CONFIG_LEN`] bytes).
    pub fn adopt(
        stream: UnixStream,
        st: &crate::live_update::state::VhostUserState,
        config: &[u8],
        queues: u16,
        read_only: bool,
    ) -> Result<Self, ConnectError> {
        if config.len() != BLK_CONFIG_LEN as usize || queues == 0 {
            return Err(ConnectError::InvalidConfig(
                "handed-over block configuration",
            ));
        }
        let conn = VhostUserConn::adopt(stream, st, queues)?;
        Ok(VhostUserBlk {
            conn,
            config: config.to_vec(),
            queues,
            read_only,
        })
    }

    /// Whether the device is offered read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device configuration as the guest reads it.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Number of request queues the guest will see.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Capacity in 512-byte sectors, as the backend reports it.
    pub fn capacity_sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        if let Some(c) = self.config.get(..8) {
            b.copy_from_slice(c);
        }
        u64::from_le_bytes(b)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn features(&self) -> u64 {
        let mut f = self.conn.backend_features() & ALLOWED_FEATURES;
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
        self.conn.activate(&act)
    }
    fn reset(&mut self) -> Option<BackendWork> {
        self.conn.reset()
    }
    fn failed(&self) -> Option<bulkhead_channel::BackendFailure> {
        self.conn.failed()
    }
    fn settled(&self) -> bool {
        self.conn.settled()
    }
    fn stop_for_replace(&mut self) -> Option<Result<Vec<u16>, ActivateError>> {
        Some(self.conn.stop_for_replace())
    }
    fn resume_at(&mut self, act: &Activation<'_>, bases: &[u16]) -> Result<(), ActivateError> {
        self.conn.resume(act, bases)?;
        // No reply-ack is negotiated: make sure the card took every ring before the old one is
        // let go of.
        self.conn.barrier()
    }
    fn handover(&self) -> Option<super::virtio::DeviceHandover> {
        let (vhost, conn_fd) = self.conn.handover_state()?;
        Some(super::virtio::DeviceHandover {
            vhost,
            config: self.config.clone(),
            read_only: self.read_only,
            conn_fd,
        })
    }
}
