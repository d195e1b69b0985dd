//! The Bulkhead net card: one process per instance network interface, its own trust domain.
//!
//! * [`frame`]: typed parsers (and builders) for the guest's Ethernet/ARP/IPv4/UDP/TCP/ICMP.
//! * [`encap`]: the sealed encapsulation between hosts (AES-256-GCM, replay window), keys in a
//!   locked, non-dumpable page.
//! * [`responder`]: the card's own services for its guest (ARP for the gateway, DHCP) and
//!   anti-spoofing.
//! * [`secgroup`]: stateful security groups (ingress rules, a bounded conntrack table).
//! * [`datapath`]: the transport-neutral data path (guest frame → peer datagram and back, the
//!   control socket), shared by both guest sides:
//! * [`vhost`]: the vhost-user-net backend (the guest's virtio-net device; [`virtio`] checks its
//!   descriptor chains), and [`tap`]: a TAP device standing in for the guest (benchmarks,
//!   netns tests). [`sandbox`]: the card's hardening policy.
//!
//! See README.md for the key schedule and the wire format.

pub mod control;
pub mod datapath;
pub mod encap;
pub mod frame;
pub mod fuzzing;
pub mod keyring;
pub mod metrics;
pub mod responder;
pub mod routes;
pub mod sandbox;
pub mod secgroup;
pub mod tap;
pub mod vhost;
pub mod virtio;

/// Every error of the net card. Parse errors of untrusted bytes are values here, never panics;
/// the data path turns them into a counted drop.
#[derive(Debug, thiserror::Error)]
pub enum NetcardError {
    #[error("{what} is {got} bytes, need at least {want}")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{what}: bad field {field} = {value:#x}")]
    BadField {
        what: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("IPv4 header checksum does not verify")]
    BadChecksum,
    #[error("IPv4 fragment (not handled by the card)")]
    Fragment,
    #[error("frame too large: {len} bytes, limit {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("encapsulation: {0}")]
    Drop(#[from] encap::DropReason),
    #[error("AWS-LC {op} failed")]
    Crypto { op: &'static str },
    #[error("no key for this peer in the send epoch")]
    NoKey,
    #[error("sequence numbers of this key epoch are exhausted")]
    SequenceExhausted,
    #[error("sealed epoch key: {0}")]
    Sealing(#[from] bulkhead_sealing::SealingError),
    #[error("sealed epoch key: reserved bytes are not zero")]
    SealedKeyReserved,
    #[error("control request: {0}")]
    Control(String),
    #[error("secret page: {0}")]
    Locked(#[from] bulkhead_sealing::LockedSecretError),
    #[error("key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad {what} {value:?}: {why}")]
    Config {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Harden(#[from] bulkhead_harden::HardenError),
    #[error("vhost-user: {0}")]
    Vhost(String),
}

/// Crate result type.
pub type Result<T, E = NetcardError> = std::result::Result<T, E>;
