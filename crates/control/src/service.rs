//! The control plane's operations. Order for every customer call: authenticate the signature
//! (date window, replay), parse, audit the decision (durably, before acting), honour the
//! idempotency token, act, audit the outcome.
//!
//! This file holds the [`ControlPlane`] itself, its builders and the small helpers every part
//! uses; `dispatch` runs a call (authenticate, parse, audit, idempotency, act), `audit` writes
//! the control plane's own audit log and reads its central alerts back, `kms` calls the KMS.
//! The operations themselves live by resource (`crate::instances`, `crate::volumes`,
//! `crate::vpcs`), the scheduler in [`crate::scheduler`], polling in [`crate::reconciler`].

mod audit;
mod dispatch;
mod kms;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_audit::AuditLog;
use bulkhead_kms_proto::CustomerRequest;
use bulkhead_mtls::HttpsClient;
use bulkhead_rot::attest::Verifier;
use bulkhead_sealing::wrap::Key32;
use serde_json::{json, Value};

use crate::hosts::HostClient;
use crate::repo::{InstanceRow, Repository, VolumeRow};
pub use kms::KMS_DUMP_ENV;

/// Allowed clock difference for a customer's signed request.
pub const REQUEST_WINDOW_SECS: u64 = 300;
/// SMT threads per physical core: instances get whole cores.
pub const THREADS_PER_CORE: u32 = 2;

/// A fresh resource id, `prefix-` and 16 hex digits.
pub(crate) use bulkhead_sealing::random_id as new_id;
/// Seconds since the Unix epoch (request windows, record times).
pub use bulkhead_tokens::clock::unix_now as now;

impl ControlPlane {
    /// What the idempotency record keeps of a request body: HMAC-SHA256 under a key derived from
    /// the control plane's root key, never a plain digest. A body holds customer content (user
    /// data), and a plain SHA-256 next to everything else an operator can read from the database
    /// (action, ids, the client token in clear) would let low-entropy content be guessed offline
    /// (claim 2); without the root key the MAC tells nothing.
    pub(crate) fn request_mac(&self, body: &str) -> Result<String, crate::ControlError> {
        use hmac::{Hmac, Mac};
        type HmacSha256 = Hmac<sha2::Sha256>;
        let key = HmacSha256::new_from_slice(self.root.as_ref())
            .map_err(|_| crate::ControlError::Internal)?
            .chain_update(b"bulkhead control idempotency v1")
            .finalize()
            .into_bytes();
        let mac = HmacSha256::new_from_slice(&key)
            .map_err(|_| crate::ControlError::Internal)?
            .chain_update(body.as_bytes())
            .finalize()
            .into_bytes();
        Ok(hex::encode(mac))
    }
}

pub fn secret_aad(akid: &str) -> Vec<u8> {
    let mut a = b"bulkhead control customer secret v1\0".to_vec();
    a.extend_from_slice(akid.as_bytes());
    a
}

/// An incoming HTTP request, before anything is trusted.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    pub date: Option<String>,
    pub authorization: Option<String>,
    pub nonce: Option<String>,
    /// Every header whose value is visible ASCII, in arrival order (SigV4 signs a chosen set).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub access_key_id: String,
    /// The signed request, forwarded to the KMS as the customer's own authorization.
    pub forwarded: CustomerRequest,
}

pub struct ControlPlane {
    pub repo: Arc<dyn Repository>,
    pub(crate) root: Key32,
    pub(crate) kms: HttpsClient,
    pub(crate) kms_addr: String,
    pub(crate) hosts: HostClient,
    /// host id → 38-byte host public key file.
    pub(crate) host_keys: BTreeMap<String, Vec<u8>>,
    pub(crate) audit: AuditLog,
    pub(crate) placement: tokio::sync::Mutex<()>,
    /// When set, instances are placed only on hosts that attested (fresh TPM quote of a signed
    /// release's measurements) within [`ATTESTATION_TTL`].
    pub(crate) attestation: Option<std::sync::Mutex<Verifier>>,
    pub(crate) attested: std::sync::Mutex<HashMap<String, Instant>>,
    /// host id → the key its audit checkpoints must verify under (fleet monitoring).
    pub(crate) audit_keys: BTreeMap<String, bulkhead_audit::CheckpointKey>,
    /// Hosts whose pulled audit failed a check, and the rule (their pulls stop).
    pub(crate) fleet: crate::fleet::FleetMonitor,
    /// This replica's id and workflow lease ([`crate::workflow::Lease`]).
    pub(crate) lease: crate::workflow::Lease,
    /// The EC2 Query API's region (what SigV4 scopes must name).
    pub(crate) region: String,
    /// Storage nodes for network volumes; `None`: volumes are files on the attaching host.
    pub(crate) storage: Option<crate::storage::Storage>,
    /// Time per workflow step (operators' metrics; the attach benchmark's breakdown).
    pub(crate) step_times: crate::workflow::StepTimes,
    /// Sealed hosts: attested by their whole boot chain ([`crate::sealed`]).
    pub(crate) sealed: crate::sealed::SealedHosts,
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a host's successful attestation lets the scheduler place work on it.
pub const ATTESTATION_TTL: Duration = Duration::from_secs(60);

pub(crate) fn instance_json(i: &InstanceRow) -> Value {
    let mut v = json!({
        "InstanceId": i.instance_id,
        "ImageId": i.image_id,
        "State": i.state.as_str(),
        "LaunchTime": i.created,
        "VcpuCount": i.vcpus,
        "MemoryMiB": i.memory_mib,
        "Cores": i.cores,
        "Tenancy": if i.dedicated { "dedicated" } else { "default" },
    });
    if let (Some(g), Some(o)) = (i.instance_storage_gib, v.as_object_mut()) {
        o.insert("InstanceStorageGiB".into(), json!(g));
    }
    v
}

pub(crate) fn volume_json(v: &VolumeRow) -> Value {
    json!({
        "VolumeId": v.volume_id,
        "SizeGiB": v.size_gib,
        "Encrypted": true,
        "KmsKeyId": v.kms_key_id,
        "State": v.state.as_str(),
        "InstanceId": v.instance_id,
        "CreateTime": v.created,
    })
}

impl ControlPlane {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        repo: Arc<dyn Repository>,
        root: Key32,
        kms: HttpsClient,
        kms_addr: String,
        hosts: HostClient,
        host_keys: BTreeMap<String, Vec<u8>>,
        audit: AuditLog,
    ) -> ControlPlane {
        ControlPlane {
            repo,
            root,
            kms,
            kms_addr,
            hosts,
            host_keys,
            audit,
            placement: tokio::sync::Mutex::new(()),
            attestation: None,
            attested: std::sync::Mutex::new(HashMap::new()),
            audit_keys: BTreeMap::new(),
            fleet: crate::fleet::FleetMonitor::default(),
            lease: crate::workflow::Lease::default(),
            region: crate::config::DEFAULT_REGION.to_string(),
            storage: None,
            step_times: crate::workflow::StepTimes::default(),
            sealed: crate::sealed::SealedHosts::default(),
        }
    }

    /// Places new volumes on these storage nodes (network volumes) instead of hosts' disks.
    pub fn with_storage(mut self, storage: crate::storage::Storage) -> ControlPlane {
        self.storage = Some(storage);
        self
    }

    pub(crate) fn storage(&self) -> Result<&crate::storage::Storage, crate::ControlError> {
        self.storage.as_ref().ok_or_else(|| {
            tracing::error!("a network volume, but no storage nodes are configured");
            crate::ControlError::Internal
        })
    }

    /// Releases a deleted volume's storage on its node (nothing for a host-local volume).
    pub(crate) async fn release_storage(&self, v: &VolumeRow) -> Result<(), crate::ControlError> {
        match &v.storage_node {
            Some(node) => self.storage()?.delete(node, &v.volume_id).await,
            None => Ok(()),
        }
    }

    /// The region of the EC2 Query API (SigV4 credential scopes must name it).
    pub fn with_region(mut self, region: &str) -> ControlPlane {
        self.region = region.to_string();
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Places instances only on hosts that attest against `verifier` (the same policy the KMS
    /// enforces before releasing a volume key).
    pub fn with_attestation(mut self, verifier: Verifier) -> ControlPlane {
        self.attestation = Some(std::sync::Mutex::new(verifier));
        self
    }

    /// The control plane's own audit log (refusals of its listeners are queued into it).
    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }
    /// The central monitoring rules' thresholds (`fleet-rules.toml`).
    pub fn with_fleet_rules(mut self, rules: crate::fleet::Rules) -> Self {
        self.fleet = crate::fleet::FleetMonitor::new(rules);
        self
    }
    /// Checkpoint keys (the hosts' certificates) to verify pulled audit chains with.
    pub fn with_audit_keys(
        mut self,
        keys: BTreeMap<String, bulkhead_audit::CheckpointKey>,
    ) -> Self {
        self.audit_keys = keys;
        self
    }
}
