//! The real backend: every instance is a `bulkhead-hypervisor serve` process driven over its
//! private channel, every attached volume a `bulkhead-blockcard` process driven over its control
//! socket. Both kinds of process are started by the [`Launcher`] (the controller itself cannot
//! exec or connect); the controller keeps only the channel and control connections.
//!
//! | API | what happens |
//! |---|---|
//! | CreateInstance | launcher spawns the hypervisor: the VM is created (kernel loaded), not started |
//! | StartInstance | `Start` (first boot); after Stop, `Resume`; after the guest powered itself off, a fresh boot (as Reboot) |
//! | StopInstance | `Pause`: vCPUs stop, guest memory is kept (no ACPI power button yet) |
//! | RebootInstance | `Shutdown`, respawn, re-attach every volume (new vhost-user connection to the same card), `Start` |
//! | TerminateInstance | `Shutdown`, then every card gets `Detach` (it zeroizes the key and exits) |
//! | AttachVolume | launcher spawns a card for the volume's backing file, the controller sends it `Attach` with the sealed blob (unopened), launcher connects to the card's vhost-user socket and the fd goes to the hypervisor with `AttachBlock` (SCM_RIGHTS). Before the first start the disk is there at boot; on a running (or stopped = paused) instance the hypervisor hot-plugs it (PCIe native hot-plug) and, when running, answers once the guest driver has bound it |
//! | DetachVolume | `DetachBlock` (on a running guest: hot-unplug, the hypervisor waits for the guest to release the disk), then card `Detach` (key zeroized), card reaped |
//! | GetConsole | `ReadConsole` from the controller's cursor, appended to a bounded per-instance buffer |
//! | AttachNetwork | launcher spawns `bulkhead-netcard vhost` for the instance's interface (created with CreateInstance's `network`) with the sealed VPC epoch key (unopened: it goes to a 0600 file the card reads before its sandbox), a UDP port of this host's range and the interface's sequence-floor file; then a vhost-user connection to the card goes to the hypervisor with `AttachNet`: before the first start the NIC is there at boot, on a running guest it is hot-plugged |
//! | SetNetworkRoutes / SetNetworkRules | relayed to the card's control socket (`routes` / `rules`); kept, so a restarted card gets the current ones |
//! | (card dies) | the launcher reports the exit; the controller restarts the card with the same configuration, port, sequence-floor file and the sealed key blob it kept (sealed to this host's key, useless elsewhere), re-plugs it, and audits the restart |
//! | TerminateInstance | also: the net card gets SIGTERM (it wipes its key pages) and is reaped |
//! | (controller restart) | every change above is written to the durable host record before it is acknowledged; a restarted controller adopts what the record names from the keeper ([`HostBackend::adopt`]) |

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bulkhead_hypervisor_client::{
    Channel, ClientError, Command, CommandError, DeviceId, Reply, VmState,
};

mod card_update;
mod net_update;

/// Largest console chunk one `ReadConsole` may ask for (`bulkhead_channel::MAX_CONSOLE_CHUNK`).
const MAX_CONSOLE_CHUNK: u32 = 32 * 1024;

use crate::api::{
    InstanceDescription, InstanceState, InstanceStorageGib, NetworkSpec, ResourceId, SealedBlob,
};
use crate::backend::{
    BackendError, Capacity, InstanceBackend, InstanceSpec, NetCardRestart, NetCounters,
    VolumeBackend,
};
use crate::card_control::{self, CardReply};
use crate::launcher::{
    ChildKind, LaunchRefusal, LaunchReply, LaunchRequest, Launcher, LauncherError, NetCardLaunch,
};
use crate::record::{
    HostRecord, InstanceRecord, InstanceStoreRecord, NetCardRecord, NetworkRecord, PendingAttach,
    RecordedState, StoreDiskRecord, VolumeRecord,
};

/// Guest kernel arguments that boot the test guest on the development machines' software KVM:
/// the same as `guest/cmdline` (a unit test keeps them equal); configurable with
/// `--kernel-args` / `kernel_args`. Hardware KVM needs none of the `noxsave`/`clearcpuid` ones.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=-1 quiet noxsave \
     clearcpuid=popcnt,cx16,smap,pcid,invpcid,fsgsbase,smep,pku,umip";
/// Name under which the configured guest kernel is offered as an image.
pub const DEFAULT_IMAGE: &str = "test-guest";
/// x86 `COMMAND_LINE_SIZE` is 2048; keep room for the hypervisor's `virtio_mmio.device=` args.
pub const MAX_CMDLINE: usize = 1792;
/// Console bytes kept per instance (the oldest are dropped first).
pub const CONSOLE_KEEP: usize = 256 * 1024;
/// Grace for a hypervisor or card to exit after Shutdown/Detach before it is killed.
const EXIT_GRACE_MS: u64 = 10_000;
/// Timeout on a card's control connection.
const CARD_TIMEOUT: Duration = Duration::from_secs(30);

/// What the real backend needs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub image: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: String,
    /// Backing files live here as `<volume_id>.img`; created sparse if absent.
    pub volume_dir: PathBuf,
    pub volume_size_mib: u64,
    /// uid:gid that hypervisors and cards drop to (required for cards when running as root).
    pub run_as: Option<(u32, u32)>,
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    /// Whole-core isolation ([`crate::cores`]): each instance gets whole cores its vCPU threads
    /// are pinned to, the host cores stay with the host, and an instance is refused when whole
    /// cores are not free. `None`: cores are shared (nothing pinned; development only).
    pub cores: Option<crate::cores::CoreAllocator>,
    /// Net cards: this host's address for VPC datagrams and its UDP port range. `None`: no
    /// net card runs here (AttachNetwork answers `network_unavailable`).
    pub net: Option<NetHostConfig>,
}

/// Where this host's net cards listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHostConfig {
    pub host_ip: std::net::Ipv4Addr,
    /// First UDP port handed to a card.
    pub port_base: u16,
    /// How many ports (one per card) from `port_base`.
    pub ports: u16,
}

/// The device id of an instance's (single) VPC interface.
const NET_DEVICE: &str = "net0";
/// How many ports a card start tries before giving up (a port may be taken by someone else).
const NET_PORT_TRIES: usize = 4;

/// A running net card and everything needed to start it again.
#[derive(Clone)]
struct NetCard {
    /// Its process; `None`: the card is down (it could not be started again after a failed
    /// update, or after it died) and the dead-card poll starts it when `retry` is due.
    pid: Option<u32>,
    retry: net_update::NetRetry,
    listen: std::net::SocketAddr,
    epoch: u32,
    /// The sealed epoch key, kept only to restart the card; never opened here.
    sealed: SealedBlob,
    routes: Vec<String>,
    allow: Vec<String>,
    /// The installed release whose `bulkhead-netcard` it runs (`None`: the configured binary).
    release: Option<u64>,
}

struct Vm {
    pid: u32,
    /// Shared so that a hot-plug can wait on it without the instance's lock.
    chan: Arc<Channel>,
}

struct Attachment {
    device: DeviceId,
    card_pid: u32,
    control: UnixStream,
    /// The new card of a card update in flight (recorded before `ReplaceBlock`).
    updating: Option<u32>,
}

/// Guest device id of the instance-storage disk (plugged before any volume: the first disk).
const STORE_DEVICE: &str = "store0";
/// Directory under the volume directory that holds instance-storage backing files.
const STORE_DIR: &str = "instance-store";

/// An instance's instance storage: its size and, while it exists, the card serving the disk
/// (its key was made inside the card and never left it).
struct InstanceStore {
    gib: InstanceStorageGib,
    disk: Option<Attachment>,
}

struct HostInstance {
    desc: InstanceDescription,
    cmdline: String,
    vm: Option<Vm>,
    /// Set by the first Start: from then on the device set is fixed (no hot-plug yet).
    booted: bool,
    console: String,
    console_cursor: u64,
    volumes: BTreeMap<String, Attachment>,
    next_device: u32,
    network: Option<NetworkSpec>,
    net: Option<NetCard>,
    /// An attach in flight (recorded before the card starts, so a restarted controller undoes
    /// it: it was never acknowledged).
    attaching: Option<PendingAttach>,
    /// The instance's operation slot: the attach or detach in flight, which holds it (not the
    /// instance's lock) while the hypervisor hot-plugs.
    op: Option<&'static str>,
    /// The host CPUs of its whole cores (its vCPUs are pinned there); empty: not pinned.
    cpus: Vec<usize>,
    /// Instance storage, if the instance was created with it.
    store: Option<InstanceStore>,
    /// The new hypervisor of a live update in flight (recorded before the hand-over).
    updating: Option<u32>,
}

struct Slot {
    inst: Arc<Mutex<HostInstance>>,
    vcpus: u32,
    memory_mib: u32,
    live: bool,
}

#[derive(Default)]
struct Inner {
    instances: BTreeMap<ResourceId, Slot>,
    /// Volume ids attached anywhere on this host (one card per backing file).
    attached: BTreeSet<String>,
    draining: bool,
    /// UDP ports held by net cards.
    net_ports: BTreeSet<u16>,
    /// Net card pid → its instance.
    net_pids: BTreeMap<u32, ResourceId>,
    /// Who holds which whole cores (`None`: cores are shared).
    cores: Option<crate::cores::CoreAllocator>,
}

/// The host record as the controller keeps it in memory, and where it is stored.
struct Records {
    path: Option<PathBuf>,
    instances: BTreeMap<String, InstanceRecord>,
    draining: bool,
    /// The active release (DeployRelease): new instances start its hypervisor.
    release: Option<crate::record::ReleaseRecord>,
}

/// What adopting one recorded instance found (one `AdoptInstance` audit record each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub instance: String,
    /// `ok`, or what had to be done: `hypervisor_gone` (the VM died meanwhile: the instance is
    /// stopped), `card_gone` (a volume's card died: detached), `attach_rolled_back` (an attach
    /// the previous controller never acknowledged was undone), `card_update_completed` /
    /// `card_update_cancelled` (a card update in flight settled on the new / the old card),
    /// `card_update_old_card_gone` (the old card was exiting with no move seen: the new card
    /// is kept), `net_card_gone` (the net card is not running: adopted down, started again by
    /// the next poll).
    pub codes: Vec<&'static str>,
    pub hypervisor_pid: Option<u32>,
}

/// The result of [`HostBackend::adopt`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdoptReport {
    pub instances: Vec<Adopted>,
    /// Children no record named (started for an operation never acknowledged): reaped.
    pub orphans_reaped: Vec<u32>,
    pub millis: u64,
}

/// The real backend. See the module docs.
pub struct HostBackend {
    cfg: HostConfig,
    launcher: Launcher,
    inner: Mutex<Inner>,
    records: Mutex<Records>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Encodes a script for the test guest's `bulkhead.run=` (guest/README.md): bytes outside
/// `[A-Za-z0-9_./,:=+-]` become `\0ooo`, so the value has no space and stays one kernel argument.
pub fn encode_run(script: &str) -> String {
    script
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'_'
            | b'.'
            | b'/'
            | b','
            | b':'
            | b'='
            | b'+'
            | b'-' => char::from(b).to_string(),
            _ => format!("\\0{b:03o}"),
        })
        .collect()
}

/// The guest command line for `spec`.
pub fn guest_cmdline(kernel_args: &str, user_data: Option<&str>) -> Result<String, BackendError> {
    let mut cl = kernel_args.to_string();
    if let Some(ud) = user_data {
        cl.push_str(" bulkhead.run=");
        cl.push_str(&encode_run(ud));
    }
    if cl.len() > MAX_CMDLINE {
        return Err(BackendError::UserDataTooLarge);
    }
    Ok(cl)
}

fn launcher_err(what: &'static str) -> impl Fn(LauncherError) -> BackendError {
    move |e| {
        tracing::warn!(error = %e, what, "launcher call failed");
        BackendError::Unavailable
    }
}

/// Maps a channel failure to what the caller learns: each hypervisor refusal keeps its own kind
/// ([`BackendError::Hypervisor`], one code each), `WrongState` stays `WrongState`, and a channel
/// that no longer works (the process is gone or wedged) is `Unavailable`.
fn channel_err(what: &'static str) -> impl Fn(ClientError) -> BackendError {
    move |e| match e {
        ClientError::Refused(CommandError::WrongState(s)) => {
            tracing::info!(state = ?s, what, "hypervisor: wrong state");
            BackendError::WrongState
        }
        ClientError::Refused(r) => {
            tracing::warn!(error = %r, what, "hypervisor refused");
            BackendError::Hypervisor(r)
        }
        e => {
            tracing::warn!(error = %e, what, "hypervisor call failed");
            BackendError::Unavailable
        }
    }
}

/// The environment variable of the test-only fault hook.
pub const FAULT_ENV: &str = "BULKHEAD_FAULT";

/// A test-only fault the controller injects at a fixed point, so a test can make a crash land
/// at exactly that point instead of racing a `kill -9` against the work. Read once from
/// [`FAULT_ENV`] when the backend is built (controller start); compiled in always, inert unless
/// the variable is set in the controller's own environment, which only whoever starts the
/// process controls: no API, configuration file or token can set it. Values:
/// * `attach:after_card_keyed:exit` — AttachVolume exits the controller (status 70) right after
///   the block card has keyed the volume, before the disk is plugged into the guest;
/// * `attach:after_card_keyed:stall` — the same point, but the attach blocks forever (the test
///   then kills the controller with SIGKILL, mid-attach by construction);
/// * `adopt:after_first:stall` — a restarted controller stops for ever in the middle of its
///   adoption, right after it took over the first recorded instance's hypervisor (the test then
///   kills it and starts another, which must adopt again);
/// * `live_update:second:new_dies` — the second live update to an installed release this
///   controller makes has its new hypervisor process killed just before the old one hands over
///   (a deploy's live update then fails for real on that instance, and the deploy rolls back);
/// * `live_update:after_handover:exit` — a live update to an installed release exits the
///   controller (status 70) right after the old hypervisor handed the VM over, before the outcome
///   is recorded (the next controller must adopt the new process);
/// * `live_update:reply_lost` — a live update to an installed release that the hypervisors
///   completed reads its answer as lost (a channel I/O error): the controller must find out
///   which process holds the guest (the old one exits after a hand-over) and keep the new one;
/// * `card_update:after_replace:exit` — a card update exits the controller (status 70) right
///   after the hypervisor's `ReplaceBlock`, before the outcome is recorded (the next controller
///   must keep the new card);
/// * `card_update:replace_refused` — a card update's `ReplaceBlock`, after the old card handed
///   over, names a device the VM does not have, so the hypervisor refuses it (the update must
///   be undone: the old card told `CancelHandOver` keeps its key, the new one is detached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    AttachAfterCardKeyedExit,
    AttachAfterCardKeyedStall,
    AdoptAfterFirstStall,
    LiveUpdateSecondNewDies,
    LiveUpdateAfterHandoverExit,
    LiveUpdateReplyLost,
    CardUpdateAfterReplaceExit,
    CardUpdateReplaceRefused,
}

/// Live updates to an installed release made by this controller (for the fault hook).
static RELEASE_UPDATES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

static FAULT: OnceLock<Option<Fault>> = OnceLock::new();

fn fault() -> Option<Fault> {
    *FAULT.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        let f = match v.as_str() {
            "attach:after_card_keyed:exit" => Fault::AttachAfterCardKeyedExit,
            "attach:after_card_keyed:stall" => Fault::AttachAfterCardKeyedStall,
            "adopt:after_first:stall" => Fault::AdoptAfterFirstStall,
            "live_update:second:new_dies" => Fault::LiveUpdateSecondNewDies,
            "live_update:after_handover:exit" => Fault::LiveUpdateAfterHandoverExit,
            "live_update:reply_lost" => Fault::LiveUpdateReplyLost,
            "card_update:after_replace:exit" => Fault::CardUpdateAfterReplaceExit,
            "card_update:replace_refused" => Fault::CardUpdateReplaceRefused,
            _ => {
                tracing::warn!(value = %v, "unknown {FAULT_ENV} ignored");
                return None;
            }
        };
        tracing::warn!(fault = ?f, "{FAULT_ENV} is set: a test fault hook is armed");
        Some(f)
    })
}

impl HostBackend {
    /// A backend that keeps its durable record at `record` (none: nothing survives a restart).
    pub fn new(cfg: HostConfig, launcher: Launcher, record: Option<PathBuf>) -> Self {
        // The fault hook is read here, once, at controller start.
        let _ = fault();
        let cores = cfg.cores.clone();
        HostBackend {
            cfg,
            launcher,
            inner: Mutex::new(Inner {
                cores,
                ..Inner::default()
            }),
            records: Mutex::new(Records {
                path: record,
                instances: BTreeMap::new(),
                draining: false,
                release: None,
            }),
        }
    }

    /// The launcher's (keeper's) pid.
    pub fn keeper_pid(&self) -> u32 {
        self.launcher.pid()
    }

    /// The CPUs of the host cores (empty: cores are shared).
    pub fn host_cpus(&self) -> Vec<usize> {
        lock(&self.inner)
            .cores
            .as_ref()
            .map(crate::cores::CoreAllocator::host_cpus)
            .unwrap_or_default()
    }

    /// The durable record of one instance as it stands (`None` once terminated).
    fn record_of(g: &HostInstance) -> Option<InstanceRecord> {
        let state = match g.desc.state {
            InstanceState::Created => RecordedState::Created,
            InstanceState::Running => RecordedState::Running,
            InstanceState::Stopped => RecordedState::Stopped,
            InstanceState::Terminated => return None,
        };
        Some(InstanceRecord {
            id: g.desc.instance_id.clone(),
            image: g.desc.image.clone(),
            vcpus: g.desc.vcpus,
            memory_mib: g.desc.memory_mib,
            state,
            cmdline: g.cmdline.clone(),
            booted: g.booted,
            hypervisor_pid: g.vm.as_ref().map(|v| v.pid),
            hypervisor_update: g.updating,
            next_device: g.next_device,
            volumes: g
                .volumes
                .iter()
                .map(|(v, a)| VolumeRecord {
                    volume: v.clone(),
                    device: a.device.to_string(),
                    card_pid: a.card_pid,
                    card_update: a.updating,
                })
                .collect(),
            attaching: g.attaching.clone(),
            network: g.network.as_ref().map(|n| NetworkRecord {
                vpc: n.vpc,
                card_id: n.card_id,
                mac: n.mac.to_string(),
                ip: n.ip,
                prefix: n.prefix,
                gateway: n.gateway,
                mtu: n.mtu,
                allow: n.allow.clone(),
                routes: n.routes.clone(),
            }),
            net_card: g.net.as_ref().map(|c| NetCardRecord {
                pid: c.pid,
                listen: c.listen,
                epoch: c.epoch,
                sealed_key: c.sealed.to_hex(),
                routes: c.routes.clone(),
                allow: c.allow.clone(),
                release: c.release,
            }),
            cpus: g.cpus.clone(),
            instance_storage: g.store.as_ref().map(|s| InstanceStoreRecord {
                gib: s.gib.get(),
                disk: s.disk.as_ref().map(|a| StoreDiskRecord {
                    device: a.device.to_string(),
                    card_pid: a.card_pid,
                }),
            }),
        })
    }

    /// Makes the instance's current state durable before the operation is acknowledged: the
    /// children `commit` names are first marked recorded at the keeper (so they outlive this
    /// controller), then the record is written and fsync'd. A failure here fails the
    /// operation (it is not acknowledged).
    fn persist(&self, g: &HostInstance, commit: &[u32]) -> Result<(), BackendError> {
        if let Err(e) = self.launcher.commit(commit) {
            tracing::warn!(error = %e, "keeper: commit failed");
            return Err(BackendError::Unavailable);
        }
        let mut r = lock(&self.records);
        match Self::record_of(g) {
            Some(rec) => {
                r.instances.insert(rec.id.clone(), rec);
            }
            None => {
                r.instances.remove(&g.desc.instance_id);
            }
        }
        Self::store_locked(&r)
    }

    fn store_locked(r: &Records) -> Result<(), BackendError> {
        let Some(path) = &r.path else {
            return Ok(());
        };
        let rec = HostRecord {
            instances: r.instances.values().cloned().collect(),
            draining: r.draining,
            release: r.release.clone(),
        };
        rec.store(path).map_err(|e| {
            tracing::error!(error = %e, "host record not written: the operation is not acknowledged");
            BackendError::Unavailable
        })
    }

    /// Best-effort persist of a restarted child.
    fn persist_noticed_commit(&self, g: &HostInstance, pid: u32) {
        if let Err(e) = self.persist(g, &[pid]) {
            tracing::warn!(error = %e, instance = %g.desc.instance_id, "host record not updated");
        }
    }

    /// Best-effort persist for changes the controller noticed rather than made.
    fn persist_noticed(&self, g: &HostInstance) {
        if let Err(e) = self.persist(g, &[]) {
            tracing::warn!(error = %e, instance = %g.desc.instance_id, "host record not updated");
        }
    }

    fn instance(&self, id: &ResourceId) -> Result<Arc<Mutex<HostInstance>>, BackendError> {
        lock(&self.inner)
            .instances
            .get(id)
            .map(|s| Arc::clone(&s.inst))
            .ok_or(BackendError::NoSuchInstance)
    }

    fn spawn_vm(&self, inst: &HostInstance) -> Result<Vm, BackendError> {
        let req = LaunchRequest::SpawnVm {
            kernel: self.cfg.kernel.clone(),
            initrd: self.cfg.initrd.clone(),
            cmdline: inst.cmdline.clone(),
            memory_mib: u64::from(inst.desc.memory_mib),
            vcpus: u8::try_from(inst.desc.vcpus).map_err(|_| BackendError::NoCapacity)?,
            run_as: self.cfg.run_as,
            pin: inst.cpus.clone(),
            release: lock(&self.records).release.as_ref().map(|r| r.version),
        };
        let (reply, fd) = self
            .launcher
            .call_fd(&req)
            .map_err(launcher_err("spawn vm"))?;
        let LaunchReply::Spawned { pid } = reply else {
            return Err(BackendError::Unavailable);
        };
        let chan = Channel::from_fd(fd).map_err(channel_err("channel"))?;
        tracing::info!(instance = %inst.desc.instance_id, pid, "hypervisor spawned (VM created)");
        Ok(Vm {
            pid,
            chan: Arc::new(chan),
        })
    }

    /// Shuts a VM down (best effort) and reaps its process.
    fn end_vm(&self, vm: Vm) {
        if let Err(e) = vm.chan.call(Command::Shutdown, None) {
            tracing::warn!(pid = vm.pid, error = %e, "shutdown over the channel failed; killing");
        }
        let grace = EXIT_GRACE_MS;
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
            pid: vm.pid,
            grace_ms: grace,
        }) {
            tracing::warn!(pid = vm.pid, error = %e, "reaping hypervisor failed");
        }
    }

    /// A fresh vhost-user connection to the card, handed to the hypervisor.
    fn plug(&self, chan: &Channel, att: &Attachment) -> Result<(), BackendError> {
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::ConnectVhost { pid: att.card_pid })
            .map_err(launcher_err("connect vhost"))?;
        let r = chan.call(
            Command::AttachBlock {
                id: att.device.clone(),
                read_only: false,
            },
            Some(fd.as_raw_fd()),
        );
        drop(fd);
        match r {
            Ok(Reply::Device {
                guest_acknowledged: false,
                state: VmState::Running,
            }) => {
                tracing::warn!(device = %att.device, "hot-plugged disk not bound by the guest in time");
                Ok(())
            }
            Ok(_) => Ok(()),
            // The guest powered itself off: the disk is attached at the next boot instead.
            Err(ClientError::Refused(CommandError::WrongState(_))) => Err(BackendError::WrongState),
            Err(e) => Err(channel_err("attach block")(e)),
        }
    }

    /// Kills a card that holds no key (its attach was refused) and reaps it.
    fn kill_unkeyed_card(&self, pid: u32) {
        if let Err(e) = self
            .launcher
            .call(&LaunchRequest::Reap { pid, grace_ms: 0 })
        {
            tracing::warn!(pid, error = %e, "reaping card failed");
        }
    }

    /// Card `Detach` (it zeroizes the key and exits), then reap it.
    fn unplug_card(&self, mut att: Attachment) {
        match card_control::call(&mut att.control, &card_control::encode_detach()) {
            Ok(CardReply::Detached) => {}
            Ok(other) => tracing::warn!(pid = att.card_pid, reply = ?other, "card detach refused"),
            Err(e) => tracing::warn!(pid = att.card_pid, error = %e, "card detach failed"),
        }
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
            pid: att.card_pid,
            grace_ms: EXIT_GRACE_MS,
        }) {
            tracing::warn!(pid = att.card_pid, error = %e, "reaping card failed");
        }
    }

    /// Ends the current VM (if any), spawns a new one, re-attaches every volume, starts it.
    fn fresh_boot(&self, inst: &mut HostInstance) -> Result<(), BackendError> {
        Self::drain_console(inst);
        if let Some(vm) = inst.vm.take() {
            self.end_vm(vm);
        }
        let mut vm = self.spawn_vm(inst)?;
        inst.console_cursor = 0;
        // Instance storage first (the guest's first disk): the disk it had, or a fresh one
        // when the last one ended (Stop).
        if let Err(e) = self.start_store(inst) {
            self.end_vm(vm);
            return Err(e);
        }
        if let Some(att) = inst.store.as_ref().and_then(|s| s.disk.as_ref()) {
            if let Err(e) = self.plug(&vm.chan, att) {
                self.end_vm(vm);
                return Err(e);
            }
        }
        for att in inst.volumes.values() {
            if let Err(e) = self.plug(&vm.chan, att) {
                self.end_vm(vm);
                return Err(e);
            }
        }
        if let Some(pid) = inst.net.as_ref().and_then(|n| n.pid) {
            if let Err(e) = self.plug_net(&mut vm, pid) {
                self.end_vm(vm);
                return Err(e);
            }
        }
        if let Err(e) = vm.chan.call(Command::Start, None) {
            self.end_vm(vm);
            return Err(channel_err("start")(e));
        }
        inst.vm = Some(vm);
        inst.booted = true;
        Ok(())
    }

    /// Drains new console bytes from the VM into the instance's bounded buffer.
    fn drain_console(inst: &mut HostInstance) {
        let Some(vm) = inst.vm.as_mut() else {
            return;
        };
        for _ in 0..64 {
            let r = vm.chan.call(
                Command::ReadConsole {
                    cursor: inst.console_cursor,
                    max: MAX_CONSOLE_CHUNK,
                },
                None,
            );
            match r {
                Ok(Reply::Console { data, next, lost }) => {
                    if lost > 0 {
                        inst.console
                            .push_str(&format!("\n[bulkhead: {lost} console bytes lost]\n"));
                    }
                    inst.console_cursor = next;
                    if data.is_empty() {
                        break;
                    }
                    inst.console.push_str(&String::from_utf8_lossy(&data));
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "console read failed");
                    break;
                }
            }
        }
        if inst.console.len() > CONSOLE_KEEP {
            let mut cut = inst.console.len() - CONSOLE_KEEP;
            while !inst.console.is_char_boundary(cut) {
                cut += 1;
            }
            inst.console.drain(..cut);
        }
    }

    fn ensure_backing(&self, volume: &ResourceId) -> Result<PathBuf, BackendError> {
        let path = self.cfg.volume_dir.join(format!("{volume}.img"));
        let io = |e: std::io::Error| {
            tracing::warn!(error = %e, "volume backing file");
            BackendError::Unavailable
        };
        std::fs::create_dir_all(&self.cfg.volume_dir).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if f.metadata().map_err(io)?.len() == 0 {
            f.set_len(self.cfg.volume_size_mib.saturating_mul(1024 * 1024))
                .map_err(io)?;
        }
        Ok(path)
    }

    fn set_live(&self, id: &ResourceId, live: bool) {
        if let Some(s) = lock(&self.inner).instances.get_mut(id) {
            s.live = live;
        }
    }

    /// Drops an instance that was never acknowledged, with the cores it was given.
    fn forget(&self, id: &ResourceId) {
        let mut i = lock(&self.inner);
        i.instances.remove(id);
        if let Some(a) = i.cores.as_mut() {
            a.release(id.as_str());
        }
    }

    /// Where an instance's instance-storage disk lives (inside the volume directory, so the
    /// launcher lets a card open it).
    fn store_path(&self, id: &str) -> PathBuf {
        self.cfg
            .volume_dir
            .join(STORE_DIR)
            .join(format!("{id}.img"))
    }

    /// Starts the instance-storage card if the instance has instance storage and no disk now:
    /// a fresh sparse file (any older one is deleted first), a card on it, keyed with a key
    /// the card makes itself (`Ephemeral`). Returns the new card's pid (to be committed with
    /// the record); `None` when there was nothing to start. On failure nothing is left.
    fn start_store(&self, inst: &mut HostInstance) -> Result<Option<u32>, BackendError> {
        let Some(store) = inst.store.as_ref() else {
            return Ok(None);
        };
        if store.disk.is_some() {
            return Ok(None);
        }
        let gib = store.gib;
        let id =
            ResourceId::parse(&inst.desc.instance_id).map_err(|_| BackendError::Unavailable)?;
        let path = self.store_path(id.as_str());
        let io = |e: std::io::Error| {
            tracing::warn!(error = %e, "instance-storage backing file");
            BackendError::Unavailable
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(instance = %id, "stale instance-storage file deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io)?;
            if let Err(e) = f.set_len(gib.bytes()) {
                let _ = std::fs::remove_file(&path);
                return Err(io(e));
            }
        }
        let body = match card_control::encode_attach_ephemeral(&id) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "instance-storage attach not encodable");
                let _ = std::fs::remove_file(&path);
                return Err(BackendError::Unavailable);
            }
        };
        let queues = u16::try_from(inst.desc.vcpus).unwrap_or(1);
        let spawned = self.launcher.call_fd(&LaunchRequest::SpawnCard {
            backing: Some(path.clone()),
            network: None,
            read_only: false,
            queues,
            run_as: self.cfg.run_as,
            release: self.card_release(),
        });
        let (pid, control) = match spawned {
            Ok((LaunchReply::Spawned { pid }, fd)) => (pid, UnixStream::from(fd)),
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                return Err(BackendError::Unavailable);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(launcher_err("spawn instance-storage card")(e));
            }
        };
        let _ = control.set_read_timeout(Some(CARD_TIMEOUT));
        let _ = control.set_write_timeout(Some(CARD_TIMEOUT));
        let device = DeviceId::new(STORE_DEVICE).map_err(|_| BackendError::Unavailable)?;
        let mut att = Attachment {
            device,
            card_pid: pid,
            control,
            updating: None,
        };
        match card_control::call(&mut att.control, &body) {
            Ok(CardReply::Attached {
                encrypted: true,
                capacity_sectors,
            }) => {
                tracing::info!(instance = %id, card = pid, gib = gib.get(), sectors = capacity_sectors, "instance storage: card made its key");
            }
            other => {
                tracing::warn!(instance = %id, reply = ?other, "instance-storage card refused its attach");
                self.kill_unkeyed_card(pid);
                let _ = std::fs::remove_file(&path);
                return Err(BackendError::Unavailable);
            }
        }
        if let Some(s) = inst.store.as_mut() {
            s.disk = Some(att);
        }
        Ok(Some(pid))
    }

    /// Ends the instance-storage disk, if one exists: the card gets `Detach` (it zeroizes the
    /// key it made, which never left it, and exits) and is reaped, then the backing file is
    /// deleted. What the file held is unreadable from the moment the key is gone.
    fn end_store(&self, inst: &mut HostInstance) {
        let Some(att) = inst.store.as_mut().and_then(|s| s.disk.take()) else {
            return;
        };
        let pid = att.card_pid;
        self.unplug_card(att);
        let path = self.store_path(&inst.desc.instance_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "instance-storage file not deleted"),
        }
        tracing::info!(instance = %inst.desc.instance_id, card = pid, "instance storage crypto-erased (key zeroized, file deleted)");
    }

    /// The instance-storage card's pid, if a disk exists now.
    fn store_pid(inst: &HostInstance) -> Option<u32> {
        inst.store
            .as_ref()
            .and_then(|s| s.disk.as_ref())
            .map(|a| a.card_pid)
    }

    /// Returns a terminated instance's whole cores to the pool.
    fn release_cores(&self, id: &ResourceId) {
        if let Some(a) = lock(&self.inner).cores.as_mut() {
            let n = a.release(id.as_str());
            if n > 0 {
                tracing::info!(instance = %id, cores = n, "whole cores released");
            }
        }
    }
}

impl InstanceBackend for HostBackend {
    fn active_release(&self) -> Option<crate::record::ReleaseRecord> {
        lock(&self.records).release.clone()
    }

    fn release_self_test(&self, version: u64) -> Result<bool, BackendError> {
        match self
            .launcher
            .call(&LaunchRequest::SelfTest { release: version })
        {
            Ok((LaunchReply::SelfTested { ok }, _)) => Ok(ok),
            Ok(_) => Err(BackendError::Unavailable),
            Err(e) => Err(launcher_err("self-test")(e)),
        }
    }

    fn running_hypervisors(&self) -> Vec<ResourceId> {
        let slots: Vec<(ResourceId, Arc<Mutex<HostInstance>>)> = lock(&self.inner)
            .instances
            .iter()
            .map(|(id, s)| (id.clone(), Arc::clone(&s.inst)))
            .collect();
        slots
            .into_iter()
            .filter(|(_, i)| lock(i).vm.is_some())
            .map(|(id, _)| id)
            .collect()
    }

    fn live_update(
        &self,
        id: &ResourceId,
        to: Option<u64>,
    ) -> Result<crate::api::HypervisorMoved, BackendError> {
        let inst = self.instance(id)?;
        let mut g = self.idle(&inst)?;
        self.live_update_vm(&mut g, to)
    }

    fn attached_cards(&self) -> Vec<(ResourceId, String, bool)> {
        let slots: Vec<(ResourceId, Arc<Mutex<HostInstance>>)> = lock(&self.inner)
            .instances
            .iter()
            .map(|(id, s)| (id.clone(), Arc::clone(&s.inst)))
            .collect();
        let mut out = Vec::new();
        for (id, inst) in slots {
            let g = lock(&inst);
            if g.vm.is_some() {
                // A local volume has its backing file here; a network volume's card is the
                // storage node's NBD client, whose endpoint the attachment does not keep.
                out.extend(g.volumes.keys().map(|v| {
                    let local = self.cfg.volume_dir.join(format!("{v}.img")).is_file();
                    (id.clone(), v.clone(), local)
                }));
            }
        }
        out
    }

    fn update_card(
        &self,
        id: &ResourceId,
        volume: &str,
        to: Option<u64>,
    ) -> Result<crate::api::CardMoved, BackendError> {
        let inst = self.instance(id)?;
        // Not during an attach or detach of this instance (they wait with the lock released):
        // a detach in flight finishes first, and then the volume is simply not attached.
        let mut g = self.idle(&inst)?;
        self.update_card_vm(&mut g, volume, to)
    }

    fn running_net_cards(&self) -> Vec<(ResourceId, Option<u64>)> {
        self.net_cards_of(net_update::Wait::Block, |g| g.vm.is_some())
            .into_iter()
            .map(|(id, _, release)| (id, release))
            .collect()
    }

    fn update_net_card(
        &self,
        id: &ResourceId,
        to: Option<u64>,
    ) -> Result<crate::api::NetCardMoved, BackendError> {
        let inst = self.instance(id)?;
        let mut g = self.idle(&inst)?;
        self.update_net_card_vm(&mut g, to)
    }

    fn net_card_releases(&self) -> Vec<crate::api::NetCardRelease> {
        self.net_cards_of(net_update::Wait::Skip, |_| true)
            .into_iter()
            .map(|(id, pid, release)| crate::api::NetCardRelease {
                instance_id: id.to_string(),
                pid,
                release,
            })
            .collect()
    }

    fn set_active_release(
        &self,
        release: crate::record::ReleaseRecord,
    ) -> Result<(), BackendError> {
        let mut r = lock(&self.records);
        let before = r.release.replace(release);
        if let Err(e) = Self::store_locked(&r) {
            r.release = before;
            return Err(e);
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "host"
    }

    fn capacity(&self) -> Capacity {
        let i = lock(&self.inner);
        let (c, m, n) =
            i.instances
                .values()
                .filter(|s| s.live)
                .fold((0u32, 0u64, 0u32), |(c, m, n), s| {
                    (
                        c.saturating_add(s.vcpus),
                        m.saturating_add(u64::from(s.memory_mib)),
                        n.saturating_add(1),
                    )
                });
        let (vcpus_total, vcpus_free) = match &i.cores {
            // Whole cores: an instance holds every thread of its cores, used or not.
            Some(a) => (
                u32::try_from(a.instance_threads()).unwrap_or(u32::MAX),
                u32::try_from(a.free_threads()).unwrap_or(u32::MAX),
            ),
            None => (self.cfg.vcpus_total, self.cfg.vcpus_total.saturating_sub(c)),
        };
        Capacity {
            vcpus_total,
            vcpus_free,
            memory_mib_total: self.cfg.memory_mib_total,
            memory_mib_free: self.cfg.memory_mib_total.saturating_sub(m),
            instances: n,
        }
    }

    fn create(&self, spec: &InstanceSpec) -> Result<InstanceDescription, BackendError> {
        if spec.image != self.cfg.image {
            return Err(BackendError::NoSuchImage);
        }
        let cmdline = guest_cmdline(&self.cfg.kernel_args, spec.user_data.as_deref())?;
        let desc = InstanceDescription {
            instance_id: spec.id.to_string(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            state: InstanceState::Created,
            volumes: Vec::new(),
            instance_storage_gib: spec.instance_storage.map(InstanceStorageGib::get),
            net_endpoint: None,
        };
        let inst = Arc::new(Mutex::new(HostInstance {
            desc: desc.clone(),
            cmdline,
            vm: None,
            booted: false,
            console: String::new(),
            console_cursor: 0,
            volumes: BTreeMap::new(),
            next_device: 0,
            network: spec.network.clone(),
            net: None,
            attaching: None,
            op: None,
            cpus: Vec::new(),
            store: spec
                .instance_storage
                .map(|gib| InstanceStore { gib, disk: None }),
            updating: None,
        }));
        // Reserve the id and the capacity, then spawn without holding the host-wide lock.
        let mut g = lock(&inst);
        {
            let mut i = lock(&self.inner);
            if i.draining {
                return Err(BackendError::Draining);
            }
            if i.instances.contains_key(&spec.id) {
                return Err(BackendError::AlreadyExists);
            }
            let cap = self.capacity_locked(&i);
            if spec.vcpus > cap.0 || u64::from(spec.memory_mib) > cap.1 {
                return Err(BackendError::NoCapacity);
            }
            if let Some(a) = i.cores.as_mut() {
                g.cpus = a.allocate(spec.id.as_str(), spec.vcpus).map_err(|e| {
                    tracing::info!(instance = %spec.id, error = %e, "no whole cores free");
                    match e {
                        crate::cores::CoreError::NotEnough {
                            vcpus, free_cores, ..
                        } => BackendError::NoFreeCores { vcpus, free_cores },
                        _ => BackendError::NoCapacity,
                    }
                })?;
            }
            i.instances.insert(
                spec.id.clone(),
                Slot {
                    inst: Arc::clone(&inst),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    live: true,
                },
            );
        }
        match self.spawn_vm(&g) {
            Ok(vm) => {
                let mut pids = vec![vm.pid];
                // Instance storage: its card starts and is plugged before the guest boots.
                let stored = self.start_store(&mut g).and_then(|p| {
                    pids.extend(p);
                    match g.store.as_ref().and_then(|s| s.disk.as_ref()) {
                        Some(att) => self.plug(&vm.chan, att),
                        None => Ok(()),
                    }
                });
                if let Err(e) = stored {
                    self.end_store(&mut g);
                    self.end_vm(vm);
                    drop(g);
                    self.forget(&spec.id);
                    return Err(e);
                }
                g.vm = Some(vm);
                if let Err(e) = self.persist(&g, &pids) {
                    if let Some(vm) = g.vm.take() {
                        self.end_vm(vm);
                    }
                    self.end_store(&mut g);
                    drop(g);
                    self.forget(&spec.id);
                    return Err(e);
                }
                Ok(desc)
            }
            Err(e) => {
                drop(g);
                self.forget(&spec.id);
                Err(e)
            }
        }
    }

    fn describe(&self, id: &ResourceId) -> Result<InstanceDescription, BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        if g.desc.state == InstanceState::Running {
            if let Some(vm) = g.vm.as_mut() {
                match vm.chan.call(Command::Stats, None) {
                    // The guest powered itself off (the VM stays for its console).
                    Ok(Reply::Stats {
                        state: VmState::Stopped,
                        ..
                    }) => {
                        g.desc.state = InstanceState::Stopped;
                        self.persist_noticed(&g);
                    }
                    Ok(_) | Err(ClientError::Refused(_)) => {}
                    // The hypervisor process is gone (crashed or killed): nothing runs.
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "hypervisor gone");
                        Self::drain_console(&mut g);
                        if let Some(vm) = g.vm.take() {
                            self.end_vm(vm);
                        }
                        g.desc.state = InstanceState::Stopped;
                        self.persist_noticed(&g);
                    }
                }
            }
        }
        Ok(g.desc.clone())
    }

    fn start(&self, id: &ResourceId) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = self.idle(&inst)?;
        match g.desc.state {
            InstanceState::Created => {
                let vm = g.vm.as_mut().ok_or(BackendError::Unavailable)?;
                vm.chan
                    .call(Command::Start, None)
                    .map_err(channel_err("start"))?;
                g.booted = true;
            }
            InstanceState::Stopped => {
                let resumed = match g.vm.as_mut() {
                    Some(vm) => vm.chan.call(Command::Resume, None).is_ok(),
                    None => false,
                };
                if !resumed {
                    // The guest powered off (or the VM is gone): boot afresh. Instance storage
                    // does not survive a stop: whatever disk is left ends, the boot gets a
                    // fresh one.
                    self.end_store(&mut g);
                    self.fresh_boot(&mut g)?;
                }
            }
            InstanceState::Running | InstanceState::Terminated => {
                return Err(BackendError::WrongState)
            }
        }
        g.desc.state = InstanceState::Running;
        let pid: Vec<u32> =
            g.vm.as_ref()
                .map(|v| v.pid)
                .into_iter()
                .chain(Self::store_pid(&g))
                .collect();
        self.persist(&g, &pid)?;
        tracing::info!(instance = %id, "instance running");
        Ok(())
    }

    fn stop(&self, id: &ResourceId) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        if g.desc.state != InstanceState::Running {
            return Err(BackendError::WrongState);
        }
        if g.store.is_some() {
            // Instance storage does not survive a stop (as in EC2), so neither does the guest's
            // memory: the VM is shut down, the disk's card zeroizes its key and the file is
            // deleted; StartInstance boots afresh with a new, empty disk.
            Self::drain_console(&mut g);
            if let Some(vm) = g.vm.take() {
                self.end_vm(vm);
            }
            self.end_store(&mut g);
            g.desc.state = InstanceState::Stopped;
            return self.persist(&g, &[]);
        }
        let vm = g.vm.as_mut().ok_or(BackendError::Unavailable)?;
        match vm.chan.call(Command::Pause, None) {
            Ok(_) => {}
            // Already stopped by the guest itself: that is where we wanted to be.
            Err(ClientError::Refused(CommandError::WrongState(VmState::Stopped))) => {}
            Err(e) => return Err(channel_err("pause")(e)),
        }
        g.desc.state = InstanceState::Stopped;
        self.persist(&g, &[])
    }

    fn reboot(&self, id: &ResourceId) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = self.idle(&inst)?;
        if !matches!(
            g.desc.state,
            InstanceState::Running | InstanceState::Stopped
        ) {
            return Err(BackendError::WrongState);
        }
        match self.fresh_boot(&mut g) {
            Ok(()) => {
                g.desc.state = InstanceState::Running;
                let pid: Vec<u32> =
                    g.vm.as_ref()
                        .map(|v| v.pid)
                        .into_iter()
                        .chain(Self::store_pid(&g))
                        .collect();
                self.persist(&g, &pid)
            }
            Err(e) => {
                g.desc.state = InstanceState::Stopped;
                self.persist_noticed(&g);
                Err(e)
            }
        }
    }

    fn terminate(&self, id: &ResourceId) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        if g.desc.state == InstanceState::Terminated {
            return Err(BackendError::WrongState);
        }
        Self::drain_console(&mut g);
        if let Some(vm) = g.vm.take() {
            self.end_vm(vm);
        }
        self.end_store(&mut g);
        let vols = std::mem::take(&mut g.volumes);
        for (vol, att) in vols {
            self.unplug_card(att);
            lock(&self.inner).attached.remove(&vol);
        }
        g.desc.volumes.clear();
        if let Some(card) = g.net.take() {
            self.end_net_card(&card);
        }
        g.desc.net_endpoint = None;
        g.desc.state = InstanceState::Terminated;
        self.persist_noticed(&g);
        drop(g);
        self.set_live(id, false);
        self.release_cores(id);
        tracing::info!(instance = %id, "instance terminated");
        Ok(())
    }

    fn console(&self, id: &ResourceId) -> Result<String, BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        Self::drain_console(&mut g);
        Ok(g.console.clone())
    }

    fn set_draining(&self, draining: bool) {
        lock(&self.inner).draining = draining;
        let mut r = lock(&self.records);
        r.draining = draining;
        if let Err(e) = Self::store_locked(&r) {
            tracing::warn!(error = %e, "host record: draining flag not written");
        }
    }

    fn draining(&self) -> bool {
        lock(&self.inner).draining
    }

    fn sandbox_kills(&self) -> Vec<(u32, String)> {
        match self.launcher.call(&LaunchRequest::SandboxKills) {
            Ok((LaunchReply::SandboxKills { kills }, _)) => {
                kills.into_iter().map(|k| (k.pid, k.process)).collect()
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "launcher: sandbox kills unavailable");
                Vec::new()
            }
        }
    }

    fn attach_network(
        &self,
        id: &ResourceId,
        epoch: u32,
        sealed_key: SealedBlob,
    ) -> Result<String, BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        if g.desc.state == InstanceState::Terminated {
            return Err(BackendError::WrongState);
        }
        let spec = g.network.clone().ok_or(BackendError::NoNetwork)?;
        if g.net.is_some() {
            return Err(BackendError::NetworkAttached);
        }
        let mut card = NetCard {
            pid: None,
            retry: net_update::NetRetry::now(),
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            epoch,
            sealed: sealed_key,
            routes: spec.routes.clone(),
            allow: spec.allow.clone(),
            release: self.release_carrying(crate::launcher::RELEASE_NETCARD),
        };
        self.start_net_card(id, &spec, &mut card, None)?;
        let pid = card.pid.ok_or(BackendError::Unavailable)?;
        let plugged = match g.vm.as_mut() {
            Some(vm) => self.plug_net(vm, pid),
            None => Err(BackendError::Unavailable),
        };
        if let Err(e) = plugged {
            self.end_net_card(&card);
            return Err(e);
        }
        let ep = card.listen.to_string();
        tracing::info!(instance = %id, card = pid, endpoint = %ep, epoch, "net card attached");
        g.desc.net_endpoint = Some(ep.clone());
        g.net = Some(card);
        self.persist(&g, &[pid])?;
        Ok(ep)
    }

    fn set_net_routes(&self, id: &ResourceId, routes: &[String]) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        let card = g.net.as_mut().ok_or(BackendError::NoNetwork)?;
        let req = serde_json::json!({"op": "routes", "routes": routes});
        // A down card takes the change when it is started again (from the record).
        if let Some(pid) = card.pid {
            self.net_update(pid, &req)?;
        }
        card.routes = routes.to_vec();
        self.persist(&g, &[])
    }

    fn set_net_rules(&self, id: &ResourceId, allow: &[String]) -> Result<(), BackendError> {
        let inst = self.instance(id)?;
        let mut g = lock(&inst);
        let card = g.net.as_mut().ok_or(BackendError::NoNetwork)?;
        let req = serde_json::json!({"op": "rules", "allow": allow});
        // A down card takes the change when it is started again (from the record).
        if let Some(pid) = card.pid {
            self.net_update(pid, &req)?;
        }
        card.allow = allow.to_vec();
        self.persist(&g, &[])
    }

    fn net_counters(&self) -> Vec<NetCounters> {
        let cards: Vec<(u32, ResourceId)> = lock(&self.inner)
            .net_pids
            .iter()
            .map(|(p, i)| (*p, i.clone()))
            .collect();
        let mut out = Vec::new();
        for (pid, id) in cards {
            let Ok(v) = self.net_control(pid, &serde_json::json!({"op": "counters"})) else {
                continue;
            };
            let Some(obj) = v.as_object() else {
                continue;
            };
            // Numbers only: a counter name is a short identifier, its value an integer.
            let counters = obj
                .iter()
                .filter(|(k, _)| {
                    k.len() <= 48 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
                .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
                .collect();
            out.push(NetCounters {
                instance: id.to_string(),
                counters,
            });
        }
        out
    }

    fn restart_dead_net_cards(&self) -> Vec<NetCardRestart> {
        let mut pids = match self.launcher.call(&LaunchRequest::Exited) {
            Ok((LaunchReply::Exited { pids }, _)) => pids,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "launcher: exits unavailable");
                Vec::new()
            }
        };
        pids.sort_unstable();
        pids.dedup();
        let mut out = Vec::new();
        for pid in pids {
            let Some(id) = lock(&self.inner).net_pids.remove(&pid) else {
                continue;
            };
            let Ok(inst) = self.instance(&id) else {
                continue;
            };
            let mut g = lock(&inst);
            let (Some(spec), Some(mut card)) = (g.network.clone(), g.net.take()) else {
                continue;
            };
            if card.pid != Some(pid) {
                g.net = Some(card);
                continue;
            }
            tracing::warn!(instance = %id, pid, "net card died; restarting it");
            // Reap the dead card (its sockets go), keep its port for the new one. `pid` is one
            // the keeper itself reported as its exited child: never a reused pid.
            let _ = self
                .launcher
                .call(&LaunchRequest::Reap { pid, grace_ms: 0 });
            // Not started: down, not dropped (its port, key and release stay), started again
            // with backoff by the next polls.
            card.retry = net_update::NetRetry::now();
            let outcome = self
                .restart_card_in_place(&mut g, &id, &spec, card, net_update::InPlace::AFTER_DEATH)
                .map_err(|e| e.code());
            out.push(NetCardRestart {
                instance: id.to_string(),
                old_pid: pid,
                outcome,
            });
        }
        self.restart_down_net_cards(&mut out);
        out
    }
}

impl HostBackend {
    /// Starts `card`'s process (on `port` when restarting, else on a free port of the host's
    /// range) and records its pid and endpoint in `card`.
    fn start_net_card(
        &self,
        id: &ResourceId,
        spec: &NetworkSpec,
        card: &mut NetCard,
        port: Option<std::net::SocketAddr>,
    ) -> Result<(), BackendError> {
        let net = self.cfg.net.ok_or(BackendError::NetworkUnavailable)?;
        let tries = if port.is_some() { 1 } else { NET_PORT_TRIES };
        let mut last = BackendError::Unavailable;
        for _ in 0..tries {
            let listen = match port {
                Some(p) => p,
                None => {
                    let mut i = lock(&self.inner);
                    let free = (0..net.ports)
                        .filter_map(|k| net.port_base.checked_add(k))
                        .find(|p| !i.net_ports.contains(p))
                        .ok_or(BackendError::NoCapacity)?;
                    i.net_ports.insert(free);
                    std::net::SocketAddr::from((net.host_ip, free))
                }
            };
            let req = LaunchRequest::SpawnNetCard {
                card: NetCardLaunch {
                    interface: id.to_string(),
                    listen,
                    vpc: spec.vpc,
                    card_id: spec.card_id,
                    epoch: card.epoch,
                    sealed_key: card.sealed.to_hex(),
                    mac: spec.mac.to_string(),
                    ip: format!("{}/{}", spec.ip, spec.prefix),
                    gateway: spec.gateway,
                    mtu: spec.mtu,
                    routes: card.routes.clone(),
                    allow: card.allow.clone(),
                },
                run_as: self.cfg.run_as,
                release: card.release,
            };
            match self.launcher.call(&req) {
                Ok((LaunchReply::Spawned { pid }, _)) => {
                    card.pid = Some(pid);
                    card.listen = listen;
                    {
                        // Its port is taken again (a failed start on it may have freed it).
                        let mut i = lock(&self.inner);
                        i.net_pids.insert(pid, id.clone());
                        i.net_ports.insert(listen.port());
                    }
                    tracing::info!(instance = %id, pid, %listen, "net card started");
                    return Ok(());
                }
                // The card would not come up: most likely its port is taken (it exits when it
                // cannot bind), or it refused the sealed key. Keep the port marked (someone
                // holds it) and try the next one.
                Err(LauncherError::Refused(LaunchRefusal::CardNotReady)) => {
                    tracing::warn!(instance = %id, %listen, "net card did not come up");
                    last = BackendError::NetCardRefused;
                }
                Ok(_) => {
                    lock(&self.inner).net_ports.remove(&listen.port());
                    return Err(BackendError::Unavailable);
                }
                Err(e) => {
                    lock(&self.inner).net_ports.remove(&listen.port());
                    return Err(launcher_err("spawn net card")(e));
                }
            }
        }
        Err(last)
    }

    /// A fresh vhost-user connection to the restarted net card `pid`, handed to the hypervisor
    /// to replace the backend of NIC `dev` in place (`ReconnectNet`): `Ok(true)` if it did,
    /// `Ok(false)` if the hypervisor refused (nothing changed; re-plug instead).
    fn reconnect_net(&self, vm: &mut Vm, pid: u32, dev: &DeviceId) -> Result<bool, BackendError> {
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::ConnectVhost { pid })
            .map_err(launcher_err("connect net vhost"))?;
        let r = vm.chan.call(
            Command::ReconnectNet { id: dev.clone() },
            Some(fd.as_raw_fd()),
        );
        drop(fd);
        match r {
            Ok(_) => {
                tracing::info!(pid, "restarted net card reconnected in place");
                Ok(true)
            }
            Err(ClientError::Refused(e)) => {
                tracing::warn!(pid, error = %e, "in-place reconnect refused: re-plugging the NIC");
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "in-place reconnect failed");
                Err(BackendError::Unavailable)
            }
        }
    }

    /// A fresh vhost-user connection to the net card, handed to the hypervisor (`AttachNet`).
    fn plug_net(&self, vm: &mut Vm, pid: u32) -> Result<(), BackendError> {
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::ConnectVhost { pid })
            .map_err(launcher_err("connect net vhost"))?;
        let id = DeviceId::new(NET_DEVICE).map_err(|_| BackendError::Unavailable)?;
        let r = vm
            .chan
            .call(Command::AttachNet { id }, Some(fd.as_raw_fd()));
        drop(fd);
        match r {
            Ok(Reply::Device {
                guest_acknowledged: false,
                state: VmState::Running,
            }) => {
                tracing::warn!("hot-plugged NIC not bound by the guest in time");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(ClientError::Refused(CommandError::WrongState(_))) => Err(BackendError::WrongState),
            Err(e) => Err(channel_err("attach net")(e)),
        }
    }

    /// SIGTERM (the card wipes its key pages), then reap; its port is free again.
    fn end_net_card(&self, card: &NetCard) {
        if let Some(pid) = card.pid {
            if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
                pid,
                grace_ms: EXIT_GRACE_MS,
            }) {
                tracing::warn!(pid, error = %e, "reaping net card failed");
            }
            lock(&self.inner).net_pids.remove(&pid);
        }
        let mut i = lock(&self.inner);
        i.net_ports.remove(&card.listen.port());
    }

    /// One request on a fresh connection to the card's control socket; its JSON reply.
    fn net_control(
        &self,
        pid: u32,
        req: &serde_json::Value,
    ) -> Result<serde_json::Value, BackendError> {
        use std::io::{BufRead, Write};
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::ConnectNetControl { pid })
            .map_err(launcher_err("connect net control"))?;
        let mut conn = UnixStream::from(fd);
        let _ = conn.set_read_timeout(Some(CARD_TIMEOUT));
        let _ = conn.set_write_timeout(Some(CARD_TIMEOUT));
        let io = |e: std::io::Error| {
            tracing::warn!(pid, error = %e, "net card control");
            BackendError::Unavailable
        };
        conn.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
        let mut line = String::new();
        std::io::BufReader::new(std::io::Read::take(&conn, 1 << 20))
            .read_line(&mut line)
            .map_err(io)?;
        serde_json::from_str(&line).map_err(|_| BackendError::Unavailable)
    }

    /// A `routes` or `rules` update: the card's `ok` or its refusal.
    fn net_update(&self, pid: u32, req: &serde_json::Value) -> Result<(), BackendError> {
        let v = self.net_control(pid, req)?;
        if v.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
            Ok(())
        } else {
            tracing::info!(pid, reply = %v, "net card refused an update");
            Err(BackendError::NetCardRefused)
        }
    }
}

impl HostBackend {
    /// Free (vcpus, memory) under the held lock (with whole cores, the core allocator's check
    /// that follows is the stricter one).
    fn capacity_locked(&self, i: &Inner) -> (u32, u64) {
        let (c, m) = i
            .instances
            .values()
            .filter(|s| s.live)
            .fold((0u32, 0u64), |(c, m), s| {
                (
                    c.saturating_add(s.vcpus),
                    m.saturating_add(u64::from(s.memory_mib)),
                )
            });
        (
            self.cfg.vcpus_total.saturating_sub(c),
            self.cfg.memory_mib_total.saturating_sub(m),
        )
    }
}

impl VolumeBackend for HostBackend {
    fn attach(
        &self,
        instance: &ResourceId,
        volume: &ResourceId,
        sealed_key: SealedBlob,
        storage: Option<crate::api::NetworkVolume>,
    ) -> Result<(), BackendError> {
        let inst = self.instance(instance)?;
        let g = self.claim(&inst, "attach")?;
        let (mut g, result) = self.attach_claimed(&inst, g, instance, volume, sealed_key, storage);
        g.op = None;
        result
    }

    fn detach(&self, instance: &ResourceId, volume: &ResourceId) -> Result<(), BackendError> {
        let inst = self.instance(instance)?;
        let g = self.claim(&inst, "detach")?;
        let (mut g, result) = self.detach_claimed(&inst, g, instance, volume);
        g.op = None;
        result
    }
}

/// Longest a hot-plug waits for the instance's operation slot (another attach or detach of the
/// same instance in flight): past the hypervisor's own bound on one operation.
const OP_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(150);

impl HostBackend {
    /// The instance's lock with its operation slot taken for `op` (an attach or a detach),
    /// waiting while another holds it. The slot, not the lock, is what the operation keeps
    /// while the hypervisor hot-plugs: Describe, Stop, Terminate and the console are served
    /// meanwhile; a second attach or detach, a start, a reboot or a live update waits for it.
    fn claim<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
        op: &'static str,
    ) -> Result<MutexGuard<'a, HostInstance>, BackendError> {
        let mut g = self.idle(inst)?;
        g.op = Some(op);
        Ok(g)
    }

    /// The instance's lock once no attach or detach is in flight on it.
    fn idle<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
    ) -> Result<MutexGuard<'a, HostInstance>, BackendError> {
        let deadline = std::time::Instant::now() + OP_SLOT_WAIT;
        loop {
            let g = lock(inst);
            let Some(busy) = g.op else {
                return Ok(g);
            };
            drop(g);
            if std::time::Instant::now() >= deadline {
                tracing::warn!(busy, "instance operation slot still taken; giving up");
                return Err(BackendError::Unavailable);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn attach_claimed<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
        mut g: MutexGuard<'a, HostInstance>,
        instance: &ResourceId,
        volume: &ResourceId,
        sealed_key: SealedBlob,
        storage: Option<crate::api::NetworkVolume>,
    ) -> (MutexGuard<'a, HostInstance>, Result<(), BackendError>) {
        if g.desc.state == InstanceState::Terminated {
            return (g, Err(BackendError::WrongState));
        }
        if g.volumes.contains_key(volume.as_str()) {
            return (g, Err(BackendError::VolumeAttached));
        }
        let body = match card_control::encode_attach(volume, &sealed_key) {
            Ok(b) => b,
            Err(e) => {
                tracing::info!(error = %e, "sealed key not in the card's format");
                return (g, Err(BackendError::KeyRefused));
            }
        };
        drop(sealed_key);
        if !lock(&self.inner).attached.insert(volume.to_string()) {
            return (g, Err(BackendError::VolumeAttached));
        }
        let device = match DeviceId::new(&format!("blk{}", g.next_device)) {
            Ok(d) => d,
            Err(_) => {
                lock(&self.inner).attached.remove(volume.as_str());
                return (g, Err(BackendError::Unavailable));
            }
        };
        // The intent is durable before the card exists: a controller that dies from here on
        // leaves a record its successor undoes (the attach was never acknowledged).
        g.attaching = Some(PendingAttach {
            volume: volume.to_string(),
            device: device.to_string(),
        });
        if let Err(e) = self.persist(&g, &[]) {
            g.attaching = None;
            lock(&self.inner).attached.remove(volume.as_str());
            return (g, Err(e));
        }
        let (mut g, result) = self.attach_card(inst, g, instance, volume, device, &body, storage);
        g.attaching = None;
        match result {
            Ok(pid) => {
                // Committed and recorded before the attach is acknowledged.
                if let Err(e) = self.persist(&g, &[pid]) {
                    tracing::error!(error = %e, volume = %volume, "attached, but the host record was not written");
                    return (g, Err(e));
                }
                (g, Ok(()))
            }
            Err(e) => {
                lock(&self.inner).attached.remove(volume.as_str());
                self.persist_noticed(&g);
                (g, Err(e))
            }
        }
    }

    fn detach_claimed<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
        g: MutexGuard<'a, HostInstance>,
        instance: &ResourceId,
        volume: &ResourceId,
    ) -> (MutexGuard<'a, HostInstance>, Result<(), BackendError>) {
        let Some(device) = g.volumes.get(volume.as_str()).map(|a| a.device.clone()) else {
            return (g, Err(BackendError::NoSuchVolume));
        };
        let Some(chan) = g.vm.as_ref().map(|vm| Arc::clone(&vm.chan)) else {
            return (g, Err(BackendError::Unavailable));
        };
        // The unplug waits (up to the hypervisor's bound) for the guest to release the disk:
        // without the instance's lock, which Describe, Stop and the console need meanwhile.
        drop(g);
        let unplugged = chan.call(Command::DetachBlock { id: device }, None);
        let mut g = lock(inst);
        match unplugged {
            Ok(Reply::Device {
                guest_acknowledged, ..
            }) => {
                if !guest_acknowledged {
                    tracing::warn!(instance = %instance, volume = %volume, "guest did not release the disk in time; backend disconnected anyway");
                }
            }
            Ok(_) | Err(ClientError::Refused(CommandError::NoSuchDevice)) => {}
            // The card died (or stopped answering) during the unplug: the disk is out of the
            // VM all the same, so the detach goes on and the card is reaped below.
            Err(ClientError::BackendFailed { failure, .. }) => {
                tracing::warn!(instance = %instance, volume = %volume, ?failure, "the disk's card failed during the unplug; detached anyway");
            }
            // The VM ended meanwhile (a Stop of an instance with instance storage, Terminate):
            // the disk went with it.
            Err(_) if g.vm.as_ref().is_none_or(|vm| !Arc::ptr_eq(&vm.chan, &chan)) => {}
            Err(e) => return (g, Err(channel_err("detach block")(e))),
        }
        if let Some(att) = g.volumes.remove(volume.as_str()) {
            self.unplug_card(att);
        }
        g.desc.volumes.retain(|v| v != volume.as_str());
        lock(&self.inner).attached.remove(volume.as_str());
        let r = self.persist(&g, &[]);
        (g, r)
    }
}

impl HostBackend {
    /// Takes over what a previous controller left running, as its durable record names it: for
    /// each recorded instance, the hypervisor's channel (a dup from the keeper, drained of the
    /// old controller's replies) and each card's control socket; an attach that was never
    /// acknowledged is undone; a hypervisor or card that died meanwhile is handled as a dead
    /// process is today (the instance is stopped; the volume is detached; a net card is
    /// restarted by the next poll). Children no record names are reaped. Adoption changes no
    /// running process it keeps, so a controller killed in the middle of it can simply be
    /// started again.
    pub fn adopt(&self, rec: HostRecord) -> Result<AdoptReport, BackendError> {
        let t0 = std::time::Instant::now();
        let children = if self.launcher.adopted() {
            self.launcher
                .children()
                .map_err(launcher_err("keeper children"))?
        } else {
            Vec::new()
        };
        let alive = |pid: u32, kind: ChildKind| {
            children
                .iter()
                .any(|c| c.pid == pid && c.kind == kind && c.running)
        };
        let known = |pid: u32| children.iter().any(|c| c.pid == pid);
        // Request ids above any the previous controller used (it numbered from an earlier time).
        let first_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 20))
            .unwrap_or(0)
            .saturating_mul(1 << 20);
        let mut claimed: BTreeSet<u32> = BTreeSet::new();
        // Adopted instances with no whole cores of their own yet (recorded before pinning).
        let mut unpinned: Vec<ResourceId> = Vec::new();
        let mut report = AdoptReport::default();
        lock(&self.inner).draining = rec.draining;
        {
            let mut r = lock(&self.records);
            r.draining = rec.draining;
            r.release = rec.release.clone();
        }
        for (n, r) in rec.instances.into_iter().enumerate() {
            let Ok(id) = ResourceId::parse(&r.id) else {
                continue;
            };
            let mut codes: Vec<&'static str> = Vec::new();
            let mut state = match r.state {
                RecordedState::Created => InstanceState::Created,
                RecordedState::Running => InstanceState::Running,
                RecordedState::Stopped => InstanceState::Stopped,
            };
            // The hypervisor.
            let mut vm = None;
            let mut r = r;
            if let Some(newp) = r.hypervisor_update.take() {
                claimed.insert(newp);
                let winner = self.settle_update(r.hypervisor_pid, newp);
                if winner == Some(newp) {
                    codes.push("live_update_completed");
                }
                r.hypervisor_pid = winner.or(r.hypervisor_pid);
            }
            if let Some(pid) = r.hypervisor_pid {
                claimed.insert(pid);
                if alive(pid, ChildKind::Hypervisor) {
                    match self.take_vm(pid, first_id) {
                        Ok((v, vs)) => {
                            if vs == VmState::Stopped && state == InstanceState::Running {
                                state = InstanceState::Stopped;
                            }
                            vm = Some(v);
                        }
                        Err(e) => {
                            tracing::warn!(instance = %id, pid, error = %e, "recorded hypervisor does not answer");
                        }
                    }
                }
                if vm.is_none() {
                    codes.push("hypervisor_gone");
                    if known(pid) {
                        let _ = self
                            .launcher
                            .call(&LaunchRequest::Reap { pid, grace_ms: 0 });
                    }
                    // As when a running controller finds its hypervisor gone: stopped, and
                    // StartInstance boots it afresh with its volumes.
                    state = InstanceState::Stopped;
                }
            }
            if n == 0 && fault() == Some(Fault::AdoptAfterFirstStall) {
                tracing::error!(instance = %id, "fault hook: stalling mid-adoption");
                loop {
                    std::thread::park();
                }
            }
            let mut inst = HostInstance {
                desc: InstanceDescription {
                    instance_id: r.id.clone(),
                    image: r.image.clone(),
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    state,
                    volumes: Vec::new(),
                    instance_storage_gib: r.instance_storage.as_ref().map(|s| s.gib),
                    net_endpoint: None,
                },
                cmdline: r.cmdline.clone(),
                vm,
                booted: r.booted,
                console: String::new(),
                console_cursor: 0,
                volumes: BTreeMap::new(),
                next_device: r.next_device,
                network: None,
                net: None,
                attaching: None,
                op: None,
                cpus: Vec::new(),
                store: None,
                updating: None,
            };
            // Its whole cores, as recorded (the running hypervisor's vCPUs are pinned there).
            if let Some(a) = lock(&self.inner).cores.as_mut() {
                if r.cpus.is_empty() {
                    unpinned.push(id.clone());
                } else {
                    match a.claim(id.as_str(), &r.cpus) {
                        Ok(()) => inst.cpus = r.cpus.clone(),
                        Err(e) => {
                            tracing::warn!(instance = %id, error = %e, "recorded cores cannot be re-claimed");
                            codes.push("cores_lost");
                            unpinned.push(id.clone());
                        }
                    }
                }
            }
            // An attach that was never acknowledged: out of the VM (its card, never committed,
            // died with the old controller or is reaped below as an orphan).
            if let Some(p) = &r.attaching {
                codes.push("attach_rolled_back");
                if let (Some(v), Ok(dev)) = (inst.vm.as_mut(), DeviceId::new(&p.device)) {
                    Self::detach_device(v, dev);
                }
            }
            for v in &mut r.volumes {
                // A card update in flight (the hypervisor above answered, so a `ReplaceBlock`
                // the previous controller sent is over): the old card exits once the
                // hypervisor moved to the new one; if it stays, its hand-over is cancelled and
                // the new card detached and reaped (`card_update::settle_card_update`).
                if let Some(newp) = v.card_update.take() {
                    claimed.insert(newp);
                    claimed.insert(v.card_pid);
                    let mut old_control = self.card_control(v.card_pid, true);
                    let mut new_control = self.card_control(newp, true);
                    let settled = self.settle_card_update(
                        v.card_pid,
                        old_control.as_mut(),
                        newp,
                        new_control.as_mut(),
                    );
                    match settled {
                        card_update::Settled::New => {
                            codes.push("card_update_completed");
                            v.card_pid = newp;
                        }
                        // The old card is exiting: the new card is kept (if it is dead too,
                        // the volume's card is gone, below).
                        card_update::Settled::OldCardGone => {
                            codes.push("card_update_old_card_gone");
                            v.card_pid = newp;
                        }
                        card_update::Settled::Old => codes.push("card_update_cancelled"),
                    }
                }
            }
            for v in &r.volumes {
                claimed.insert(v.card_pid);
                let dev = DeviceId::new(&v.device).map_err(|_| BackendError::Unavailable)?;
                let control = self.card_control(v.card_pid, alive(v.card_pid, ChildKind::Card));
                match control {
                    Some(control) => {
                        inst.desc.volumes.push(v.volume.clone());
                        lock(&self.inner).attached.insert(v.volume.clone());
                        inst.volumes.insert(
                            v.volume.clone(),
                            Attachment {
                                device: dev,
                                card_pid: v.card_pid,
                                control,
                                updating: None,
                            },
                        );
                    }
                    None => {
                        // The card died while no controller ran: the disk leaves the VM, as
                        // a detach whose card died does.
                        tracing::warn!(instance = %id, volume = %v.volume, pid = v.card_pid, "volume's card gone: detached");
                        codes.push("card_gone");
                        if let Some(vm) = inst.vm.as_mut() {
                            Self::detach_device(vm, dev);
                        }
                        if known(v.card_pid) {
                            let _ = self.launcher.call(&LaunchRequest::Reap {
                                pid: v.card_pid,
                                grace_ms: 0,
                            });
                        }
                    }
                }
            }
            if let Some(st) = &r.instance_storage {
                let gib = InstanceStorageGib::new(st.gib).map_err(|_| BackendError::Unavailable)?;
                let mut disk = None;
                if let Some(d) = &st.disk {
                    claimed.insert(d.card_pid);
                    let dev = DeviceId::new(&d.device).map_err(|_| BackendError::Unavailable)?;
                    let control = self.card_control(d.card_pid, alive(d.card_pid, ChildKind::Card));
                    match control {
                        Some(control) => {
                            disk = Some(Attachment {
                                device: dev,
                                card_pid: d.card_pid,
                                control,
                                updating: None,
                            });
                        }
                        None => {
                            // Its key died with the card: the disk is gone for good. Out of
                            // the VM, file deleted; the next boot gets a fresh one.
                            tracing::warn!(instance = %id, pid = d.card_pid, "instance-storage card gone: disk lost");
                            codes.push("instance_storage_lost");
                            if let Some(vm) = inst.vm.as_mut() {
                                Self::detach_device(vm, dev);
                            }
                            if known(d.card_pid) {
                                let _ = self.launcher.call(&LaunchRequest::Reap {
                                    pid: d.card_pid,
                                    grace_ms: 0,
                                });
                            }
                            let _ = std::fs::remove_file(self.store_path(id.as_str()));
                        }
                    }
                }
                inst.store = Some(InstanceStore { gib, disk });
            }
            if let Some(n) = &r.network {
                let mac = bulkhead_netcard::frame::MacAddr::parse_text(&n.mac)
                    .map_err(|_| BackendError::Unavailable)?;
                inst.network = Some(NetworkSpec {
                    vpc: n.vpc,
                    card_id: n.card_id,
                    mac,
                    ip: n.ip,
                    prefix: n.prefix,
                    gateway: n.gateway,
                    mtu: n.mtu,
                    allow: n.allow.clone(),
                    routes: n.routes.clone(),
                });
            }
            if let Some(c) = &r.net_card {
                // A card the keeper does not run (dead, or recorded down) is adopted down: no
                // pid kept (its exited process, if any, is reaped below as unclaimed), started
                // again (same port, sequence floor, sealed key and release) by the next poll.
                let pid = c.pid.filter(|p| alive(*p, ChildKind::NetCard));
                if c.pid.is_some() && pid.is_none() {
                    codes.push("net_card_gone");
                }
                let sealed =
                    SealedBlob::from_hex(&c.sealed_key).ok_or(BackendError::Unavailable)?;
                inst.net = Some(NetCard {
                    pid,
                    retry: net_update::NetRetry::now(),
                    listen: c.listen,
                    epoch: c.epoch,
                    sealed,
                    routes: c.routes.clone(),
                    allow: c.allow.clone(),
                    release: c.release,
                });
                inst.desc.net_endpoint = Some(c.listen.to_string());
                let mut i = lock(&self.inner);
                i.net_ports.insert(c.listen.port());
                if let Some(p) = pid {
                    claimed.insert(p);
                    i.net_pids.insert(p, id.clone());
                }
            }
            if codes.is_empty() {
                codes.push("ok");
            }
            report.instances.push(Adopted {
                instance: r.id.clone(),
                codes,
                hypervisor_pid: inst.vm.as_ref().map(|v| v.pid),
            });
            let rec = Self::record_of(&inst);
            lock(&self.inner).instances.insert(
                id,
                Slot {
                    vcpus: inst.desc.vcpus,
                    memory_mib: inst.desc.memory_mib,
                    live: true,
                    inst: Arc::new(Mutex::new(inst)),
                },
            );
            if let Some(rec) = rec {
                lock(&self.records).instances.insert(rec.id.clone(), rec);
            }
        }
        // Cores for instances recorded without any, once every recorded claim is in: used from
        // their next boot (a running hypervisor is not re-pinned).
        for id in unpinned {
            let Ok(inst) = self.instance(&id) else {
                continue;
            };
            let mut g = lock(&inst);
            let got = lock(&self.inner)
                .cores
                .as_mut()
                .map(|a| a.allocate(id.as_str(), g.desc.vcpus));
            match got {
                Some(Ok(cpus)) => {
                    g.cpus = cpus;
                    if let Some(rec) = Self::record_of(&g) {
                        lock(&self.records).instances.insert(rec.id.clone(), rec);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(instance = %id, error = %e, "adopted instance left without whole cores");
                }
                None => {}
            }
        }
        // Whatever no record names belongs to an operation never acknowledged.
        for c in &children {
            if !claimed.contains(&c.pid) {
                tracing::warn!(pid = c.pid, kind = ?c.kind, "keeper child no record names: reaped");
                let _ = self.launcher.call(&LaunchRequest::Reap {
                    pid: c.pid,
                    grace_ms: if c.kind == ChildKind::NetCard {
                        EXIT_GRACE_MS
                    } else {
                        0
                    },
                });
                report.orphans_reaped.push(c.pid);
            }
        }
        let keep: Vec<u32> = claimed.into_iter().collect();
        self.launcher
            .commit(&keep)
            .map_err(launcher_err("keeper commit"))?;
        Self::store_locked(&lock(&self.records))?;
        report.millis = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// The recorded hypervisor `pid`'s channel, taken over from the keeper, and its state.
    /// The live update of one VM (see [`InstanceBackend::live_update`]): the launcher starts
    /// the new process (so the keeper holds it like any hypervisor), the old one hands the VM
    /// over, the old one is reaped, the new pid is committed and recorded.
    fn live_update_vm(
        &self,
        g: &mut HostInstance,
        to: Option<u64>,
    ) -> Result<crate::api::HypervisorMoved, BackendError> {
        if g.vm.is_none() {
            return Err(BackendError::WrongState);
        }
        let (reply, chan_fd) = self
            .launcher
            .call_fd(&LaunchRequest::SpawnIncoming {
                release: to,
                run_as: self.cfg.run_as,
            })
            .map_err(launcher_err("spawn incoming"))?;
        let LaunchReply::Spawned { pid: new_pid } = reply else {
            return Err(BackendError::Unavailable);
        };
        let reap_new = |why: &str| {
            tracing::warn!(
                new_pid,
                why,
                "live update failed; the old hypervisor keeps the guest"
            );
            let _ = self.launcher.call(&LaunchRequest::Reap {
                pid: new_pid,
                grace_ms: 0,
            });
        };
        let handover = match self
            .launcher
            .call_fd(&LaunchRequest::TakeHandover { pid: new_pid })
        {
            Ok((_, fd)) => fd,
            Err(e) => {
                reap_new("hand-over end");
                return Err(launcher_err("take handover")(e));
            }
        };
        // Before the hand-over: the new process is committed (it outlives this controller) and
        // the update is in the record, so a controller that dies from here on is followed by one
        // that adopts whichever process then runs the guest.
        g.updating = Some(new_pid);
        if let Err(e) = self.persist(g, &[new_pid]) {
            g.updating = None;
            reap_new("record");
            return Err(e);
        }
        if fault() == Some(Fault::LiveUpdateAfterHandoverExit) && to.is_some() {
            // Let the hand-over happen, then die before recording its outcome.
            let r = g.vm.as_ref().map(|vm| vm.chan.live_update(handover));
            tracing::error!(ok = ?r.map(|r| r.is_ok()), "fault hook: exiting after a hand-over, before its outcome is recorded");
            std::process::exit(70);
        }
        let Some(vm) = g.vm.as_mut() else {
            return Err(BackendError::WrongState);
        };
        if to.is_some()
            && RELEASE_UPDATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1
            && fault() == Some(Fault::LiveUpdateSecondNewDies)
        {
            tracing::warn!(
                new_pid,
                "fault hook: the new hypervisor is killed before the hand-over"
            );
            let _ = self.launcher.call(&LaunchRequest::Reap {
                pid: new_pid,
                grace_ms: 0,
            });
        }
        let old_pid = vm.pid;
        let mut answer = vm.chan.live_update(handover);
        if answer.is_ok() && to.is_some() && fault() == Some(Fault::LiveUpdateReplyLost) {
            tracing::warn!("fault hook: the live update's answer is read as lost");
            answer = Err(ClientError::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )));
        }
        let pause_us = match answer {
            Ok(p) => p,
            // Refused or answered otherwise: the old process kept the guest.
            Err(e @ (ClientError::Refused(_) | ClientError::UnexpectedReply { .. })) => {
                reap_new("refused");
                g.updating = None;
                self.persist_noticed(g);
                return Err(channel_err("live update")(e));
            }
            // No answer (I/O error, closed channel, timeout): the hand-over may have happened,
            // and reaping the new process could kill the guest. Settle as adoption does: the
            // old process exits after a hand-over, the new one when none comes.
            Err(e) => {
                tracing::warn!(old_pid, new_pid, error = %e, "live update answer lost: finding out which process holds the guest");
                if self.settle_update(Some(old_pid), new_pid) != Some(new_pid) {
                    g.updating = None;
                    self.persist_noticed(g);
                    return Err(channel_err("live update")(e));
                }
                tracing::info!(
                    new_pid,
                    "the live update had completed; its pause is unknown"
                );
                0
            }
        };
        let chan = match Channel::from_fd(chan_fd) {
            Ok(c) => c,
            Err(e) => return Err(channel_err("new channel")(e)),
        };
        let old = std::mem::replace(
            vm,
            Vm {
                pid: new_pid,
                chan: Arc::new(chan),
            },
        );
        g.updating = None;
        // The old process exits by itself once it handed over.
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
            pid: old.pid,
            grace_ms: EXIT_GRACE_MS,
        }) {
            tracing::warn!(pid = old.pid, error = %e, "reaping the old hypervisor failed");
        }
        self.persist(g, &[new_pid])?;
        tracing::info!(instance = %g.desc.instance_id, old_pid = old.pid, new_pid, pause_us, ?to, "hypervisor live-updated");
        Ok(crate::api::HypervisorMoved {
            instance_id: g.desc.instance_id.clone(),
            old_pid: old.pid,
            new_pid,
            pause_us,
        })
    }

    /// The release whose block card new cards run: the active release if it carries one.
    fn card_release(&self) -> Option<u64> {
        self.release_carrying(crate::launcher::RELEASE_BLOCKCARD)
    }

    /// The active release if it carries artefact `name` (new cards of that kind run it).
    fn release_carrying(&self, name: &str) -> Option<u64> {
        lock(&self.records)
            .release
            .as_ref()
            .and_then(|r| r.carries(name).then_some(r.version))
    }

    /// A live update the previous controller left in flight: waits (bounded) until one of the
    /// old and new hypervisor processes is gone (the old one exits after a hand-over, the new
    /// one exits when none comes), reaps the other if both still run, and answers the one that
    /// runs the guest.
    fn settle_update(&self, old: Option<u32>, new: u32) -> Option<u32> {
        let running = |pid: u32| -> bool {
            self.launcher
                .children()
                .map(|c| c.iter().any(|k| k.pid == pid && k.running))
                .unwrap_or(false)
        };
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (o, n) = (old.is_some_and(running), running(new));
            match (o, n) {
                (_, false) => {
                    let _ = self.launcher.call(&LaunchRequest::Reap {
                        pid: new,
                        grace_ms: 0,
                    });
                    return old;
                }
                (false, true) => {
                    if let Some(o) = old {
                        let _ = self.launcher.call(&LaunchRequest::Reap {
                            pid: o,
                            grace_ms: 0,
                        });
                    }
                    tracing::info!(new, "adoption: the live update had completed");
                    return Some(new);
                }
                (true, true) if std::time::Instant::now() >= until => {
                    let _ = self.launcher.call(&LaunchRequest::Reap {
                        pid: new,
                        grace_ms: 0,
                    });
                    return old;
                }
                (true, true) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn take_vm(&self, pid: u32, first_id: u64) -> Result<(Vm, VmState), BackendError> {
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::TakeChannel { pid })
            .map_err(launcher_err("take channel"))?;
        let chan = Channel::adopt(fd, first_id).map_err(channel_err("adopt channel"))?;
        match chan.call(Command::Stats, None) {
            Ok(Reply::Stats { state, .. }) => Ok((
                Vm {
                    pid,
                    chan: Arc::new(chan),
                },
                state,
            )),
            Ok(_) => Err(BackendError::Unavailable),
            Err(e) => Err(channel_err("stats")(e)),
        }
    }

    /// Takes `dev` out of the VM (a device that is not there is fine); waits out an operation
    /// on it still in flight from the previous controller.
    fn detach_device(vm: &mut Vm, dev: DeviceId) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            match vm.chan.call(Command::DetachBlock { id: dev.clone() }, None) {
                Err(ClientError::Refused(CommandError::DeviceBusy))
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(_) | Err(ClientError::Refused(CommandError::NoSuchDevice)) => return,
                Err(e) => {
                    tracing::warn!(device = %dev, error = %e, "detaching a device at adoption");
                    return;
                }
            }
        }
    }
}

impl HostBackend {
    /// A running card's control connection again (adoption by a restarted controller), with
    /// the card timeouts; `None` when the card is not `live` or the keeper cannot reach it.
    fn card_control(&self, pid: u32, live: bool) -> Option<UnixStream> {
        if !live {
            return None;
        }
        let (_, fd) = self
            .launcher
            .call_fd(&LaunchRequest::ConnectCardControl { pid })
            .ok()?;
        let control = UnixStream::from(fd);
        let _ = control.set_read_timeout(Some(CARD_TIMEOUT));
        let _ = control.set_write_timeout(Some(CARD_TIMEOUT));
        Some(control)
    }

    /// The card half of AttachVolume: start the card, key it, plug it. Returns the card's pid
    /// (the attachment is in `g`); on failure nothing is left of it.
    /// Spawns and keys the volume's card under the instance's lock, then plugs the disk
    /// without it (the hot-plug waits for the guest's driver; the caller holds the instance's
    /// operation slot) and takes the lock back to record the attachment.
    #[allow(clippy::too_many_arguments)]
    fn attach_card<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
        g: MutexGuard<'a, HostInstance>,
        instance: &ResourceId,
        volume: &ResourceId,
        device: DeviceId,
        body: &[u8],
        storage: Option<crate::api::NetworkVolume>,
    ) -> (MutexGuard<'a, HostInstance>, Result<u32, BackendError>) {
        match self.spawn_keyed_card(&g, instance, volume, device, body, storage) {
            Ok(att) => self.plug_claimed(inst, g, instance, volume, att),
            Err(e) => (g, Err(e)),
        }
    }

    /// The volume's card, spawned and keyed (killed again if it refused the key).
    fn spawn_keyed_card(
        &self,
        g: &HostInstance,
        instance: &ResourceId,
        volume: &ResourceId,
        device: DeviceId,
        body: &[u8],
        storage: Option<crate::api::NetworkVolume>,
    ) -> Result<(Attachment, f64, f64), BackendError> {
        // A network volume's blocks are on its storage node; a local one's in a file here.
        let backing = match &storage {
            Some(_) => None,
            None => Some(self.ensure_backing(volume)?),
        };
        // One request queue per guest vCPU: the hypervisor offers the guest as many as the card
        // serves, up to the vCPU count.
        let queues = u16::try_from(g.desc.vcpus).unwrap_or(1);
        let t_spawn = std::time::Instant::now();
        let spawned = self.launcher.call_fd(&LaunchRequest::SpawnCard {
            backing,
            network: storage,
            read_only: false,
            queues,
            run_as: self.cfg.run_as,
            release: self.card_release(),
        });
        let (pid, control) = match spawned {
            Ok((LaunchReply::Spawned { pid }, fd)) => (pid, UnixStream::from(fd)),
            Ok(_) => return Err(BackendError::Unavailable),
            Err(e) => return Err(launcher_err("spawn card")(e)),
        };
        let _ = control.set_read_timeout(Some(CARD_TIMEOUT));
        let _ = control.set_write_timeout(Some(CARD_TIMEOUT));
        let mut att = Attachment {
            device,
            card_pid: pid,
            control,
            updating: None,
        };
        let spawn_ms = t_spawn.elapsed().as_secs_f64() * 1e3;
        let t_key = std::time::Instant::now();
        let keyed = card_control::call(&mut att.control, body);
        let key_ms = t_key.elapsed().as_secs_f64() * 1e3;
        let outcome = match keyed {
            Ok(CardReply::Attached {
                encrypted: true,
                capacity_sectors,
            }) => {
                tracing::info!(instance = %instance, volume = %volume, card = pid, sectors = capacity_sectors, "card keyed the volume");
                Ok(())
            }
            Ok(CardReply::Attached {
                encrypted: false, ..
            }) => {
                // A sealed key must never come back as a plaintext volume.
                tracing::error!(volume = %volume, "card reported an unencrypted volume for a sealed key");
                Err(BackendError::Unavailable)
            }
            Ok(CardReply::Error { code }) if code == card_control::CARD_KEY_REFUSED => {
                Err(BackendError::KeyRefused)
            }
            Ok(other) => {
                tracing::warn!(reply = ?other, "card refused attach");
                Err(BackendError::Unavailable)
            }
            Err(e) => {
                tracing::warn!(error = %e, "card attach failed");
                Err(BackendError::Unavailable)
            }
        };
        if let Err(e) = outcome {
            self.kill_unkeyed_card(att.card_pid);
            return Err(e);
        }
        Ok((att, spawn_ms, key_ms))
    }

    /// Plugs the keyed card's disk into the instance's VM, the instance's lock released for
    /// the hot-plug's wait; back under the lock, records it, or ends the card if the attach
    /// failed or the VM it went into is no longer the instance's (stopped, terminated,
    /// rebooted meanwhile).
    fn plug_claimed<'a>(
        &self,
        inst: &'a Mutex<HostInstance>,
        g: MutexGuard<'a, HostInstance>,
        instance: &ResourceId,
        volume: &ResourceId,
        (att, spawn_ms, key_ms): (Attachment, f64, f64),
    ) -> (MutexGuard<'a, HostInstance>, Result<u32, BackendError>) {
        let pid = att.card_pid;
        let chan = g.vm.as_ref().map(|vm| Arc::clone(&vm.chan));
        drop(g);
        match fault() {
            None
            | Some(
                Fault::AdoptAfterFirstStall
                | Fault::LiveUpdateSecondNewDies
                | Fault::LiveUpdateAfterHandoverExit
                | Fault::LiveUpdateReplyLost
                | Fault::CardUpdateAfterReplaceExit
                | Fault::CardUpdateReplaceRefused,
            ) => {}
            Some(Fault::AttachAfterCardKeyedExit) => {
                tracing::error!(volume = %volume, "fault hook: exiting mid-attach (card keyed)");
                std::process::exit(70);
            }
            Some(Fault::AttachAfterCardKeyedStall) => {
                tracing::error!(volume = %volume, "fault hook: stalling mid-attach (card keyed)");
                loop {
                    std::thread::park();
                }
            }
        }
        let t_plug = std::time::Instant::now();
        let plugged = match &chan {
            Some(chan) => self.plug(chan, &att),
            None => Err(BackendError::Unavailable),
        };
        let mut g = lock(inst);
        let same_vm = match (&chan, g.vm.as_ref()) {
            (Some(c), Some(vm)) => Arc::ptr_eq(c, &vm.chan),
            _ => false,
        };
        let plugged = match plugged {
            Ok(()) if !same_vm || g.desc.state == InstanceState::Terminated => {
                tracing::warn!(instance = %instance, volume = %volume, "the instance's VM changed during the hot-plug; attach undone");
                Err(BackendError::WrongState)
            }
            other => other,
        };
        match plugged {
            Ok(()) => {
                // Where the host's part of an attach goes (the attach benchmark reads this).
                tracing::info!(
                    instance = %instance,
                    volume = %volume,
                    spawn_ms,
                    key_ms,
                    plug_ms = t_plug.elapsed().as_secs_f64() * 1e3,
                    "attach phases"
                );
                g.next_device = g.next_device.saturating_add(1);
                g.desc.volumes.push(volume.to_string());
                g.volumes.insert(volume.to_string(), att);
                (g, Ok(pid))
            }
            Err(e) => {
                self.unplug_card(att);
                (g, Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn run_scripts_stay_one_argument() {
        let e = encode_run("echo \"a b\"\nexit 3\n");
        assert!(!e.contains(' ') && !e.contains('"') && !e.contains('\n'));
        assert_eq!(encode_run("a b"), "a\\0040b");
        let cl = guest_cmdline("console=ttyS0", Some("x y")).unwrap();
        assert_eq!(cl, "console=ttyS0 bulkhead.run=x\\0040y");
        // A script cannot smuggle another kernel argument.
        let cl = guest_cmdline("console=ttyS0", Some(" init=/bin/sh")).unwrap();
        assert_eq!(cl.split(' ').count(), 2);
        assert_eq!(
            guest_cmdline("c", Some(&" ".repeat(1000))),
            Err(BackendError::UserDataTooLarge)
        );
    }

    #[test]
    fn default_kernel_args_match_the_guest() {
        assert_eq!(
            DEFAULT_KERNEL_ARGS,
            include_str!("../../../guest/cmdline").trim_ascii_end()
        );
    }
}
