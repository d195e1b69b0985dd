//! What every vhost-user frontend device shares: the connection handshake (owner, features,
//! protocol features), reading the device configuration from the backend, handing the backend
//! guest memory and the virtqueues on activation, and stopping the queues on reset.
//!
//! The devices (`vhost_blk`, `vhost_net`) only decide which features and which configuration
//! the guest sees; the hypervisor never touches the data either of them carries.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::virtio::{ActivateError, Activation, VIRTIO_F_VERSION_1};

/// Feature bit 30: the backend speaks the vhost-user protocol-feature extension.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio 1.x ring features every vhost-user device may pass on to the guest.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

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
}

/// One connected vhost-user backend, after the handshake.
pub struct VhostUserConn {
    frontend: Frontend,
    backend_features: u64,
    /// Protocol features both sides agreed on (`None`: no protocol-feature extension).
    protocol: Option<VhostUserProtocolFeatures>,
    /// How many vrings were handed to the backend at the last activation.
    active_queues: usize,
}

impl VhostUserConn {
    /// SET_OWNER, GET_FEATURES (VERSION_1 required) and, if the backend has the extension,
    /// the protocol features in `wanted` that it offers. `queues` is how many vrings the device
    /// has (GET_QUEUE_NUM, if used, replaces it).
    pub fn handshake(
        stream: UnixStream,
        wanted: VhostUserProtocolFeatures,
        queues: u16,
    ) -> Result<Self, ConnectError> {
        let mut frontend = Frontend::from_stream(stream, u64::from(queues.max(1)));
        frontend.set_owner().map_err(ConnectError::Handshake)?;
        let backend_features = frontend.get_features().map_err(ConnectError::Handshake)?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ConnectError::NotModern);
        }
        let protocol = if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(ConnectError::Handshake)?;
            let agreed = offered & wanted;
            frontend
                .set_protocol_features(agreed)
                .map_err(ConnectError::Handshake)?;
            Some(agreed)
        } else {
            None
        };
        Ok(VhostUserConn {
            frontend,
            backend_features,
            protocol,
            active_queues: 0,
        })
    }

    /// The virtio feature bits the backend offered (unfiltered).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Whether protocol feature `f` was agreed.
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol.is_some_and(|p| p.contains(f))
    }

    /// GET_QUEUE_NUM (needs the MQ protocol feature).
    pub fn queue_num(&mut self) -> Result<u64, ConnectError> {
        self.frontend
            .get_queue_num()
            .map_err(ConnectError::Handshake)
    }

    /// GET_CONFIG of the first `len` bytes of the device configuration (needs the CONFIG
    /// protocol feature; the backend must answer exactly `len` bytes).
    pub fn read_config(&mut self, len: u32) -> Result<Vec<u8>, ConnectError> {
        if !self.has_protocol(VhostUserProtocolFeatures::CONFIG) {
            return Err(ConnectError::NoConfig);
        }
        let want = usize::try_from(len).unwrap_or(0);
        let zeros = vec![0u8; want];
        let (_, payload) = self
            .frontend
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &zeros)
            .map_err(ConnectError::Config)?;
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
    /// (irqfd) eventfds, and enables the rings.
    pub fn activate(&mut self, act: &Activation<'_>) -> Result<(), ActivateError> {
        let mut features = act.acked_features & self.backend_features;
        if self.protocol.is_some() {
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
                    userspace_addr: Self::host_addr(act, gpa.0)?,
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
                desc_table_addr: Self::host_addr(act, q.desc)?,
                used_ring_addr: Self::host_addr(act, q.used)?,
                avail_ring_addr: Self::host_addr(act, q.avail)?,
                log_addr: None,
            };
            self.frontend.set_vring_num(i, q.size)?;
            self.frontend.set_vring_addr(i, &cfg)?;
            self.frontend.set_vring_base(i, 0)?;
            let call = act.irqs.get(i).ok_or(ActivateError::BadQueue(i))?;
            self.frontend.set_vring_call(i, call)?;
            let kick = act.kicks.get(i).ok_or(ActivateError::BadQueue(i))?;
            self.frontend.set_vring_kick(i, kick)?;
            // Recorded per ring, so that `reset` also stops a partly set-up device.
            self.active_queues = i + 1;
            if self.protocol.is_some() {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }

    /// Stops every ring handed to the backend (disable, then GET_VRING_BASE, which the
    /// backend answers once it stopped processing that ring).
    pub fn reset(&mut self) {
        for i in 0..self.active_queues {
            if self.protocol.is_some() {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            let _ = self.frontend.get_vring_base(i);
        }
        self.active_queues = 0;
    }
}
