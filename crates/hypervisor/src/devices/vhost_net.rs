//! virtio-net as a vhost-user frontend: the net card is the backend.
//!
//! As for disks, the hypervisor never touches a packet. It negotiates features, hands the card
//! the guest-memory memfd and the virtqueue addresses, and wires each queue's notify register
//! (ioeventfd) and interrupt (irqfd) straight to the card. Queue 0 receives, queue 1 transmits.
//!
//! The card, not the hypervisor, decides the interface's MAC (and MTU and link status): the
//! device configuration the guest reads is the card's, fetched once with GET_CONFIG. Features
//! are an allow-list: no checksum or segmentation offloads ever reach the guest (the card must
//! see whole, checksummed frames), and one queue pair only (multi-queue needs the control
//! queue, which this frontend does not serve).

use std::os::unix::net::UnixStream;

use vhost::vhost_user::VhostUserProtocolFeatures;

use super::vhost_user::{
    ConnectError, VhostUserConn, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::virtio::{ActivateError, Activation, BackendWork, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Features the guest may see from a net card.
const ALLOWED_FEATURES: u64 = VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_VERSION_1;
/// What is read from the card: mac[6], status (le16), max_virtqueue_pairs (le16), mtu (le16).
pub const NET_CONFIG_LEN: u32 = 12;
const CONFIG_MAX_PAIRS: usize = 8;
const CONFIG_MTU: usize = 10;
/// The smallest MTU a virtio-net driver accepts (RFC 791's 68).
const MIN_MTU: u16 = 68;
/// RX and TX.
const QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 256;

/// A MAC address as the card configured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The guest-visible configuration, checked. `parse` is the one parser for what the card
/// answers to GET_CONFIG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: Mac,
    /// `None` when the card offers no MTU (or one no driver would accept).
    pub mtu: Option<u16>,
    raw: [u8; NET_CONFIG_LEN as usize],
}

impl NetConfig {
    /// Checks the card's configuration bytes: a unicast, non-zero MAC; the MTU only if the card
    /// offers `VIRTIO_NET_F_MTU` and it is one a driver accepts. The queue-pair count the guest
    /// sees is always 1.
    pub fn parse(raw: &[u8], features: u64) -> Result<Self, ConnectError> {
        let raw: [u8; NET_CONFIG_LEN as usize] = raw
            .get(..NET_CONFIG_LEN as usize)
            .and_then(|s| s.try_into().ok())
            .ok_or(ConnectError::InvalidConfig("short device configuration"))?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&raw[..6]);
        if mac == [0; 6] {
            return Err(ConnectError::InvalidConfig("all-zero MAC"));
        }
        if mac[0] & 1 != 0 {
            return Err(ConnectError::InvalidConfig("multicast MAC"));
        }
        let mtu = u16::from_le_bytes([raw[CONFIG_MTU], raw[CONFIG_MTU + 1]]);
        let mtu = (features & VIRTIO_NET_F_MTU != 0 && mtu >= MIN_MTU).then_some(mtu);
        let mut raw = raw;
        raw[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2].copy_from_slice(&1u16.to_le_bytes());
        Ok(NetConfig {
            mac: Mac(mac),
            mtu,
            raw,
        })
    }
}

pub struct VhostUserNet {
    conn: VhostUserConn,
    config: NetConfig,
}

impl VhostUserNet {
    /// Performs the handshake on an already connected socket and reads the card's device
    /// configuration. The card must offer VERSION_1, VIRTIO_NET_F_MAC and the CONFIG protocol
    /// feature.
    pub fn connect(stream: UnixStream) -> Result<Self, ConnectError> {
        let mut conn = VhostUserConn::handshake(stream, VhostUserProtocolFeatures::CONFIG, QUEUES)?;
        if conn.backend_features() & VIRTIO_NET_F_MAC == 0 {
            return Err(ConnectError::MissingFeature("VIRTIO_NET_F_MAC"));
        }
        let raw = conn.read_config(NET_CONFIG_LEN)?;
        let config = NetConfig::parse(&raw, conn.backend_features())?;
        Ok(VhostUserNet { conn, config })
    }

    /// Takes over a card a previous hypervisor process connected (live update): the same
    /// connection, nothing sent (see [`VhostUserConn::adopt`]); `config` (what the old process
    /// read from the card) goes through [`NetConfig::parse`] again.
    pub fn adopt(
        stream: UnixStream,
        st: &crate::live_update::state::VhostUserState,
        config: &[u8],
    ) -> Result<Self, ConnectError> {
        let config = NetConfig::parse(config, st.backend_features)?;
        let conn = VhostUserConn::adopt(stream, st, QUEUES)?;
        Ok(VhostUserNet { conn, config })
    }

    /// The interface's MAC, as the card decided it.
    pub fn mac(&self) -> Mac {
        self.config.mac
    }

    /// The MTU the guest is told, if any.
    pub fn mtu(&self) -> Option<u16> {
        self.config.mtu
    }

    /// Whether this card may stand in for a running device whose driver acked `acked` and
    /// read the configuration `guest_config` (the first [`NET_CONFIG_LEN`] bytes the guest
    /// sees): it offers every acked feature, and the guest sees the same MAC (and the same
    /// MTU, when the MTU feature was acked).
    pub fn can_replace(&self, acked: u64, guest_config: &[u8]) -> Result<(), ReplaceError> {
        check_replacement(
            self.conn.backend_features(),
            &self.config,
            acked,
            guest_config,
        )
    }

    /// Hands a running device's rings to this card (see [`VhostUserConn::resume`]).
    pub fn resume(&mut self, act: &Activation<'_>, bases: &[u16]) -> Result<(), ActivateError> {
        self.conn.resume(act, bases)
    }
}

/// [`VhostUserNet::can_replace`] for a card that offered `backend_features` and `config`.
fn check_replacement(
    backend_features: u64,
    config: &NetConfig,
    acked: u64,
    guest_config: &[u8],
) -> Result<(), ReplaceError> {
    let offered = guest_features(backend_features, config) | VIRTIO_F_VERSION_1;
    if acked & !offered != 0 {
        return Err(ReplaceError::Features {
            missing: acked & !offered,
        });
    }
    if guest_config.get(..6) != Some(&config.raw[..6]) {
        return Err(ReplaceError::Mac);
    }
    if acked & VIRTIO_NET_F_MTU != 0
        && guest_config.get(CONFIG_MTU..CONFIG_MTU + 2)
            != Some(&config.raw[CONFIG_MTU..CONFIG_MTU + 2])
    {
        return Err(ReplaceError::Mtu);
    }
    Ok(())
}

/// Why a freshly connected card may not replace a device's backend in place.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    #[error("the card lacks features the guest acked: {missing:#x}")]
    Features { missing: u64 },
    #[error("the card's MAC is not the one the guest sees")]
    Mac,
    #[error("the card's MTU is not the one the guest sees")]
    Mtu,
}

/// The features the guest is offered: the card's, cut to the allow-list (no offloads, no
/// multi-queue, no control queue), without MTU when the card's MTU is unusable.
fn guest_features(offered: u64, config: &NetConfig) -> u64 {
    let mut f = offered & ALLOWED_FEATURES;
    if config.mtu.is_none() {
        f &= !VIRTIO_NET_F_MTU;
    }
    f
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn features(&self) -> u64 {
        guest_features(self.conn.backend_features(), &self.config)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(QUEUES)]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.config.raw.get(start..start.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }
    // The MAC is read-only for a virtio 1.x driver: configuration writes are ignored.
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
    fn handover(&self) -> Option<super::virtio::DeviceHandover> {
        let (vhost, conn_fd) = self.conn.handover_state()?;
        Some(super::virtio::DeviceHandover {
            vhost,
            config: self.config.raw.to_vec(),
            read_only: false,
            conn_fd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(mac: [u8; 6], status: u16, pairs: u16, mtu: u16) -> Vec<u8> {
        let mut v = mac.to_vec();
        v.extend_from_slice(&status.to_le_bytes());
        v.extend_from_slice(&pairs.to_le_bytes());
        v.extend_from_slice(&mtu.to_le_bytes());
        v
    }

    #[test]
    fn the_cards_config_is_checked_and_one_pair_is_shown() {
        let mac = [0x02, 0, 0, 0, 0, 7];
        let c = NetConfig::parse(&raw(mac, 1, 8, 1400), VIRTIO_NET_F_MTU).expect("valid");
        assert_eq!(c.mac, Mac(mac));
        assert_eq!(c.mac.to_string(), "02:00:00:00:00:07");
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(
            &c.raw[8..10],
            &1u16.to_le_bytes(),
            "queue pairs forced to 1"
        );
        assert_eq!(&c.raw[6..8], &1u16.to_le_bytes(), "status passed through");
        // No MTU feature, or an MTU no driver accepts: no MTU.
        assert_eq!(
            NetConfig::parse(&raw(mac, 1, 1, 1400), 0)
                .expect("valid")
                .mtu,
            None
        );
        assert_eq!(
            NetConfig::parse(&raw(mac, 1, 1, 67), VIRTIO_NET_F_MTU)
                .expect("valid")
                .mtu,
            None
        );
    }

    #[test]
    fn offloads_multiqueue_and_the_control_queue_never_reach_the_guest() {
        let c = NetConfig::parse(&raw([2, 0, 0, 0, 0, 1], 1, 4, 1500), VIRTIO_NET_F_MTU)
            .expect("valid");
        // Everything a backend could offer, bits 0..=40.
        let f = guest_features((1u64 << 41) - 1, &c);
        assert_eq!(
            f,
            VIRTIO_NET_F_MTU
                | VIRTIO_NET_F_MAC
                | VIRTIO_NET_F_MRG_RXBUF
                | VIRTIO_NET_F_STATUS
                | VIRTIO_RING_F_INDIRECT_DESC
                | VIRTIO_RING_F_EVENT_IDX
                | VIRTIO_F_VERSION_1
        );
        // CSUM (0), GUEST_CSUM (1), GUEST_TSO4 (7), HOST_TSO4 (11), CTRL_VQ (17), MQ (22).
        for bit in [0, 1, 7, 11, 17, 22] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        let no_mtu = NetConfig::parse(&raw([2, 0, 0, 0, 0, 1], 1, 1, 1500), 0).expect("valid");
        assert_eq!(
            guest_features(VIRTIO_NET_F_MTU | VIRTIO_NET_F_MAC, &no_mtu),
            VIRTIO_NET_F_MAC
        );
    }

    #[test]
    fn a_replacement_card_must_offer_the_acked_features_and_show_the_same_mac_and_mtu() {
        let mac = [0x02, 0, 0, 0, 0, 9];
        let offered = VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | VIRTIO_RING_F_EVENT_IDX;
        let old = NetConfig::parse(&raw(mac, 1, 1, 1400), offered).expect("valid");
        let acked = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU;
        // What the guest reads from the old device.
        let seen = old.raw;
        assert_eq!(check_replacement(offered, &old, acked, &seen), Ok(()));
        // More features than acked, or another link status: fine.
        let down = NetConfig::parse(&raw(mac, 0, 1, 1400), offered).expect("valid");
        assert_eq!(
            check_replacement(offered | VIRTIO_NET_F_STATUS, &down, acked, &seen),
            Ok(())
        );
        // A feature the guest acked is missing.
        assert_eq!(
            check_replacement(
                VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU,
                &old,
                acked | VIRTIO_RING_F_EVENT_IDX,
                &seen
            ),
            Err(ReplaceError::Features {
                missing: VIRTIO_RING_F_EVENT_IDX
            })
        );
        // Another MAC.
        let other =
            NetConfig::parse(&raw([0x02, 0, 0, 0, 0, 8], 1, 1, 1400), offered).expect("valid");
        assert_eq!(
            check_replacement(offered, &other, acked, &seen),
            Err(ReplaceError::Mac)
        );
        // Another MTU matters only if the guest acked the MTU feature.
        let mtu = NetConfig::parse(&raw(mac, 1, 1, 1500), offered).expect("valid");
        assert_eq!(
            check_replacement(offered, &mtu, acked, &seen),
            Err(ReplaceError::Mtu)
        );
        assert_eq!(
            check_replacement(offered, &mtu, acked & !VIRTIO_NET_F_MTU, &seen),
            Ok(())
        );
        // A guest that acked nothing yet: only the MAC counts.
        assert_eq!(check_replacement(offered, &mtu, 0, &seen), Ok(()));
        assert_eq!(
            check_replacement(offered, &other, 0, &seen),
            Err(ReplaceError::Mac)
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (bytes, what) in [
            (raw([0; 6], 1, 1, 1500), "zero MAC"),
            (raw([0x03, 0, 0, 0, 0, 1], 1, 1, 1500), "multicast MAC"),
            (
                raw([0x02, 0, 0, 0, 0, 1], 1, 1, 1500)[..11].to_vec(),
                "short",
            ),
            (Vec::new(), "empty"),
        ] {
            assert!(
                matches!(
                    NetConfig::parse(&bytes, VIRTIO_NET_F_MTU),
                    Err(ConnectError::InvalidConfig(_))
                ),
                "{what}"
            );
        }
    }
}
