//! Control-plane state behind one [`Repository`] trait. [`SqliteRepo`] is the embedded default
//! (WAL, versioned migrations). Every customer-facing query takes the tenant and filters by it:
//! there is no call that returns another tenant's row.
//!
//! Nothing secret is stored in plaintext: customer signing secrets are AES-256-GCM-wrapped under
//! the control plane's root key, and volumes hold only the KMS ciphertext of their data key.
//!
//! This file holds the trait, its rows and its error; `sqlite` the embedded implementation
//! (`crate::pg` the PostgreSQL one, `crate::net_store` and `crate::workflow::store` the parts
//! both share).

mod sqlite;

use serde::{Deserialize, Serialize};

pub use crate::state::{BadTransition, InstanceState, SnapshotState, UnknownState, VolumeState};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("repository lock poisoned")]
    Poisoned,
    #[error("schema version {0} is newer than this binary")]
    TooNew(i64),
    #[error("row already exists")]
    Conflict,
    #[error("row changed concurrently")]
    Stale,
    #[error("postgres error (see log)")]
    Postgres,
    /// The database cannot be reached (connection lost, server down): nothing was done, and
    /// nothing read from this replica's memory is acted on instead.
    #[error("state store unreachable")]
    Unavailable,
    /// Another replica took over this workflow (its lease expired): this one stops acting.
    #[error("workflow lease lost to another replica")]
    LeaseLost,
    #[error(transparent)]
    BadState(#[from] UnknownState),
    #[error(transparent)]
    Transition(#[from] BadTransition),
    /// A network change the state does not allow (nothing was written).
    #[error(transparent)]
    Refused(#[from] crate::net_store::NetRefusal),
    /// A stored value that does not parse (a corrupt row, or a newer schema).
    #[error("corrupt stored {0}")]
    Corrupt(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRow {
    pub access_key_id: String,
    pub tenant_id: String,
    pub wrapped_secret: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    pub host_id: String,
    pub addr: String,
    pub cores: u32,
    /// Tenant a dedicated host is reserved for while it runs that tenant's instances.
    pub dedicated_tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub instance_id: String,
    pub tenant_id: String,
    pub host_id: String,
    pub image_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Whole physical cores reserved (both SMT siblings of each).
    pub cores: u32,
    pub dedicated: bool,
    pub state: InstanceState,
    pub created: u64,
    /// Instance storage asked for at RunInstances (GiB; `None`: none). The disk itself is on
    /// the host, keyed inside its card; the control plane keeps only the size.
    pub instance_storage_gib: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRow {
    pub volume_id: String,
    pub tenant_id: String,
    pub size_gib: u32,
    pub kms_key_id: String,
    /// KMS ciphertext of the data key (never the key).
    pub ciphertext_blob: Vec<u8>,
    pub state: VolumeState,
    pub instance_id: Option<String>,
    pub host_id: Option<String>,
    pub created: u64,
    /// The storage node holding the volume's ciphertext (`None`: a host-local file, the
    /// embedded mode without storage nodes).
    pub storage_node: Option<String>,
}

/// A snapshot: its volume's data-key blob (the same key family) and where its ciphertext is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub snapshot_id: String,
    pub tenant_id: String,
    /// The volume it was taken of (which may be gone since).
    pub volume_id: String,
    pub size_gib: u32,
    pub kms_key_id: String,
    /// KMS ciphertext of the family's data key (never the key).
    pub ciphertext_blob: Vec<u8>,
    pub state: SnapshotState,
    pub storage_node: Option<String>,
    pub created: u64,
}

/// The repository every backend implements; the same test suite runs against each.
pub trait Repository:
    crate::workflow::WorkflowStore + crate::net_store::NetStore + Send + Sync
{
    fn put_customer(&self, c: &CustomerRow) -> Result<(), RepoError>;
    fn customer(&self, access_key_id: &str) -> Result<Option<CustomerRow>, RepoError>;
    /// Records a request signature; `false` if it was already seen (a replay). Forgets
    /// signatures older than `forget_before`.
    fn first_use_of_signature(
        &self,
        signature: &str,
        now: u64,
        forget_before: u64,
    ) -> Result<bool, RepoError>;
    /// The stored (request hash, response) of an idempotency token.
    fn idempotency(
        &self,
        tenant: &str,
        action: &str,
        token: &str,
    ) -> Result<Option<(String, String)>, RepoError>;
    fn put_idempotency(
        &self,
        tenant: &str,
        action: &str,
        token: &str,
        hash: &str,
        response: &str,
    ) -> Result<(), RepoError>;

    fn upsert_host(&self, h: &HostRow) -> Result<(), RepoError>;
    fn hosts(&self) -> Result<Vec<HostRow>, RepoError>;
    fn set_host_dedicated(&self, host_id: &str, tenant: Option<&str>) -> Result<(), RepoError>;
    fn set_host_status(&self, host_id: &str, status_json: &str, now: u64) -> Result<(), RepoError>;
    fn host_status(&self, host_id: &str) -> Result<Option<(String, u64)>, RepoError>;
    fn host_audit_cursor(&self, host_id: &str) -> Result<u64, RepoError>;
    /// Stores pulled audit records `(seq, line)` and advances the cursor.
    fn append_host_audit(&self, host_id: &str, records: &[(u64, String)]) -> Result<(), RepoError>;
    fn host_audit_count(&self, host_id: &str) -> Result<u64, RepoError>;
    /// Pulled audit records of a host with `seq > after`, in order, at most `limit`.
    fn host_audit_after(
        &self,
        host_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, RepoError>;

    fn insert_instance(&self, i: &InstanceRow) -> Result<(), RepoError>;
    fn instance(&self, tenant: &str, id: &str) -> Result<Option<InstanceRow>, RepoError>;
    fn instances(&self, tenant: &str) -> Result<Vec<InstanceRow>, RepoError>;
    /// Every non-terminated instance of every tenant (scheduler and poller only).
    fn live_instances(&self) -> Result<Vec<InstanceRow>, RepoError>;
    /// Compare-and-set of an instance's state: allowed by [`InstanceState::can_become`] and
    /// only if its state is still `from` (else [`RepoError::Stale`]).
    fn set_instance_state(
        &self,
        tenant: &str,
        id: &str,
        from: InstanceState,
        to: InstanceState,
    ) -> Result<(), RepoError>;

    fn insert_volume(&self, v: &VolumeRow) -> Result<(), RepoError>;
    fn volume(&self, tenant: &str, id: &str) -> Result<Option<VolumeRow>, RepoError>;
    fn volumes(&self, tenant: &str) -> Result<Vec<VolumeRow>, RepoError>;
    /// Compare-and-set of a volume's attachment: allowed by [`VolumeState::can_become`] and
    /// only if its state is still `from` (else [`RepoError::Stale`]).
    fn transition_volume(
        &self,
        tenant: &str,
        id: &str,
        from: VolumeState,
        to: VolumeState,
        instance: Option<&str>,
        host: Option<&str>,
    ) -> Result<(), RepoError>;
    /// Removes a volume DeleteVolume took (`deleting`); false for any other state or tenant.
    fn delete_volume(&self, tenant: &str, id: &str) -> Result<bool, RepoError>;
    /// Volumes left mid-transition (attaching/detaching) by a crash, any tenant.
    fn volumes_in_transition(&self) -> Result<Vec<VolumeRow>, RepoError>;

    fn insert_snapshot(&self, s: &SnapshotRow) -> Result<(), RepoError>;
    fn snapshot(&self, tenant: &str, id: &str) -> Result<Option<SnapshotRow>, RepoError>;
    fn snapshots(&self, tenant: &str) -> Result<Vec<SnapshotRow>, RepoError>;
    /// Compare-and-set of a snapshot's state, allowed by [`SnapshotState::can_become`].
    fn transition_snapshot(
        &self,
        tenant: &str,
        id: &str,
        from: SnapshotState,
        to: SnapshotState,
    ) -> Result<(), RepoError>;
    /// Removes a snapshot in `deleting`; false for any other state or tenant.
    fn delete_snapshot(&self, tenant: &str, id: &str) -> Result<bool, RepoError>;

    /// Placement and reservation as one atomic step: under a lock every scheduler of this
    /// store takes (the connection's on SQLite, a transaction-scoped advisory lock on
    /// PostgreSQL, shared by every replica), reads the hosts and live instances, asks `choose`
    /// for a host and inserts `row` there as `pending` (its host set to the choice), reserving
    /// the host for the tenant when `row.dedicated`. `None` when `choose` finds no host: nothing
    /// written. No two reservations ever see the same free cores.
    fn reserve_instance(
        &self,
        row: &InstanceRow,
        choose: Chooser,
    ) -> Result<Option<String>, RepoError>;

    /// Whether several control-plane processes may share this store (PostgreSQL): workflows
    /// are then resumed only once their owner's lease expired, and one replica polls hosts.
    fn shared(&self) -> bool {
        false
    }
}

/// The placement function [`Repository::reserve_instance`] runs under its lock.
pub type Chooser = Box<dyn FnOnce(&[HostRow], &[InstanceRow]) -> Option<String> + Send>;

pub use sqlite::SqliteRepo;

pub use crate::repo_contract::contract_suite;
