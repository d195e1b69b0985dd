//! Bulkhead block card: an encrypting vhost-user-blk backend (the EBS / instance-storage card of
//! the Nitro design). See `main.rs` for the process life cycle and `control` for the protocol.

pub mod backend;
pub mod card;
pub mod control;
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod metrics;
pub mod nbd;
pub mod request;
pub mod sandbox;
pub mod store;
pub mod update_stage;
pub mod xts;
