//! What the controller drives: instances (through the hypervisor's private channel) and volumes
//! (through the block card). Consumers see only these traits.
//!
//! Two implementations:
//! - [`crate::host::HostBackend`] (`"host"`): the real one. Each instance is a
//!   `bulkhead-hypervisor` process driven over its private channel; each attached volume is a
//!   `bulkhead-blockcard` process; both are started by the [`crate::launcher`].
//! - [`DetachedBackend`] (`"detached"`): the explicit fallback when no guest kernel is configured.
//!   It records state in memory and spawns nothing; **no guest runs**. DescribeHost reports which
//!   one is active.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bulkhead_hypervisor_client::{BackendFailure, CommandError};

use crate::api::{
    InstanceDescription, InstanceState, InstanceStorageGib, NetworkSpec, ResourceId, SealedBlob,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("no such instance")]
    NoSuchInstance,
    #[error("instance already exists")]
    AlreadyExists,
    #[error("operation not valid in the instance's current state")]
    WrongState,
    #[error("not enough free capacity")]
    NoCapacity,
    /// Whole-core isolation: the instance's vCPUs need more whole cores than are free.
    #[error("{vcpus} vCPUs need whole cores; {free_cores} whole cores are free")]
    NoFreeCores { vcpus: u32, free_cores: usize },
    #[error("host is draining")]
    Draining,
    #[error("volume already attached")]
    VolumeAttached,
    #[error("no such volume attachment")]
    NoSuchVolume,
    #[error("backend unavailable")]
    Unavailable,
    #[error("the hypervisor has no hot-plug yet: volumes attach and detach only before the instance's first start")]
    HotplugUnsupported,
    #[error("no such image on this host")]
    NoSuchImage,
    #[error("the block card refused the sealed volume key")]
    KeyRefused,
    #[error("user data makes the guest command line too long")]
    UserDataTooLarge,
    #[error("the instance has no network interface")]
    NoNetwork,
    #[error("the instance's net card is already running")]
    NetworkAttached,
    #[error("the net card refused the request (sealed key, routes or rules)")]
    NetCardRefused,
    #[error(
        "this host runs no net cards (no net card binary, host key or host address configured)"
    )]
    NetworkUnavailable,
    /// The hypervisor refused or failed a command, with its own typed reason (mapped 1:1 to a
    /// code by [`hypervisor_code`]). `WrongState` never lands here: it is
    /// [`BackendError::WrongState`].
    #[error("the hypervisor refused: {0}")]
    Hypervisor(CommandError),
    /// A card update failed and the old block card had meanwhile lost its frontend (it exits,
    /// keys erased): the new card, if it took the volume over, is kept as the volume's card.
    #[error("card update failed after the old block card lost its frontend")]
    CardUpdateOldCardGone,
    /// The hypervisor refused to move the running NIC to a net card of a release (the old
    /// card's binary was started again and took the NIC back).
    #[error("the hypervisor refused the new net card's connection")]
    NetReconnectRefused,
    /// A net-card update failed and the card's previous binary could not be started again
    /// either: the guest's NIC has no card until the controller's retries start it (the card
    /// is kept, down, with its port, sealed key and release).
    #[error("net-card update failed and the card's previous binary did not start again (the card is down, retried)")]
    NetCardOldCardGone,
}

/// The stable code of each hypervisor refusal: one per kind, never reused.
pub fn hypervisor_code(e: &CommandError) -> &'static str {
    match e {
        CommandError::Malformed(_) => "hypervisor_malformed_request",
        CommandError::WrongState(_) => "wrong_state",
        CommandError::NoSuchDevice => "no_such_device",
        CommandError::DeviceExists => "device_exists",
        CommandError::NoFreeSlot => "no_device_slot",
        CommandError::MissingFd => "hypervisor_missing_fd",
        CommandError::Backend(BackendFailure::Handshake) => "card_handshake_failed",
        CommandError::Backend(BackendFailure::FeatureMismatch) => "card_feature_mismatch",
        CommandError::Backend(BackendFailure::MemoryTable) => "card_memory_table_failed",
        CommandError::Backend(BackendFailure::Vring) => "card_vring_failed",
        CommandError::Backend(BackendFailure::Config) => "card_config_failed",
        CommandError::Backend(BackendFailure::Unresponsive) => "card_unresponsive",
        CommandError::Backend(BackendFailure::IdentityMismatch) => "card_identity_mismatch",
        CommandError::OutOfInterruptRoutes => "no_interrupt_routes",
        CommandError::DeviceBusy => "device_busy",
        CommandError::NoSuchOp => "hypervisor_no_such_op",
        CommandError::OpIdInUse => "hypervisor_op_id_in_use",
        CommandError::TooManyOps => "hypervisor_too_many_ops",
        CommandError::Internal => "hypervisor_internal",
        CommandError::WrongDeviceKind => "wrong_device_kind",
        CommandError::LiveUpdate(_) => "live_update_failed",
    }
}

#[cfg(test)]
mod hypervisor_code_tests {
    use super::*;
    use bulkhead_hypervisor_client::VmState;

    /// Every hypervisor refusal kind reaches the API under its own code (none is folded into
    /// another, none reuses a backend code other than `wrong_state`).
    #[test]
    fn each_hypervisor_refusal_has_its_own_code() {
        let all = [
            CommandError::Malformed(bulkhead_channel_decode_error()),
            CommandError::NoSuchDevice,
            CommandError::DeviceExists,
            CommandError::NoFreeSlot,
            CommandError::MissingFd,
            CommandError::Backend(BackendFailure::Handshake),
            CommandError::Backend(BackendFailure::FeatureMismatch),
            CommandError::Backend(BackendFailure::MemoryTable),
            CommandError::Backend(BackendFailure::Vring),
            CommandError::Backend(BackendFailure::Config),
            CommandError::Backend(BackendFailure::Unresponsive),
            CommandError::OutOfInterruptRoutes,
            CommandError::DeviceBusy,
            CommandError::NoSuchOp,
            CommandError::OpIdInUse,
            CommandError::TooManyOps,
            CommandError::Internal,
            CommandError::WrongDeviceKind,
            CommandError::LiveUpdate(bulkhead_hypervisor_client::LiveUpdateFailure::PeerGone),
        ];
        let codes: std::collections::BTreeSet<&str> = all.iter().map(hypervisor_code).collect();
        assert_eq!(codes.len(), all.len(), "{codes:?}");
        let backend = [
            BackendError::NoSuchInstance,
            BackendError::AlreadyExists,
            BackendError::NoCapacity,
            BackendError::NoFreeCores {
                vcpus: 1,
                free_cores: 0,
            },
            BackendError::Draining,
            BackendError::VolumeAttached,
            BackendError::NoSuchVolume,
            BackendError::Unavailable,
            BackendError::HotplugUnsupported,
            BackendError::NoSuchImage,
            BackendError::KeyRefused,
            BackendError::UserDataTooLarge,
            BackendError::NoNetwork,
            BackendError::NetworkAttached,
            BackendError::NetCardRefused,
            BackendError::NetworkUnavailable,
            BackendError::CardUpdateOldCardGone,
            BackendError::NetReconnectRefused,
            BackendError::NetCardOldCardGone,
        ];
        for b in backend {
            assert!(!codes.contains(b.code()), "{} reused", b.code());
        }
        assert_eq!(
            hypervisor_code(&CommandError::WrongState(VmState::Stopped)),
            BackendError::WrongState.code()
        );
        assert_eq!(
            BackendError::Hypervisor(CommandError::NoFreeSlot).status(),
            409
        );
    }

    fn bulkhead_channel_decode_error() -> bulkhead_hypervisor_client::DecodeError {
        bulkhead_hypervisor_client::DecodeError::Body
    }
}

fn hypervisor_status(e: &CommandError) -> u16 {
    match e {
        CommandError::NoSuchDevice => 404,
        CommandError::WrongState(_)
        | CommandError::DeviceExists
        | CommandError::NoFreeSlot
        | CommandError::OutOfInterruptRoutes
        | CommandError::DeviceBusy
        | CommandError::WrongDeviceKind => 409,
        // The block card's end of the vhost-user connection misbehaved.
        CommandError::Backend(_) => 502,
        CommandError::TooManyOps => 503,
        // The guest keeps running on the old hypervisor: try again later.
        CommandError::LiveUpdate(_) => 503,
        // The controller and the hypervisor disagree about the protocol, or the hypervisor
        // failed inside: a fault on our side.
        CommandError::Malformed(_)
        | CommandError::MissingFd
        | CommandError::NoSuchOp
        | CommandError::OpIdInUse
        | CommandError::Internal => 500,
    }
}

impl BackendError {
    pub fn code(&self) -> &'static str {
        match self {
            BackendError::NoSuchInstance => "no_such_instance",
            BackendError::AlreadyExists => "instance_exists",
            BackendError::WrongState => "wrong_state",
            BackendError::NoCapacity => "no_capacity",
            BackendError::NoFreeCores { .. } => "no_free_cores",
            BackendError::Draining => "host_draining",
            BackendError::VolumeAttached => "volume_attached",
            BackendError::NoSuchVolume => "no_such_volume",
            BackendError::Unavailable => "backend_unavailable",
            BackendError::HotplugUnsupported => "hotplug_unsupported",
            BackendError::NoSuchImage => "no_such_image",
            BackendError::KeyRefused => "volume_key_refused",
            BackendError::UserDataTooLarge => "user_data_too_large",
            BackendError::NoNetwork => "no_network",
            BackendError::NetworkAttached => "network_attached",
            BackendError::NetCardRefused => "net_card_refused",
            BackendError::NetworkUnavailable => "network_unavailable",
            BackendError::Hypervisor(e) => hypervisor_code(e),
            BackendError::CardUpdateOldCardGone => "card_update_old_card_gone",
            BackendError::NetReconnectRefused => "net_reconnect_refused",
            BackendError::NetCardOldCardGone => "net_card_old_card_gone",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            BackendError::NoSuchInstance
            | BackendError::NoSuchVolume
            | BackendError::NoSuchImage => 404,
            BackendError::KeyRefused
            | BackendError::UserDataTooLarge
            | BackendError::NetCardRefused => 400,
            BackendError::Unavailable | BackendError::NetworkUnavailable => 503,
            BackendError::CardUpdateOldCardGone
            | BackendError::NetReconnectRefused
            | BackendError::NetCardOldCardGone => 500,
            BackendError::Hypervisor(e) => hypervisor_status(e),
            _ => 409,
        }
    }
}

/// Instance shape asked for at create time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub id: ResourceId,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Customer script for the guest (customer plane only; never interpreted by the controller).
    pub user_data: Option<String>,
    /// The VPC interface (its card starts with `attach_network`).
    pub network: Option<NetworkSpec>,
    /// Instance storage: a local ephemeral disk, keyed inside its card.
    pub instance_storage: Option<InstanceStorageGib>,
}

/// One interface's net card counters (numbers only), for `/v1/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetCounters {
    pub instance: String,
    pub counters: Vec<(String, u64)>,
}

/// A net card the controller restarted after it died (audited by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetCardRestart {
    pub instance: String,
    pub old_pid: u32,
    /// The new card's pid, or the refusal code if it could not be restarted.
    pub outcome: Result<u32, &'static str>,
}

/// Host capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpus_total: u32,
    pub vcpus_free: u32,
    pub memory_mib_total: u64,
    pub memory_mib_free: u64,
    pub instances: u32,
}

/// Instance lifecycle, as the hypervisor will take it over its private channel.
pub trait InstanceBackend: Send + Sync {
    /// Short name reported by DescribeHost.
    fn kind(&self) -> &'static str;
    fn capacity(&self) -> Capacity;
    fn create(&self, spec: &InstanceSpec) -> Result<InstanceDescription, BackendError>;
    fn describe(&self, id: &ResourceId) -> Result<InstanceDescription, BackendError>;
    fn start(&self, id: &ResourceId) -> Result<(), BackendError>;
    fn stop(&self, id: &ResourceId) -> Result<(), BackendError>;
    fn reboot(&self, id: &ResourceId) -> Result<(), BackendError>;
    fn terminate(&self, id: &ResourceId) -> Result<(), BackendError>;
    /// Console output captured so far (owner's customer plane only).
    fn console(&self, id: &ResourceId) -> Result<String, BackendError>;
    fn set_draining(&self, draining: bool);
    fn draining(&self) -> bool;
    /// Processes (`card`, `hypervisor`) their sandbox killed since the last call, by pid.
    fn sandbox_kills(&self) -> Vec<(u32, String)> {
        Vec::new()
    }
    /// Starts the instance's net card with its sealed epoch key (never opened here) and plugs
    /// it into the VM. Returns the card's UDP endpoint.
    fn attach_network(
        &self,
        _id: &ResourceId,
        _epoch: u32,
        _sealed_key: SealedBlob,
    ) -> Result<String, BackendError> {
        Err(BackendError::NetworkUnavailable)
    }
    /// Replaces the card's routing table.
    fn set_net_routes(&self, _id: &ResourceId, _routes: &[String]) -> Result<(), BackendError> {
        Err(BackendError::NetworkUnavailable)
    }
    /// Replaces the card's ingress rules.
    fn set_net_rules(&self, _id: &ResourceId, _allow: &[String]) -> Result<(), BackendError> {
        Err(BackendError::NetworkUnavailable)
    }
    /// Every running card's counters.
    fn net_counters(&self) -> Vec<NetCounters> {
        Vec::new()
    }
    /// Restarts net cards that died (with their config and kept sealed key); called
    /// periodically.
    fn restart_dead_net_cards(&self) -> Vec<NetCardRestart> {
        Vec::new()
    }
    /// The host's active release (DeployRelease), from its durable record.
    fn active_release(&self) -> Option<crate::record::ReleaseRecord> {
        None
    }
    /// Runs installed release `version`'s hypervisor self-test; whether it passed.
    fn release_self_test(&self, _version: u64) -> Result<bool, BackendError> {
        Err(BackendError::Unavailable)
    }
    /// Instances whose hypervisor runs (a live update moves each).
    fn running_hypervisors(&self) -> Vec<ResourceId> {
        Vec::new()
    }
    /// Live-updates instance `id`'s hypervisor to installed release `to` (`None`: the
    /// configured binary). On an error the old process still runs the guest.
    fn live_update(
        &self,
        _id: &ResourceId,
        _to: Option<u64>,
    ) -> Result<crate::api::HypervisorMoved, BackendError> {
        Err(BackendError::Unavailable)
    }
    /// Every attached volume whose block card runs under a running hypervisor (a card update
    /// moves each), as (instance, volume, whether the card can be updated: a local volume).
    fn attached_cards(&self) -> Vec<(ResourceId, String, bool)> {
        Vec::new()
    }
    /// Replaces the block card of `volume` on instance `id` by a card of installed release `to`
    /// (`None`: the configured binary) under the running guest. On an error the old card still
    /// serves the volume.
    fn update_card(
        &self,
        _id: &ResourceId,
        _volume: &str,
        _to: Option<u64>,
    ) -> Result<crate::api::CardMoved, BackendError> {
        Err(BackendError::Unavailable)
    }
    /// Instances whose net card serves a running guest (DeployRelease moves each), with the
    /// release the card runs (`None`: the configured binary).
    fn running_net_cards(&self) -> Vec<(ResourceId, Option<u64>)> {
        Vec::new()
    }
    /// Replaces the net card of instance `id` by a net card of installed release `to` (`None`:
    /// the configured binary), reconnected to the running guest's NIC in place. On an error
    /// the binary the card ran before serves the NIC again.
    fn update_net_card(
        &self,
        _id: &ResourceId,
        _to: Option<u64>,
    ) -> Result<crate::api::NetCardMoved, BackendError> {
        Err(BackendError::Unavailable)
    }
    /// Every net card and the release whose binary it runs, for GetHealth.
    fn net_card_releases(&self) -> Vec<crate::api::NetCardRelease> {
        Vec::new()
    }
    /// Makes `release` the active release: recorded durably, started by new instances.
    fn set_active_release(
        &self,
        _release: crate::record::ReleaseRecord,
    ) -> Result<(), BackendError> {
        Err(BackendError::Unavailable)
    }
}

/// Volume attachment, as the block card will take it. The sealed key is passed through unopened.
pub trait VolumeBackend: Send + Sync {
    fn attach(
        &self,
        instance: &ResourceId,
        volume: &ResourceId,
        sealed_key: SealedBlob,
        storage: Option<crate::api::NetworkVolume>,
    ) -> Result<(), BackendError>;
    fn detach(&self, instance: &ResourceId, volume: &ResourceId) -> Result<(), BackendError>;
}

struct Instance {
    desc: InstanceDescription,
    console: String,
    /// Held only so the blob's lifetime matches the attachment; never read.
    sealed: BTreeMap<String, SealedBlob>,
    network: Option<NetworkSpec>,
    /// The sealed epoch key of an "attached" interface (nothing runs; never read).
    net_sealed: Option<SealedBlob>,
}

#[derive(Default)]
struct Inner {
    instances: BTreeMap<ResourceId, Instance>,
    draining: bool,
}

/// In-memory stand-in: host has no hypervisor wired yet. Spawns nothing, runs no guest.
pub struct DetachedBackend {
    vcpus_total: u32,
    memory_mib_total: u64,
    inner: Mutex<Inner>,
}

impl DetachedBackend {
    pub fn new(vcpus_total: u32, memory_mib_total: u64) -> Self {
        DetachedBackend {
            vcpus_total,
            memory_mib_total,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    fn transition(
        &self,
        id: &ResourceId,
        from: &[InstanceState],
        to: InstanceState,
        line: &str,
    ) -> Result<(), BackendError> {
        self.with(|i| {
            let inst = i
                .instances
                .get_mut(id)
                .ok_or(BackendError::NoSuchInstance)?;
            if !from.contains(&inst.desc.state) {
                return Err(BackendError::WrongState);
            }
            inst.desc.state = to;
            inst.console.push_str(line);
            inst.console.push('\n');
            Ok(())
        })
    }
}

fn used(i: &Inner) -> (u32, u64, u32) {
    let live = i
        .instances
        .values()
        .filter(|x| x.desc.state != InstanceState::Terminated);
    live.fold((0u32, 0u64, 0u32), |(c, m, n), x| {
        (
            c.saturating_add(x.desc.vcpus),
            m.saturating_add(u64::from(x.desc.memory_mib)),
            n.saturating_add(1),
        )
    })
}

impl InstanceBackend for DetachedBackend {
    fn kind(&self) -> &'static str {
        "detached"
    }

    fn capacity(&self) -> Capacity {
        self.with(|i| {
            let (c, m, n) = used(i);
            Capacity {
                vcpus_total: self.vcpus_total,
                vcpus_free: self.vcpus_total.saturating_sub(c),
                memory_mib_total: self.memory_mib_total,
                memory_mib_free: self.memory_mib_total.saturating_sub(m),
                instances: n,
            }
        })
    }

    fn create(&self, spec: &InstanceSpec) -> Result<InstanceDescription, BackendError> {
        self.with(|i| {
            if i.draining {
                return Err(BackendError::Draining);
            }
            if i.instances.contains_key(&spec.id) {
                return Err(BackendError::AlreadyExists);
            }
            let (c, m, _) = used(i);
            if c.saturating_add(spec.vcpus) > self.vcpus_total
                || m.saturating_add(u64::from(spec.memory_mib)) > self.memory_mib_total
            {
                return Err(BackendError::NoCapacity);
            }
            let desc = InstanceDescription {
                instance_id: spec.id.to_string(),
                image: spec.image.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                state: InstanceState::Created,
                volumes: Vec::new(),
                // Recorded only: no card runs, no disk exists.
                instance_storage_gib: spec.instance_storage.map(InstanceStorageGib::get),
                net_endpoint: None,
            };
            i.instances.insert(
                spec.id.clone(),
                Instance {
                    desc: desc.clone(),
                    console: "[detached backend: no hypervisor wired; no guest runs]\n".into(),
                    sealed: BTreeMap::new(),
                    network: spec.network.clone(),
                    net_sealed: None,
                },
            );
            Ok(desc)
        })
    }

    fn describe(&self, id: &ResourceId) -> Result<InstanceDescription, BackendError> {
        self.with(|i| {
            i.instances
                .get(id)
                .map(|x| x.desc.clone())
                .ok_or(BackendError::NoSuchInstance)
        })
    }

    fn start(&self, id: &ResourceId) -> Result<(), BackendError> {
        use InstanceState::*;
        self.transition(id, &[Created, Stopped], Running, "[detached] start")
    }

    fn stop(&self, id: &ResourceId) -> Result<(), BackendError> {
        use InstanceState::*;
        self.transition(id, &[Running], Stopped, "[detached] stop")
    }

    fn reboot(&self, id: &ResourceId) -> Result<(), BackendError> {
        use InstanceState::*;
        self.transition(id, &[Running], Running, "[detached] reboot")
    }

    fn terminate(&self, id: &ResourceId) -> Result<(), BackendError> {
        use InstanceState::*;
        self.transition(
            id,
            &[Created, Running, Stopped],
            Terminated,
            "[detached] terminate",
        )?;
        self.with(|i| {
            if let Some(inst) = i.instances.get_mut(id) {
                inst.sealed.clear();
                inst.desc.volumes.clear();
                inst.net_sealed = None;
            }
        });
        Ok(())
    }

    fn console(&self, id: &ResourceId) -> Result<String, BackendError> {
        self.with(|i| {
            i.instances
                .get(id)
                .map(|x| x.console.clone())
                .ok_or(BackendError::NoSuchInstance)
        })
    }

    fn set_draining(&self, draining: bool) {
        self.with(|i| i.draining = draining);
    }

    fn draining(&self) -> bool {
        self.with(|i| i.draining)
    }

    /// Records the interface as attached; no card runs, so the endpoint is `0.0.0.0:0`.
    fn attach_network(
        &self,
        id: &ResourceId,
        _epoch: u32,
        sealed_key: SealedBlob,
    ) -> Result<String, BackendError> {
        self.with(|i| {
            let inst = i
                .instances
                .get_mut(id)
                .ok_or(BackendError::NoSuchInstance)?;
            if inst.desc.state == InstanceState::Terminated {
                return Err(BackendError::WrongState);
            }
            if inst.network.is_none() {
                return Err(BackendError::NoNetwork);
            }
            if inst.net_sealed.is_some() {
                return Err(BackendError::NetworkAttached);
            }
            inst.net_sealed = Some(sealed_key);
            let ep = "0.0.0.0:0".to_string();
            inst.desc.net_endpoint = Some(ep.clone());
            Ok(ep)
        })
    }

    fn set_net_routes(&self, id: &ResourceId, _routes: &[String]) -> Result<(), BackendError> {
        self.with(|i| match i.instances.get(id) {
            None => Err(BackendError::NoSuchInstance),
            Some(x) if x.net_sealed.is_none() => Err(BackendError::NoNetwork),
            Some(_) => Ok(()),
        })
    }

    fn set_net_rules(&self, id: &ResourceId, allow: &[String]) -> Result<(), BackendError> {
        self.set_net_routes(id, allow)
    }
}

impl VolumeBackend for DetachedBackend {
    fn attach(
        &self,
        instance: &ResourceId,
        volume: &ResourceId,
        sealed_key: SealedBlob,
        _storage: Option<crate::api::NetworkVolume>,
    ) -> Result<(), BackendError> {
        self.with(|i| {
            let inst = i
                .instances
                .get_mut(instance)
                .ok_or(BackendError::NoSuchInstance)?;
            if inst.desc.state == InstanceState::Terminated {
                return Err(BackendError::WrongState);
            }
            if inst.sealed.contains_key(volume.as_str()) {
                return Err(BackendError::VolumeAttached);
            }
            inst.sealed.insert(volume.to_string(), sealed_key);
            inst.desc.volumes.push(volume.to_string());
            Ok(())
        })
    }

    fn detach(&self, instance: &ResourceId, volume: &ResourceId) -> Result<(), BackendError> {
        self.with(|i| {
            let inst = i
                .instances
                .get_mut(instance)
                .ok_or(BackendError::NoSuchInstance)?;
            inst.sealed
                .remove(volume.as_str())
                .ok_or(BackendError::NoSuchVolume)?;
            inst.desc.volumes.retain(|v| v != volume.as_str());
            Ok(())
        })
    }
}
