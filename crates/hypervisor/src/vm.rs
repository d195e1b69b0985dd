//! One VM: its KVM objects, memory, devices and vCPU threads.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_channel::{BackendFailure, VmState, VmStats};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, EntryPoint};
use crate::console::Console;
use crate::cpu::{self, GuestTopology};
use crate::devices::legacy::{PioBus, PioOutcome};
use crate::devices::pci::PciBus;
use crate::devices::vhost_blk::VhostUserBlk;
use crate::devices::vhost_net::VhostUserNet;
use crate::devices::virtio::{BackendState, VirtioDevice};
use crate::devices::virtio_mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio_pci::{self, VirtioPciDevice};
use crate::devices::virtio_rng::VirtioRng;
use crate::irq::IrqRouter;
use crate::layout::*;
use crate::memory::GuestRam;
use crate::{lock, mptable, Error};

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub threads_per_core: u8,
    pub echo_console: bool,
    /// Host CPUs to pin vCPU threads to (vCPU i on `pin[i % len]`).
    pub pin: Option<Vec<usize>>,
}

/// Why the VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset/powered off through the i8042.
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM could not run the guest (e.g. an instruction this KVM cannot emulate).
    InternalError,
    /// The controller (or a signal) asked for shutdown.
    Commanded,
    /// A vCPU failed in the VMM.
    VmmError,
}

#[derive(Debug)]
pub(crate) struct RunState {
    pub(crate) state: VmState,
    pub(crate) paused_vcpus: usize,
    exit: Option<ExitReason>,
    /// Bumped to ask every parked vCPU for its state (live update); each answers once per
    /// generation into [`Shared::captured`] and counts itself in `captured`.
    pub(crate) capture_gen: u64,
    pub(crate) captured: usize,
}

#[derive(Default)]
struct Counters {
    exits: AtomicU64,
    mmio: AtomicU64,
    pio: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) ram: GuestRam,
    pub(crate) pio: Mutex<PioBus>,
    pub(crate) slots: Mutex<Vec<Option<MmioTransport>>>,
    pub(crate) pci: Mutex<PciBus>,
    pub(crate) router: Arc<IrqRouter>,
    pub(crate) run: Mutex<RunState>,
    pub(crate) cv: Condvar,
    exit_evt: EventFd,
    counters: Counters,
    pub(crate) bad_guest: Arc<AtomicU64>,
    /// The MSRs KVM saves and restores for a vCPU (live update).
    pub(crate) msr_list: Vec<u32>,
    /// Each vCPU's state, captured when parked at the main thread's request (live update).
    pub(crate) captured: Mutex<Vec<Option<Result<crate::live_update::state::VcpuState, Error>>>>,
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// How long attach waits for a running guest's driver to bring a hot-plugged card up before
/// answering (the card stays plugged either way; the reply says whether the guest was seen).
/// Software KVM guests are slow; on hardware this takes milliseconds.
pub const ATTACH_WAIT: Duration = Duration::from_secs(30);
/// How long attach waits before raising the hot-plug event again for a card the guest has not
/// started to enumerate.
const REANNOUNCE_AFTER: Duration = Duration::from_secs(5);
/// How long detach waits for a running guest's driver to release (reset) a pulled card before
/// the backend connection is stopped regardless.
pub const DETACH_WAIT: Duration = Duration::from_secs(45);

/// How often the blocking [`Vm::attach_block`]/[`Vm::detach_block`] look at a wait.
const HOTPLUG_POLL: Duration = Duration::from_millis(20);

/// What a card in a hot-plug slot is. Block and net cards share the slots and the id space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
}

impl DeviceKind {
    /// The kind of a card by the PCI class code it reports.
    pub fn of_class(class: u32) -> Option<Self> {
        match class {
            virtio_pci::CLASS_STORAGE_OTHER => Some(DeviceKind::Block),
            virtio_pci::CLASS_NETWORK_ETHERNET => Some(DeviceKind::Net),
            _ => None,
        }
    }
}

/// What a hot-plug operation still waits for.
#[derive(Debug)]
enum WaitKind {
    /// The guest's driver to bring the card up (`DRIVER_OK`).
    Bind { reannounce_at: Instant },
    /// The guest's driver to reset the pulled card.
    Release,
}

/// A hot-plug operation waiting for the guest; advanced by [`Vm::poll_hotplug`].
#[derive(Debug)]
pub struct HotplugWait {
    id: String,
    port: usize,
    deadline: Instant,
    kind: WaitKind,
}

/// How a hot-plug operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    /// Whether the guest acknowledged it (see [`bulkhead_channel::Reply::Device`]).
    pub acknowledged: bool,
    /// Set when the card's backend is dead (it stopped answering within
    /// [`crate::devices::vhost_user::REPLY_TIMEOUT`], or its connection failed).
    pub failure: Option<BackendFailure>,
}

impl Ended {
    fn ok(acknowledged: bool) -> Self {
        Ended {
            acknowledged,
            failure: None,
        }
    }
}

/// What starting a hot-plug operation gave.
#[derive(Debug)]
pub enum Hotplug {
    /// Over already.
    Done(Ended),
    /// Waiting for the guest.
    Waiting(HotplugWait),
}

/// A built VM.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) console: Console,
    pub(crate) config: VmConfig,
    pub(crate) pending_vcpus: Vec<(u8, VcpuFd)>,
    threads: Vec<JoinHandle<()>>,
    entry: EntryPoint,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    pending_initrd: Option<(vm_memory::GuestAddress, usize)>,
}

impl Vm {
    /// Builds the VM (memory, kernel, devices, vCPUs); nothing runs until [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        Self::build(config, None)
    }

    /// Builds a VM around guest memory handed over by another hypervisor process (live
    /// update): memory slots, irqchip, PIT, vCPUs with their CPUID and devices in their reset
    /// state, no kernel loaded. The machine state is restored into it before it starts
    /// ([`crate::live_update`]).
    pub fn incoming(config: VmConfig, memfd: std::fs::File) -> Result<Self, Error> {
        Self::build(config, Some(memfd))
    }

    fn build(config: VmConfig, memfd: Option<std::fs::File>) -> Result<Self, Error> {
        let incoming = memfd.is_some();
        crate::startup::mark("build");
        if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
            return Err(Error::VcpuCount(u32::from(config.vcpus)));
        }
        let tpc = config.threads_per_core.max(1);
        if !config.vcpus.is_multiple_of(tpc) {
            return Err(Error::Topology(format!(
                "{} vCPUs are not whole cores of {tpc} threads",
                config.vcpus
            )));
        }
        let ram = match memfd {
            Some(f) => GuestRam::from_memfd(config.memory_mib, f)?,
            None => GuestRam::new(config.memory_mib)?,
        };
        crate::startup::mark("guest_ram");
        let topo = GuestTopology {
            threads_per_core: tpc,
            cores: config.vcpus / tpc,
        };
        // Loading the kernel and the initrd (reads + first touch of guest pages, the largest
        // start-up cost) runs on two threads of its own while this one builds the VM, its
        // memory slots and its vCPUs: the three are independent until vCPU 0's boot registers.
        let (kvm, vm_fd, vcpus, loaded, initrd) = std::thread::scope(|sc| {
            let kernel = sc.spawn(|| -> Result<_, Error> {
                if incoming {
                    // The guest's memory already holds its kernel, running.
                    return Ok(boot::LoadedKernel {
                        entry: EntryPoint::Pvh {
                            entry: vm_memory::GuestAddress(0),
                        },
                        setup_header: None,
                        kernel_end: 0,
                    });
                }
                let loaded = boot::load_kernel(&ram, &config.kernel)?;
                crate::startup::mark("kernel_loaded");
                Ok(loaded)
            });
            let initrd = sc.spawn(|| -> Result<_, Error> {
                let Some(p) = config.initrd.as_ref().filter(|_| !incoming) else {
                    return Ok(None);
                };
                let initrd = boot::load_initrd(&ram, p)?;
                crate::startup::mark("initrd_loaded");
                Ok(Some(initrd))
            });
            let built = create_vm(&ram, topo, config.vcpus);
            let joined = |what| std::io::Error::other(format!("{what} loader panicked"));
            let loaded = kernel.join().map_err(|_| Error::Thread(joined("kernel")))?;
            let initrd = initrd.join().map_err(|_| Error::Thread(joined("initrd")))?;
            let (kvm, vm_fd, vcpus) = built?;
            let (loaded, initrd) = (loaded?, initrd?);
            // Both were written at once: where they overlap, guest memory holds either's bytes.
            boot::check_initrd_clear_of_kernel(&loaded, initrd)?;
            Ok::<_, Error>((kvm, vm_fd, vcpus, loaded, initrd))
        })?;
        crate::startup::mark("loader_joined");
        let vm_fd = Arc::new(vm_fd);
        let router = Arc::new(IrqRouter::new(vm_fd.clone()));

        let console = Console::new(crate::console::DEFAULT_CAPACITY, config.echo_console);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let bad_guest = Arc::new(AtomicU64::new(0));
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let shared = Arc::new(Shared {
            ram,
            pio: Mutex::new(PioBus::new(console.clone(), serial_irq)),
            slots: Mutex::new((0..VIRTIO_SLOTS).map(|_| None).collect()),
            pci: Mutex::new(PciBus::new(HOTPLUG_SLOTS, router.clone())),
            router,
            run: Mutex::new(RunState {
                state: VmState::Created,
                paused_vcpus: 0,
                exit: None,
                capture_gen: 0,
                captured: 0,
            }),
            cv: Condvar::new(),
            exit_evt,
            counters: Counters::default(),
            bad_guest,
            msr_list: crate::live_update::machine::saved_msrs(&kvm)?,
            captured: Mutex::new((0..config.vcpus).map(|_| None).collect()),
        });

        crate::startup::mark("shared_state");
        if !incoming {
            mptable::write(&shared.ram.mem, config.vcpus)?;
            if let Some((_, vcpu)) = vcpus.first() {
                cpu::setup_boot_vcpu(vcpu, &shared.ram.mem, loaded.entry)?;
            }
        }
        crate::startup::mark("boot_vcpu");
        let pending = vcpus;

        let mut vm = Vm {
            kvm,
            vm_fd,
            shared,
            console,
            config,
            pending_vcpus: pending,
            threads: Vec::new(),
            entry: loaded.entry,
            setup_header: loaded.setup_header,
            pending_initrd: initrd,
        };
        vm.add_device(Box::new(VirtioRng::new()))?;
        crate::startup::mark("devices");
        Ok(vm)
    }

    fn add_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<usize, Error> {
        let mut slots = lock(&self.shared.slots);
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(Error::NoFreeSlot)?;
        let gsi = VIRTIO_IRQ_BASE + u32::try_from(slot).map_err(|_| Error::NoFreeSlot)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm_fd
            .register_irqfd(&irq, gsi)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let t = MmioTransport::new(device, irq, self.shared.bad_guest.clone())
            .map_err(Error::EventFd)?;
        let base = VIRTIO_MMIO_BASE + (slot as u64) * VIRTIO_MMIO_SIZE;
        for (q, kick) in t.kicks().iter().enumerate() {
            let q = u32::try_from(q).map_err(|_| Error::NoFreeSlot)?;
            self.vm_fd
                .register_ioevent(kick, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        }
        if let Some(s) = slots.get_mut(slot) {
            *s = Some(t);
        }
        Ok(slot)
    }

    /// Attaches a vhost-user block device whose backend is connected on `stream`, as a
    /// virtio-pci card in a free hot-plug slot, and waits for the guest (blocking; for the
    /// command loop see [`Vm::begin_attach`]).
    pub fn attach_block(
        &mut self,
        id: &str,
        stream: UnixStream,
        read_only: bool,
    ) -> Result<bool, Error> {
        let h = self.begin_attach(id, stream, read_only)?;
        self.finish(h)
    }

    /// Attaches a vhost-user net device (a net card) connected on `stream`, as a virtio-pci
    /// card in a free hot-plug slot, and waits for the guest (blocking; for the command loop
    /// see [`Vm::begin_attach_net`]).
    pub fn attach_net(&mut self, id: &str, stream: UnixStream) -> Result<bool, Error> {
        let h = self.begin_attach_net(id, stream)?;
        self.finish(h)
    }

    /// Detaches a block device and waits for the guest (blocking; for the command loop see
    /// [`Vm::begin_detach`]).
    pub fn detach_block(&mut self, id: &str) -> Result<bool, Error> {
        let h = self.begin_detach(id, DeviceKind::Block)?;
        self.finish(h)
    }

    /// Detaches a net device and waits for the guest (blocking).
    pub fn detach_net(&mut self, id: &str) -> Result<bool, Error> {
        let h = self.begin_detach(id, DeviceKind::Net)?;
        self.finish(h)
    }

    /// Drives `h` to its end, sleeping between looks: whether the guest acknowledged it, or
    /// [`Error::BackendFailed`].
    fn finish(&self, h: Hotplug) -> Result<bool, Error> {
        let ended = match h {
            Hotplug::Done(e) => e,
            Hotplug::Waiting(mut w) => loop {
                if let Some(e) = self.poll_hotplug(&mut w, Instant::now()) {
                    break e;
                }
                std::thread::sleep(HOTPLUG_POLL);
            },
        };
        match ended.failure {
            Some(f) => Err(Error::BackendFailed(f)),
            None => Ok(ended.acknowledged),
        }
    }

    /// The checks every attach makes before talking to the backend: the VM has not stopped,
    /// the id is new, and a slot is free (block and net cards share the slots).
    fn check_attach(&self, id: &str) -> Result<VmState, Error> {
        let state = self.state();
        if state == VmState::Stopped {
            return Err(Error::WrongState(state));
        }
        let pci = lock(&self.shared.pci);
        if pci.port_of(id).is_some() {
            return Err(Error::DeviceExists);
        }
        if pci.free_port().is_none() {
            return Err(Error::NoFreeSlot);
        }
        Ok(state)
    }

    /// The part of an attach that does not wait for the guest: checks, the vhost-user
    /// handshake, and the card put in a free slot. Before `start` the card is simply present
    /// when the guest enumerates PCI ([`Hotplug::Done`]`(false)`: the guest has not run). On a
    /// running guest it is hot-plugged (PCIe native hot-plug) and the result is a wait that
    /// [`Vm::poll_hotplug`] ends once the guest's driver brought the card up or after
    /// [`ATTACH_WAIT`]; the card stays plugged either way.
    pub fn begin_attach(
        &mut self,
        id: &str,
        stream: UnixStream,
        read_only: bool,
    ) -> Result<Hotplug, Error> {
        let state = self.check_attach(id)?;
        // One request queue per vCPU at most (what the guest's blk-mq uses); MSI-X has room
        // for 64 queues plus the configuration vector.
        let max_queues = u16::from(self.config.vcpus).min(64);
        let dev = VhostUserBlk::connect(stream, read_only, max_queues)?;
        tracing::info!(
            device = id,
            sectors = dev.capacity_sectors(),
            queues = dev.queues(),
            "vhost-user block backend connected"
        );
        self.plug_card(id, state, DeviceKind::Block, Box::new(dev))
    }

    /// [`Vm::begin_attach`] for a net card: the handshake reads the card's MAC and MTU; one
    /// queue pair (RX, TX).
    pub fn begin_attach_net(&mut self, id: &str, stream: UnixStream) -> Result<Hotplug, Error> {
        let state = self.check_attach(id)?;
        let dev = VhostUserNet::connect(stream)?;
        tracing::info!(
            device = id,
            mac = %dev.mac(),
            mtu = ?dev.mtu(),
            "vhost-user net backend connected"
        );
        self.plug_card(id, state, DeviceKind::Net, Box::new(dev))
    }

    /// Puts `dev` in place of device `id`'s backend and returns the old one, unless the guest
    /// reset or (re)activated the device since `epoch` was read (then `dev` comes back).
    fn swap_device(
        &self,
        id: &str,
        dev: Box<dyn VirtioDevice>,
        epoch: u64,
    ) -> Result<Box<dyn VirtioDevice>, Box<dyn VirtioDevice>> {
        let mut pci = lock(&self.shared.pci);
        let card = pci
            .port_of(id)
            .and_then(|port| pci.ports.get_mut(port))
            .and_then(|p| p.card.as_mut());
        match card {
            Some(c) => c.replace_device(dev, epoch),
            None => Err(dev),
        }
    }

    /// The backend state of device `id`, which must be a `kind` card whose guest driver is not
    /// between a reset and a (re)activation: what a replacement card is checked against and
    /// resumed from. Taken under the bus lock, which is released on return.
    fn settled_backend(
        &self,
        id: &str,
        kind: DeviceKind,
        config_len: usize,
    ) -> Result<BackendState, Error> {
        let st = {
            let pci = lock(&self.shared.pci);
            let port = pci.port_of(id).ok_or(Error::NoSuchDevice)?;
            let card = pci
                .ports
                .get(port)
                .and_then(|p| p.card.as_ref())
                .ok_or(Error::NoSuchDevice)?;
            if DeviceKind::of_class(card.class_code()) != Some(kind) {
                return Err(Error::WrongDeviceKind);
            }
            card.backend_state(config_len)
                .ok_or(Error::WrongDeviceKind)?
                .map_err(Error::EventFd)?
        };
        if !st.settled {
            return Err(Error::DeviceBusy);
        }
        Ok(st)
    }

    /// Replaces the backend of net device `id` with the card connected on `stream`, in place:
    /// the guest sees no reset and no hot-plug event (what QEMU does when a vhost-user-net
    /// backend reconnects). The new card must offer every feature the guest acked and show
    /// the same MAC (and MTU, if acked); otherwise it is refused and the device stays as it
    /// was. If the guest's driver has the device running, the new card gets the memory table
    /// and every ring, each starting where the guest's used ring stands (buffers the dead
    /// card had taken but not returned are lost: packet loss, which TCP recovers from), with
    /// the same kick and interrupt eventfds. Backend round trips (bounded by the watchdog)
    /// happen with the bus unlocked; if the guest reset or (re)activated the device meanwhile,
    /// the new card is stopped again and the answer is [`Error::DeviceBusy`] (try again).
    pub fn reconnect_net(&mut self, id: &str, stream: UnixStream) -> Result<(), Error> {
        use crate::devices::vhost_net::{ReplaceError, NET_CONFIG_LEN};
        let state = self.state();
        if state == VmState::Stopped {
            return Err(Error::WrongState(state));
        }
        let kind_of = |pci: &PciBus| {
            let port = pci.port_of(id).ok_or(Error::NoSuchDevice)?;
            pci.ports
                .get(port)
                .and_then(|p| p.card.as_ref())
                .map(|c| DeviceKind::of_class(c.class_code()))
                .ok_or(Error::NoSuchDevice)
        };
        // Refuse what needs no backend first: an unknown id or a disk.
        if kind_of(&lock(&self.shared.pci))? != Some(DeviceKind::Net) {
            return Err(Error::WrongDeviceKind);
        }
        let mut dev = VhostUserNet::connect(stream)?;
        let config_len = usize::try_from(NET_CONFIG_LEN).unwrap_or(12);
        let st = self.settled_backend(id, DeviceKind::Net, config_len)?;
        dev.can_replace(st.acked_features, &st.config)
            .map_err(|e| {
                tracing::warn!(device = id, error = %e, "refused a replacement net card");
                match e {
                    ReplaceError::Features { .. } => {
                        Error::Replace(BackendFailure::FeatureMismatch)
                    }
                    ReplaceError::Mac | ReplaceError::Mtu => {
                        Error::Replace(BackendFailure::IdentityMismatch)
                    }
                }
            })?;
        let mut bases = Vec::with_capacity(st.queues.len());
        if st.active {
            let ram = &self.shared.ram;
            for q in &st.queues {
                // The used ring's idx: everything before it the guest got back.
                use vm_memory::Bytes;
                let idx: u16 = ram
                    .mem
                    .read_obj(vm_memory::GuestAddress(q.used.wrapping_add(2)))
                    .map_err(|_| Error::BackendFailed(BackendFailure::Vring))?;
                bases.push(u16::from_le(idx));
            }
            let irq_status = Arc::default();
            let act = crate::devices::virtio::Activation {
                mem: &ram.mem,
                memfd_regions: &ram.regions,
                memfd: ram.memfd.as_raw_fd(),
                queues: &st.queues,
                acked_features: st.acked_features,
                irqs: &st.irqs,
                irq_status: &irq_status,
                kicks: &st.kicks,
            };
            dev.resume(&act, &bases).map_err(|e| {
                tracing::warn!(device = id, error = %e, "the replacement net card failed taking over the rings");
                Error::BackendFailed(dev.failed().unwrap_or(BackendFailure::Vring))
            })?;
        }
        let swapped = self.swap_device(id, Box::new(dev), st.epoch);
        match swapped {
            Ok(old) => {
                // Closing the dead card's connection waits for nothing.
                drop(old);
                tracing::info!(device = id, active = st.active, rings = ?bases, "net card reconnected in place");
                Ok(())
            }
            Err(mut new) => {
                tracing::warn!(
                    device = id,
                    "the guest reset the device during a reconnect: refused, try again"
                );
                if let Some(w) = new.reset() {
                    let _ = w.run();
                }
                Err(Error::DeviceBusy)
            }
        }
    }

    /// Card update: moves block device `id` from its running card to the card connected on
    /// `stream`, in place (no reset, no hot-plug event in the guest). The new card is
    /// handshaken first and must show the same capacity, block size and queue count and offer
    /// every feature the guest acked, or it is refused and nothing changes. If the device is
    /// running, the old card's rings are stopped (GET_VRING_BASE: a block card answers once
    /// every request it took is completed, so nothing completes after it), the new card gets
    /// the memory table and each ring at the position the old card gave (cross-checked
    /// against the used index), with the same kick and interrupt eventfds, and the old
    /// connection is closed. A new card that fails to take the rings leaves the device on the
    /// old card, its rings handed back where they stopped. An old card that fails to stop is
    /// dead: the new card resumes at the used indexes.
    pub fn replace_block(&mut self, id: &str, stream: UnixStream) -> Result<(), Error> {
        use vm_memory::Bytes;
        const BLK_CONFIG_LEN: usize = 60;
        const VIRTIO_BLK_F_RO: u64 = 1 << 5;
        let state = self.state();
        if state == VmState::Stopped {
            return Err(Error::WrongState(state));
        }
        let st = self.settled_backend(id, DeviceKind::Block, BLK_CONFIG_LEN)?;
        let max_queues = u16::from(self.config.vcpus).min(64);
        let read_only = st.acked_features & VIRTIO_BLK_F_RO != 0;
        let mut dev = VhostUserBlk::connect(stream, read_only, max_queues)?;
        // Same volume shape: capacity (0..8), block size (20..24), queue count (34..36).
        let same = |r: std::ops::Range<usize>| dev.config().get(r.clone()) == st.config.get(r);
        if !(same(0..8) && same(20..24) && same(34..36)) {
            tracing::warn!(
                device = id,
                "refused a replacement block card: another volume shape"
            );
            return Err(Error::Replace(BackendFailure::IdentityMismatch));
        }
        if st.acked_features & !dev.features() != 0 {
            tracing::warn!(
                device = id,
                missing = st.acked_features & !dev.features(),
                "refused a replacement block card: it lacks features the guest acked"
            );
            return Err(Error::Replace(BackendFailure::FeatureMismatch));
        }
        let ram = &self.shared.ram;
        let used_idx = |q: &crate::devices::virtio::QueueRegs| -> Result<u16, Error> {
            ram.mem
                .read_obj::<u16>(vm_memory::GuestAddress(q.used.wrapping_add(2)))
                .map(u16::from_le)
                .map_err(|_| Error::BackendFailed(BackendFailure::Vring))
        };
        let irq_status = Arc::default();
        let act = crate::devices::virtio::Activation {
            mem: &ram.mem,
            memfd_regions: &ram.regions,
            memfd: ram.memfd.as_raw_fd(),
            queues: &st.queues,
            acked_features: st.acked_features,
            irqs: &st.irqs,
            irq_status: &irq_status,
            kicks: &st.kicks,
        };
        let with_old = |f: &mut dyn FnMut(&mut dyn VirtioDevice)| -> Result<(), Error> {
            let mut pci = lock(&self.shared.pci);
            let port = pci.port_of(id).ok_or(Error::NoSuchDevice)?;
            let dev = pci
                .ports
                .get_mut(port)
                .and_then(|p| p.card.as_mut())
                .and_then(|c| c.virtio_device_mut())
                .ok_or(Error::NoSuchDevice)?;
            f(dev);
            Ok(())
        };
        let started = Instant::now();
        let mut bases = Vec::new();
        if st.active {
            let mut stopped = None;
            with_old(&mut |old| stopped = old.stop_for_replace())?;
            let used: Vec<u16> = st.queues.iter().map(used_idx).collect::<Result<_, _>>()?;
            bases = match stopped {
                Some(Ok(b)) if b.len() == used.len() => {
                    if b != used {
                        tracing::warn!(device = id, bases = ?b, used = ?used, "the old card stopped its rings with requests not completed");
                    }
                    b
                }
                other => {
                    tracing::warn!(device = id, stop = ?other.map(|r| r.map_err(|e| e.to_string())), "the old card did not stop its rings: resuming at the used indexes");
                    used
                }
            };
            if let Err(e) = dev.resume_at(&act, &bases) {
                tracing::warn!(device = id, error = %e, "the new block card failed taking over the rings: the old card keeps the device");
                let mut back = Ok(());
                with_old(&mut |old| back = old.resume_at(&act, &bases))?;
                if let Err(e) = back {
                    tracing::error!(device = id, error = %e, "the old card did not take its rings back");
                }
                return Err(Error::BackendFailed(
                    dev.failed().unwrap_or(BackendFailure::Vring),
                ));
            }
        }
        let swapped = self.swap_device(id, Box::new(dev), st.epoch);
        match swapped {
            Ok(old) => {
                // Closing the old card's connection: it erases its key and exits.
                drop(old);
                tracing::info!(device = id, active = st.active, rings = ?bases, took_us = started.elapsed().as_micros(), "block card replaced in place");
                Ok(())
            }
            Err(mut new) => {
                tracing::warn!(
                    device = id,
                    "the guest reset the device during a card update: refused, try again"
                );
                if let Some(w) = new.reset() {
                    let _ = w.run();
                }
                Err(Error::DeviceBusy)
            }
        }
    }

    /// Puts a connected device in a free slot as a virtio-pci card (see [`Vm::begin_attach`]).
    fn plug_card(
        &mut self,
        id: &str,
        state: VmState,
        kind: DeviceKind,
        dev: Box<dyn VirtioDevice>,
    ) -> Result<Hotplug, Error> {
        let card = VirtioPciDevice::new(
            id,
            dev,
            self.shared.router.as_ref(),
            self.shared.bad_guest.clone(),
        )?;
        let announce = state != VmState::Created;
        let port = {
            let mut pci = lock(&self.shared.pci);
            let port = pci.free_port().ok_or(Error::NoFreeSlot)?;
            let router = self.shared.router.clone();
            let p = pci.ports.get_mut(port).ok_or(Error::NoFreeSlot)?;
            p.plug(Box::new(card), announce, router.as_ref());
            pci.used(port);
            port
        };
        tracing::info!(
            device = id,
            ?kind,
            port,
            hotplug = announce,
            "card attached"
        );
        if state != VmState::Running {
            return Ok(Hotplug::Done(Ended::ok(false)));
        }
        let now = Instant::now();
        Ok(Hotplug::Waiting(HotplugWait {
            id: id.to_owned(),
            port,
            deadline: now + ATTACH_WAIT,
            kind: WaitKind::Bind {
                reannounce_at: now + REANNOUNCE_AFTER,
            },
        }))
    }

    /// The part of a detach that does not wait for the guest. The card named `id` must be of
    /// `kind` ([`Error::WrongDeviceKind`] otherwise: a DetachNet never pulls a disk). Before
    /// boot, after the VM stopped, or for a card the guest never bound, the card is taken out
    /// at once ([`Hotplug::Done`]`(true)`). Otherwise the slot reports the card gone and the
    /// result is a wait that [`Vm::poll_hotplug`] ends once the guest's driver released (reset)
    /// the card or after [`DETACH_WAIT`]; then the backend connection is stopped and closed
    /// either way.
    pub fn begin_detach(&mut self, id: &str, kind: DeviceKind) -> Result<Hotplug, Error> {
        let state = self.state();
        let router = self.shared.router.clone();
        let mut pci = lock(&self.shared.pci);
        let port = pci.port_of(id).ok_or(Error::NoSuchDevice)?;
        let p = pci.ports.get_mut(port).ok_or(Error::NoSuchDevice)?;
        let found = p
            .card
            .as_ref()
            .and_then(|c| DeviceKind::of_class(c.class_code()));
        if found != Some(kind) {
            return Err(Error::WrongDeviceKind);
        }
        let bound = p.card.as_ref().is_some_and(|c| c.driver_attached());
        let (out, acknowledged) = if matches!(state, VmState::Created | VmState::Stopped) {
            tracing::info!(device = id, ?kind, port, "card detached");
            (p.unplug(router.as_ref(), false), true)
        } else {
            p.pull(router.as_ref());
            if bound && state == VmState::Running {
                return Ok(Hotplug::Waiting(HotplugWait {
                    id: id.to_owned(),
                    port,
                    deadline: Instant::now() + DETACH_WAIT,
                    kind: WaitKind::Release,
                }));
            }
            if bound {
                // A paused guest cannot release it: take it out now.
                tracing::info!(
                    device = id,
                    ?kind,
                    port,
                    "card hot-unplugged from a paused guest"
                );
            } else {
                tracing::info!(device = id, ?kind, port, "unbound card hot-unplugged");
            }
            (p.unplug(router.as_ref(), true), !bound)
        };
        // Stopping the backend may wait for it: never with the bus locked.
        drop(pci);
        Ok(Hotplug::Done(Ended {
            acknowledged,
            failure: out.finish(),
        }))
    }

    /// One look at a hot-plug wait, never blocking: `Some(acknowledged)` once it is over.
    /// An attach is over when the guest's driver has the card running, when the VM no longer
    /// runs, or at its deadline (meanwhile the plug event is raised again every
    /// [`REANNOUNCE_AFTER`] for a card the guest has not started to enumerate). A detach is
    /// over when the driver has reset the card, when the VM has stopped, or at its deadline;
    /// it then takes the card out (leaving a husk: see [`crate::devices::pci::RootPort::unplug`]).
    pub fn poll_hotplug(&self, w: &mut HotplugWait, now: Instant) -> Option<Ended> {
        let state = self.state();
        let router = self.shared.router.clone();
        let mut pci = lock(&self.shared.pci);
        let port = w.port;
        match &mut w.kind {
            WaitKind::Bind { reannounce_at } => {
                let card = pci.ports.get(port).and_then(|p| p.card.as_ref());
                if let Some(failure) = card.and_then(|c| c.backend_failure()) {
                    tracing::warn!(device = %w.id, ?failure, "hot-plugged card: its backend failed");
                    return Some(Ended {
                        acknowledged: false,
                        failure: Some(failure),
                    });
                }
                let ready = card.is_none_or(|c| c.driver_ready());
                if ready || state != VmState::Running || now >= w.deadline {
                    tracing::info!(
                        device = %w.id,
                        ready,
                        "hot-plugged card: guest driver {}",
                        if ready { "bound" } else { "not bound yet" }
                    );
                    return Some(Ended::ok(ready));
                }
                if now >= *reannounce_at {
                    *reannounce_at = now + REANNOUNCE_AFTER;
                    if let Some(p) = pci.ports.get_mut(port) {
                        if p.reannounce(router.as_ref()) {
                            tracing::info!(
                                device = %w.id,
                                port,
                                "guest has not enumerated the card yet: hot-plug event raised again"
                            );
                        }
                    }
                }
                None
            }
            WaitKind::Release => {
                let released = pci
                    .ports
                    .get(port)
                    .is_none_or(|p| p.card.as_ref().is_none_or(|c| !c.driver_attached()));
                if !released && state != VmState::Stopped && now < w.deadline {
                    return None;
                }
                // A husk even when the driver has reset the device: it writes 0 to the status
                // and then reads it back until it reads 0, and that read may come after this.
                let out = pci
                    .ports
                    .get_mut(port)
                    .map(|p| p.unplug(router.as_ref(), true));
                // Stopping the backend may wait for it: never with the bus locked.
                drop(pci);
                let failure = out.and_then(|o| o.finish());
                let released = released && state != VmState::Stopped;
                tracing::info!(device = %w.id, port, released, ?failure, "card hot-unplugged");
                Some(Ended {
                    acknowledged: released,
                    failure,
                })
            }
        }
    }
    /// Number of attached block devices.
    pub fn block_devices(&self) -> usize {
        self.devices_of(DeviceKind::Block)
    }

    /// Number of attached net devices.
    pub fn net_devices(&self) -> usize {
        self.devices_of(DeviceKind::Net)
    }

    /// Number of attached cards whose backend failed for good.
    pub fn failed_devices(&self) -> usize {
        lock(&self.shared.pci)
            .ports
            .iter()
            .filter_map(|p| p.card.as_ref())
            .filter(|c| c.backend_failure().is_some())
            .count()
    }

    fn devices_of(&self, kind: DeviceKind) -> usize {
        lock(&self.shared.pci)
            .ports
            .iter()
            .filter_map(|p| p.card.as_ref())
            .filter(|c| DeviceKind::of_class(c.class_code()) == Some(kind))
            .count()
    }

    /// What the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest memory's memfd (handed to a new process on a live update).
    pub fn memfd(&self) -> std::os::fd::RawFd {
        self.shared.ram.memfd.as_raw_fd()
    }

    /// The console handle.
    pub fn console(&self) -> Console {
        self.console.clone()
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        lock(&self.shared.run).state
    }

    /// Why the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.shared.run).exit
    }

    /// An fd that becomes readable when the VM stops.
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        self.shared.exit_evt.as_raw_fd()
    }

    fn kernel_cmdline(&self) -> String {
        let mut cl = self.config.cmdline.clone();
        let slots = lock(&self.shared.slots);
        for (i, s) in slots.iter().enumerate() {
            if s.is_some() {
                let base = VIRTIO_MMIO_BASE + (i as u64) * VIRTIO_MMIO_SIZE;
                let irq = VIRTIO_IRQ_BASE as usize + i;
                cl.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            }
        }
        cl
    }

    /// Writes the final boot parameters and starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), Error> {
        {
            let st = lock(&self.shared.run);
            if st.state != VmState::Created {
                return Err(Error::WrongState(st.state));
            }
        }
        let cmdline = self.kernel_cmdline();
        tracing::debug!(%cmdline, "kernel command line");
        boot::load_command_line(&self.shared.ram, &cmdline)?;
        match self.entry {
            EntryPoint::Pvh { .. } => {
                boot::write_pvh_info(&self.shared.ram, cmdline.len() + 1, self.pending_initrd)?
            }
            EntryPoint::Linux64 { .. } => boot::write_linux_boot_params(
                &self.shared.ram,
                self.setup_header,
                cmdline.len() + 1,
                self.pending_initrd,
            )?,
        }
        crate::startup::mark("boot_params");
        self.spawn_vcpus(VmState::Running)
    }

    /// Starts the vCPU threads of a VM whose state was restored (live update), running or
    /// paused as the old process had it.
    pub(crate) fn start_restored(&mut self, running: bool) -> Result<(), Error> {
        let state = if running {
            VmState::Running
        } else {
            VmState::Paused
        };
        self.spawn_vcpus(state)
    }

    fn spawn_vcpus(&mut self, state: VmState) -> Result<(), Error> {
        // SAFETY: `noop_handler` is async-signal-safe (it does nothing); the signal only serves
        // to interrupt KVM_RUN.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| Error::Thread(std::io::Error::other(e.to_string())))?;
        lock(&self.shared.run).state = state;
        for (i, vcpu) in self.pending_vcpus.drain(..) {
            let shared = self.shared.clone();
            let pin = self
                .config
                .pin
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(|p| p[usize::from(i) % p.len()]);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(i, vcpu, shared, pin))
                .map_err(Error::Thread)?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// Interrupts every vCPU's KVM_RUN once (they resume unless paused or stopped).
    pub fn kick_all(&self) {
        for h in &self.threads {
            // SAFETY: the pthread handle is valid while the JoinHandle is alive; the signal has
            // a no-op handler installed in `start`.
            unsafe {
                libc::pthread_kill(h.as_pthread_t(), kick_signal());
            }
        }
    }

    /// Stops vCPUs; returns when every vCPU is parked.
    pub fn pause(&self) -> Result<(), VmState> {
        {
            let mut st = lock(&self.shared.run);
            if st.state != VmState::Running {
                return Err(st.state);
            }
            st.state = VmState::Paused;
        }
        let want = self.threads.len();
        for _ in 0..2000 {
            self.kick_all();
            let st = lock(&self.shared.run);
            if st.paused_vcpus >= want || st.state == VmState::Stopped {
                return Ok(());
            }
            // A vCPU that parks notifies: wake at once rather than after the whole millisecond.
            let _ = self.shared.cv.wait_timeout(st, Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resumes after `pause`.
    pub fn resume(&self) -> Result<(), VmState> {
        let mut st = lock(&self.shared.run);
        if st.state != VmState::Paused {
            return Err(st.state);
        }
        st.state = VmState::Running;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Stops the VM and joins its threads.
    pub fn shutdown(&mut self) {
        request_exit(&self.shared, ExitReason::Commanded);
        self.kick_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }

    /// Waits until the VM stops by itself, then joins the vCPU threads.
    pub fn wait(&mut self) -> ExitReason {
        {
            let mut st = lock(&self.shared.run);
            while st.state != VmState::Stopped {
                st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        self.kick_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        self.exit_reason().unwrap_or(ExitReason::VmmError)
    }

    /// Counters for `Stats`.
    pub fn stats(&self) -> VmStats {
        let (console_bytes, console_dropped) = self.console.totals();
        let c = &self.shared.counters;
        VmStats {
            vcpus: u32::from(self.config.vcpus),
            memory_mib: self.config.memory_mib,
            vcpu_exits: c.exits.load(Ordering::Relaxed),
            mmio_exits: c.mmio.load(Ordering::Relaxed),
            pio_exits: c.pio.load(Ordering::Relaxed),
            console_bytes,
            console_dropped,
            block_devices: u32::try_from(self.block_devices()).unwrap_or(u32::MAX),
            net_devices: u32::try_from(self.net_devices()).unwrap_or(u32::MAX),
            failed_devices: u32::try_from(self.failed_devices()).unwrap_or(u32::MAX),
            bad_guest_accesses: self.shared.bad_guest.load(Ordering::Relaxed)
                + lock(&self.shared.pio)
                    .unknown_accesses
                    .load(Ordering::Relaxed),
        }
    }
}

/// A new VM's KVM handle, VM fd and (index, fd) of each vCPU.
type BuiltVm = (Kvm, VmFd, Vec<(u8, VcpuFd)>);

/// Creates the VM with `ram` as its memory, its in-kernel irqchip and PIT, and `vcpus` vCPUs
/// with their CPUID and MSRs (vCPU 0's boot registers come later, once the kernel is loaded).
///
/// The order is measured (docs/status.md, issue 18): a memory slot registered after the
/// irqchip and the PIT exist cost 4–16 ms on the development host (the slot update waits for
/// the in-kernel devices' readers to pass a grace period), registered first about 0.1 ms.
fn create_vm(ram: &GuestRam, topo: GuestTopology, vcpus: u8) -> Result<BuiltVm, Error> {
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmVersion(v));
    }
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    crate::startup::mark("kvm_create_vm");
    register_memory(&vm_fd, ram)?;
    crate::startup::mark("memory_registered");
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm_fd
        .create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    crate::startup::mark("irqchip");
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
    crate::startup::mark("pit");
    let mut created = Vec::new();
    for i in 0..vcpus {
        let vcpu = vm_fd
            .create_vcpu(u64::from(topo.apic_id(i)))
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        cpu::setup_vcpu(&kvm, &vcpu, topo, i)?;
        created.push((i, vcpu));
    }
    crate::startup::mark("vcpus_created");
    Ok((kvm, vm_fd, created))
}

/// Registers every region of `ram` as a KVM memory slot.
fn register_memory(vm_fd: &VmFd, ram: &GuestRam) -> Result<(), Error> {
    for (slot, (gpa, size, _)) in ram.regions.iter().enumerate() {
        let host = vm_memory::GuestMemoryBackend::get_host_address(&ram.mem, *gpa)
            .map_err(|_| Error::MemoryLayout)?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| Error::MemoryLayout)?,
            guest_phys_addr: gpa.0,
            memory_size: *size as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `region` describes a mapping owned by `ram`, which lives in `Shared` for as
        // long as the VM fd (and so the memory slot) exists.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

fn request_exit(shared: &Shared, reason: ExitReason) {
    let mut st = lock(&shared.run);
    if st.state != VmState::Stopped {
        st.state = VmState::Stopped;
        st.exit = Some(reason);
        let _ = shared.exit_evt.write(1);
    }
    shared.cv.notify_all();
}

/// Pins the calling thread to host CPU `cpu`.
fn pin_to(cpu: usize) -> Result<(), std::io::Error> {
    let setsize = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    if cpu >= setsize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `set` is a plain bitmask struct we own (all-zero is the empty set); `cpu` is below
    // CPU_SETSIZE (checked above), so CPU_SET stays inside it; sched_setaffinity(0) targets this
    // thread and only reads `set`.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`, a valid timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

fn mmio_slot(addr: u64) -> Option<(usize, u64)> {
    let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
    let slot = usize::try_from(off / VIRTIO_MMIO_SIZE).ok()?;
    (slot < VIRTIO_SLOTS as usize).then_some((slot, off % VIRTIO_MMIO_SIZE))
}

/// A guest read outside the virtio-mmio windows: a PCI card's BAR, a pulled card's husk, or
/// nothing (all ones).
fn pci_read(shared: &Shared, addr: u64, data: &mut [u8]) {
    let mut pci = lock(&shared.pci);
    if let Some((card, off)) = pci.card_at(addr) {
        card.bar_read(off, data);
    } else if pci.husk_at(addr) {
        data.fill(0);
    } else {
        data.fill(0xff);
    }
}

/// A guest write outside the virtio-mmio windows. If it reset a card, stopping the card's
/// backend (which waits for the card's answer, at most the backend watchdog's bound) happens
/// after the bus is unlocked: a stuck card delays only this vCPU's write, never the command
/// loop or the other vCPUs.
fn pci_write(shared: &Shared, addr: u64, data: &[u8]) {
    let work = {
        let mut pci = lock(&shared.pci);
        if let Some((card, off)) = pci.card_at(addr) {
            card.bar_write(off, data, &shared.ram, shared.router.as_ref());
            card.take_backend_work()
        } else {
            if !pci.husk_at(addr) {
                shared.bad_guest.fetch_add(1, Ordering::Relaxed);
            }
            None
        }
    };
    if let Some(w) = work {
        let _ = w.run();
    }
}

fn vcpu_thread(index: u8, mut vcpu: VcpuFd, shared: Arc<Shared>, pin: Option<usize>) {
    // A vCPU that cannot be pinned where it was told would run on its parent's CPUs (the host
    // cores): the VM stops instead.
    if let Some(cpu) = pin {
        if let Err(e) = pin_to(cpu) {
            tracing::error!(vcpu = index, cpu, error = %e, "cannot pin the vCPU thread");
            request_exit(&shared, ExitReason::VmmError);
            return;
        }
    }
    crate::startup::mark("vcpu_thread_started");
    if let Err(e) = crate::sandbox::apply_thread_filter(crate::sandbox::ThreadRole::Vcpu) {
        tracing::error!(vcpu = index, error = %e, "cannot install the vCPU seccomp filter");
        request_exit(&shared, ExitReason::VmmError);
        return;
    }
    crate::startup::mark("vcpu_filter");
    if index == 0 {
        // Benchmarks read this line: the moment the VMM first enters the guest.
        tracing::info!(mono_ns = monotonic_ns(), "entering guest");
    }
    let mut answered_gen = 0;
    loop {
        {
            let mut st = lock(&shared.run);
            if st.state == VmState::Paused {
                st.paused_vcpus += 1;
                shared.cv.notify_all();
                while st.state == VmState::Paused {
                    if st.capture_gen != answered_gen {
                        // A live update wants this vCPU's state: read it with the lock let go.
                        answered_gen = st.capture_gen;
                        drop(st);
                        let r =
                            crate::live_update::machine::capture_vcpu(&mut vcpu, &shared.msr_list);
                        if let Some(slot) = lock(&shared.captured).get_mut(usize::from(index)) {
                            *slot = Some(r);
                        }
                        st = lock(&shared.run);
                        st.captured += 1;
                        shared.cv.notify_all();
                        continue;
                    }
                    st = shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.paused_vcpus -= 1;
            }
            if st.state == VmState::Stopped {
                return;
            }
        }
        shared.counters.exits.fetch_add(1, Ordering::Relaxed);
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                tracing::trace!(vcpu = index, port = format_args!("{port:#x}"), data = ?data, "pio out");
                shared.counters.pio.fetch_add(1, Ordering::Relaxed);
                if PciBus::claims_port(port) {
                    lock(&shared.pci).pio_write(port, data);
                } else if lock(&shared.pio).write(port, data) == PioOutcome::Reset {
                    tracing::info!(vcpu = index, "guest reset via i8042");
                    request_exit(&shared, ExitReason::GuestReset);
                    return;
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                tracing::trace!(vcpu = index, port = format_args!("{port:#x}"), "pio in");
                shared.counters.pio.fetch_add(1, Ordering::Relaxed);
                if PciBus::claims_port(port) {
                    lock(&shared.pci).pio_read(port, data);
                } else {
                    lock(&shared.pio).read(port, data);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                tracing::trace!(
                    vcpu = index,
                    addr = format_args!("{addr:#x}"),
                    len = data.len(),
                    "mmio read"
                );
                shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                let mut slots = lock(&shared.slots);
                match mmio_slot(addr)
                    .and_then(|(s, off)| slots.get_mut(s)?.as_mut().map(|t| (t, off)))
                {
                    Some((t, off)) => t.read(off, data),
                    None => {
                        drop(slots);
                        pci_read(&shared, addr, data);
                    }
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                tracing::trace!(vcpu = index, addr = format_args!("{addr:#x}"), data = ?data, "mmio write");
                shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                let mut slots = lock(&shared.slots);
                match mmio_slot(addr)
                    .and_then(|(s, off)| slots.get_mut(s)?.as_mut().map(|t| (t, off)))
                {
                    Some((t, off)) => t.write(off, data, &shared.ram),
                    None => {
                        drop(slots);
                        pci_write(&shared, addr, data);
                    }
                }
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                tracing::warn!(vcpu = index, "guest triple-faulted");
                request_exit(&shared, ExitReason::TripleFault);
                return;
            }
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union for this exit reason.
                let (sub, n, data) = unsafe {
                    (
                        run.__bindgen_anon_1.internal.suberror,
                        run.__bindgen_anon_1.internal.ndata,
                        run.__bindgen_anon_1.internal.data,
                    )
                };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let shown = usize::try_from(n).unwrap_or(0).min(data.len());
                tracing::error!(vcpu = index, suberror = sub, rip = format_args!("{rip:#x}"), data = ?&data[..shown], "KVM internal error (emulation failure?)");
                request_exit(&shared, ExitReason::InternalError);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::info!(vcpu = index, kind, "system event");
                request_exit(&shared, ExitReason::GuestReset);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                tracing::error!(vcpu = index, reason, "KVM entry failed");
                request_exit(&shared, ExitReason::VmmError);
                return;
            }
            Ok(other) => {
                tracing::debug!(vcpu = index, exit = ?other, "unhandled exit");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if tracing::enabled!(tracing::Level::TRACE) {
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    tracing::trace!(vcpu = index, rip = format_args!("{rip:#x}"), "kicked");
                }
            }
            Err(e) => {
                tracing::error!(vcpu = index, error = %e, "KVM_RUN failed");
                request_exit(&shared, ExitReason::VmmError);
                return;
            }
        }
    }
}
