//! `bulkhead-control`: the control plane (the EC2/EBS control plane's role in the Nitro design).
//!
//! * [`api`]: the versioned customer API and its one parser; requests are signed by the customer
//!   (`bulkhead_ec2_query::bh1`, SigV4-style) and replays are refused.
//! * [`repo`]: state behind the [`repo::Repository`] trait (SQLite by default); every customer
//!   query is scoped to the caller's tenant.
//! * [`service`]: the operations, the scheduler (whole cores, dedicated hosts) and the attach flow
//!   (customer → here → KMS → host controller), each call audited.
//! * [`hosts`]: calls to host controllers over mutual TLS with a token minted for just that host,
//!   operation and resource; [`service::ControlPlane::poll_hosts`] pulls state and audit records
//!   (hosts never call out).

pub mod api;
mod auth;
pub mod config;
pub mod fleet;
mod fleet_rules;
pub mod hosts;
mod instances;
pub mod net;
pub mod net_store;
pub mod openapi;
pub mod operator;
pub mod pg;
pub mod query;
mod query_map;
mod query_render;
pub mod reconciler;
pub mod repo;
#[doc(hidden)]
pub mod repo_contract;
pub mod scheduler;
pub mod schema;
pub mod sealed;
pub mod server;
pub mod service;
mod snapshots;
pub mod state;
pub mod storage;
mod volumes;
mod vpcs;
pub mod workflow;

use bulkhead_ec2_query::bh1::SigError;

/// Every refusal and failure the customer API returns. Codes are stable.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such action")]
    NoSuchAction,
    #[error("method not allowed (use POST)")]
    MethodNotAllowed,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request body is not valid JSON for this action")]
    BadBody,
    #[error("request body has an unknown field")]
    UnknownField,
    #[error("bad identifier")]
    BadId,
    #[error("bad parameter value")]
    BadShape,
    #[error("InstanceStorageGiB must be 1..=64")]
    BadInstanceStorage,
    #[error("volumes are always encrypted")]
    EncryptionRequired,
    #[error("authentication failed: {0}")]
    Auth(SigError),
    #[error("this signed request was already used (replay)")]
    Replayed,
    #[error("no such instance")]
    NoSuchInstance,
    #[error("no such volume")]
    NoSuchVolume,
    #[error("no such snapshot")]
    NoSuchSnapshot,
    #[error("resource is not in a state that allows this")]
    WrongState,
    #[error("volume is attached")]
    VolumeInUse,
    #[error("no host has enough free whole cores")]
    NoCapacity,
    #[error("no host with free capacity passed attestation")]
    NoAttestedHost,
    #[error("idempotency token reused with different parameters")]
    IdempotencyMismatch,
    #[error("KMS refused: {0}")]
    Kms(&'static str),
    #[error("host controller refused: {0}")]
    Host(&'static str),
    #[error("upstream service unreachable")]
    Upstream,
    #[error("audit log unavailable; nothing was done")]
    AuditUnavailable,
    #[error("bad network parameter: {0}")]
    BadNetwork(net::NetError),
    #[error("state store: {0}")]
    Repo(#[from] repo::RepoError),
    #[error("internal error")]
    Internal,
    #[error("EC2 Query signature: {0}")]
    SigV4(bulkhead_ec2_query::SigV4Error),
    #[error("EC2 Query request: {0}")]
    Query(bulkhead_ec2_query::QueryError),
    #[error("Request would have succeeded, but DryRun flag is set.")]
    DryRun,
    #[error("not supported by Bulkhead's EC2 Query API: {0}")]
    Unsupported(&'static str),
}

/// KMS and controller error codes passed through to the customer (anything else is generic).
const UPSTREAM_CODES: &[&str] = &[
    "authorization_not_recent",
    "wrong_customer_action",
    "no_such_key",
    "no_grant",
    "key_destroyed",
    "storage_fenced",
    "storage_unavailable",
    "bad_storage",
    "volume_in_use",
    "member_exists",
    "unknown_host",
    "host_key_mismatch",
    "auth_bad_signature",
    "auth_unknown_access_key",
    "auth_stale",
    "customer_exists",
    "no_such_instance",
    "no_such_image",
    "no_such_volume",
    "wrong_state",
    "no_capacity",
    "no_free_cores",
    "volume_attached",
    "host_draining",
    "instance_exists",
    "quota_exceeded",
    "audit_unavailable",
    "bad_sealed_key",
    "policy_denied",
    "token_operation_not_granted",
    "token_resource_not_granted",
    "authorization_replayed",
    "attestation_required",
    "evidence_for_another_host",
    "attestation_unavailable",
    "attestation_failed",
    "attest_malformed",
    "attest_unknown_host",
    "attest_environment_mismatch",
    "attest_bad_signature",
    "attest_nonce_replayed",
    "attest_nonce_expired",
    "attest_wrong_pcr_selection",
    "attest_bad_event_log",
    "attest_log_mismatch",
    "attest_unknown_measurements",
    "no_such_route",
    "body_unknown_field",
    "no_such_vpc",
    "vpc_exists",
    "network_unavailable",
    "network_attached",
    "no_network",
    "bad_network_vpc",
    "bad_network_mac",
    "bad_network_ip",
    "bad_network_gateway",
    "bad_network_mtu",
    "bad_network_rule",
    "bad_network_route",
    "bad_network_epoch",
    "net_card_refused",
    "backend_unavailable",
    "hotplug_unsupported",
    "hypervisor_malformed_request",
    "no_such_device",
    "device_exists",
    "no_device_slot",
    "hypervisor_missing_fd",
    "card_handshake_failed",
    "card_feature_mismatch",
    "card_memory_table_failed",
    "card_vring_failed",
    "card_config_failed",
    "no_interrupt_routes",
    "device_busy",
    "hypervisor_internal",
    "wrong_device_kind",
    "internal_error",
];

/// Maps an upstream code to its stable static form.
/// A host's attestation evidence as a workflow stored it (JSON from its controller's
/// `/v1/host/attest`, or null when the KMS did not ask for one), typed for the KMS request. A
/// host that answered something that is not evidence fails the step (the workflow unwinds).
pub(crate) fn evidence_of<T: serde::de::DeserializeOwned>(
    v: Option<&serde_json::Value>,
) -> Result<Option<T>, ControlError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(e) => serde_json::from_value(e.clone()).map(Some).map_err(|err| {
            tracing::warn!(error = %err, "a host's attestation evidence does not parse");
            ControlError::Host("bad_evidence")
        }),
    }
}

pub fn upstream_code(code: &str) -> &'static str {
    UPSTREAM_CODES
        .iter()
        .copied()
        .find(|c| *c == code)
        .unwrap_or("upstream_error")
}

impl ControlError {
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::NoSuchAction => "no_such_action",
            ControlError::MethodNotAllowed => "method_not_allowed",
            ControlError::BodyTooLarge => "body_too_large",
            ControlError::BadBody => "body_malformed",
            ControlError::UnknownField => "body_unknown_field",
            ControlError::BadId => "bad_resource_id",
            ControlError::BadShape => "bad_parameter",
            ControlError::BadInstanceStorage => "bad_instance_storage",
            ControlError::EncryptionRequired => "encryption_required",
            ControlError::Auth(e) => e.code(),
            ControlError::Replayed => "auth_replayed",
            ControlError::NoSuchInstance => "no_such_instance",
            ControlError::NoSuchVolume => "no_such_volume",
            ControlError::NoSuchSnapshot => "no_such_snapshot",
            ControlError::WrongState => "incorrect_state",
            ControlError::VolumeInUse => "volume_in_use",
            ControlError::NoCapacity => "insufficient_capacity",
            ControlError::NoAttestedHost => "no_attested_host",
            ControlError::IdempotencyMismatch => "idempotency_mismatch",
            ControlError::Kms(c) => c,
            ControlError::Host(c) => c,
            ControlError::Upstream => "upstream_unreachable",
            ControlError::AuditUnavailable => "audit_unavailable",
            ControlError::BadNetwork(e) => match e {
                net::NetError::BadCidr => "bad_cidr",
                net::NetError::HostBits => "cidr_has_host_bits",
                net::NetError::PrefixOutOfRange => "bad_prefix_length",
                net::NetError::BadProtocol => "bad_protocol",
                net::NetError::BadPorts => "bad_port_range",
                net::NetError::BadMac => "bad_mac",
            },
            ControlError::Repo(repo::RepoError::Refused(r)) => r.code(),
            ControlError::Repo(repo::RepoError::Unavailable | repo::RepoError::LeaseLost) => {
                "store_unavailable"
            }
            ControlError::Repo(_) => "store_error",
            ControlError::Internal => "internal_error",
            ControlError::SigV4(e) => e.code().as_str(),
            ControlError::Query(e) => e.code().as_str(),
            ControlError::DryRun => "DryRunOperation",
            ControlError::Unsupported(_) => "unsupported",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ControlError::NoSuchAction
            | ControlError::NoSuchInstance
            | ControlError::NoSuchVolume
            | ControlError::NoSuchSnapshot => 404,
            ControlError::MethodNotAllowed => 405,
            ControlError::BodyTooLarge => 413,
            ControlError::BadBody
            | ControlError::UnknownField
            | ControlError::BadId
            | ControlError::BadShape
            | ControlError::BadInstanceStorage
            | ControlError::EncryptionRequired
            | ControlError::BadNetwork(_) => 400,
            ControlError::Repo(repo::RepoError::Refused(r)) => r.status(),
            ControlError::Auth(_) | ControlError::Replayed => 401,
            ControlError::WrongState
            | ControlError::VolumeInUse
            | ControlError::NoCapacity
            | ControlError::IdempotencyMismatch => 409,
            ControlError::Kms(_) => 403,
            ControlError::Host(_) => 502,
            ControlError::Upstream
            | ControlError::AuditUnavailable
            | ControlError::NoAttestedHost
            | ControlError::Repo(repo::RepoError::Unavailable | repo::RepoError::LeaseLost) => 503,
            ControlError::Repo(_) | ControlError::Internal => 500,
            ControlError::SigV4(e) => e.code().http_status(),
            ControlError::Query(e) => e.code().http_status(),
            ControlError::DryRun => 412,
            ControlError::Unsupported(_) => 400,
        }
    }
}
