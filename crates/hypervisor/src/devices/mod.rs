//! The devices a guest sees. Each one is attack surface, so there are few: a 16550 UART for
//! the console, an i8042 stub for reset, a virtio-rng on virtio-mmio, and vhost-user block
//! and net devices (one shared frontend, `vhost_user`) on virtio-pci behind PCIe root ports
//! with native hot-plug.

pub mod config_space;
pub mod legacy;
pub mod pci;
pub mod vhost_blk;
pub mod vhost_net;
pub mod vhost_user;
pub mod virtio;
pub mod virtio_mmio;
pub mod virtio_pci;
pub mod virtio_rng;
pub mod watchdog;
