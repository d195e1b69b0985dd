//! The devices a guest sees. Each one is attack surface, so there are few: a 16550 UART for
//! the console, an i8042 stub for reset, and virtio-mmio slots holding a virtio-rng and
//! vhost-user block devices.

pub mod legacy;
pub mod vhost_blk;
pub mod virtio_mmio;
pub mod virtio_rng;
