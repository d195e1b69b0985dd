//! `bulkhead-hypervisor`: the Nitro Hypervisor of Bulkhead.
//!
//! A deliberately small KVM VMM. It partitions CPU and memory, presents a UART, an i8042 reset
//! line, a virtio-rng and vhost-user block and net devices (the cards serve them; no disk
//! block or packet passes through the hypervisor), and takes orders over one private channel
//! inherited from its parent. It has no network stack, opens no files after start, and has no
//! shell and no interactive access: the console is output only.

pub mod bits;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod image;
pub mod irq;
pub mod layout;
pub mod live_update;
pub mod memory;
pub mod mptable;
pub mod sandbox;
pub mod server;
pub mod startup;
pub mod vm;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on through poisoning (a panicked holder leaves plain data behind).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    KvmVersion(i32),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("memory size {mib} MiB is outside {min}..={max} MiB")]
    MemorySize { mib: u64, min: u64, max: u64 },
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    #[error("guest memory layout is invalid")]
    MemoryLayout,
    #[error("vCPU count {0} is outside 1..=254")]
    VcpuCount(u32),
    #[error("cannot read kernel {0}: {1}")]
    KernelFile(PathBuf, std::io::Error),
    #[error("not a bootable kernel (need an ELF vmlinux or a bzImage): {0}")]
    NotAKernel(String),
    #[error("cannot read initrd {0}: {1}")]
    InitrdFile(PathBuf, std::io::Error),
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooLarge { size: usize },
    #[error("the initrd at {initrd_start:#x} overlaps the kernel, which ends at {kernel_end:#x} (give the guest more memory)")]
    InitrdOverlapsKernel { kernel_end: u64, initrd_start: u64 },
    #[error("kernel command line is invalid or longer than 2048 bytes")]
    Cmdline,
    #[error("writing boot parameters: {0}")]
    BootParams(String),
    #[error("KVM accepted {set} of {want} MSRs")]
    MsrsRefused { set: usize, want: usize },
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("a device with that id is attached")]
    DeviceExists,
    #[error("no device with that id")]
    NoSuchDevice,
    #[error("not possible while the VM is {0:?}")]
    WrongState(bulkhead_channel::VmState),
    #[error("virtio device type {0} does not fit a PCI device id")]
    DeviceType(u32),
    #[error("the device has more queues than MSI-X vectors")]
    TooManyQueues,
    #[error("the guest has not enabled the card's BAR")]
    BarDisabled,
    #[error("out of MSI routes")]
    OutOfMsiRoutes,
    #[error("the interrupt routing table is full")]
    RoutingTableFull,
    #[error("vhost-user device: {0}")]
    VhostUser(#[from] devices::vhost_user::ConnectError),
    #[error("the device with that id is of another kind")]
    WrongDeviceKind,
    #[error("the device's backend failed: {0:?}")]
    BackendFailed(bulkhead_channel::BackendFailure),
    #[error("no free device slot")]
    NoFreeSlot,
    #[error("the device is busy (its backend is being stopped, or the guest reset it meanwhile)")]
    DeviceBusy,
    #[error("the replacement backend does not match the device: {0:?}")]
    Replace(bulkhead_channel::BackendFailure),
    #[error("connecting a --block socket: {0}")]
    DiskSocket(std::io::Error),
    #[error("connecting a --net socket: {0}")]
    NetSocket(std::io::Error),
    #[error("--cmdline-fd: {0}")]
    CmdlineFd(std::io::Error),
    #[error("--channel-fd: {0}")]
    ChannelFd(std::io::Error),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("sandbox: {0}")]
    Harden(#[from] bulkhead_harden::HardenError),
    #[error("thread: {0}")]
    Thread(std::io::Error),
    #[error("cpu topology: {0}")]
    Topology(String),
    #[error("live update (incoming): {0}")]
    Incoming(#[from] live_update::IncomingError),
}
