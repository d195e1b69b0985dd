//! `bulkhead-controller-proto`: the host controller's HTTP API on the wire, shared by the
//! controller (which parses requests and writes answers) and its callers (the control plane,
//! tools), so every route, field and limit exists once. No I/O.
//!
//! - [`ROUTES`]: every route (method, path template, token operation, body kind). The
//!   controller serves these and no others; a caller builds its path from the same entry.
//! - Request bodies ([`CreateInstanceRequest`], [`AttachVolumeRequest`], …): strict
//!   (`deny_unknown_fields`), decoded only by [`decode_body`] (size, UTF-8, JSON, unknown field,
//!   wrong type: each its own [`RequestError`] code).
//! - Answers ([`HostDescription`], [`InstanceDescription`], [`Ack`], …) and the refusal body
//!   [`ErrorBody`].
//! - [`ControllerCall`]: one call's typed request, tied to its route and its typed answer
//!   ([`calls`]): a caller cannot send a body to another operation's path or read an answer as
//!   another operation's.
//!
//! What the controller checks beyond the shape (identifiers, the `network` object against the
//! net card's own parsers, the sealed key blobs) stays in `bulkhead-controller`'s `api` module,
//! which uses these types and codes.

pub mod calls;

use bulkhead_tokens::Operation;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use calls::{CallArgs, ControllerCall, NoBody, ResponseError, WireResponse};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest artefact one `PUT /v1/host/artefacts/{sha256}` carries (its raw body): a release's
/// binaries, stripped of debug information (`objcopy --strip-debug`) before they are measured
/// and signed: the release build keeps line tables, which make the controller ~90 MB and the
/// block card ~57 MB; stripped they are ~16 MB and ~9 MB (the hypervisor ~4 MB).
pub const MAX_ARTEFACT_BYTES: usize = 64 * 1024 * 1024;
/// Largest `user_data` accepted, in bytes (it ends up on the guest's 2048-byte command line).
pub const MAX_USER_DATA_BYTES: usize = 1024;
/// Most audit records returned by one read.
pub const MAX_AUDIT_PAGE: u32 = 1000;
/// Audit records returned by a read that names no `limit`.
pub const DEFAULT_AUDIT_PAGE: u32 = 100;
/// Most ingress rules on one interface.
pub const MAX_NET_RULES: usize = 64;
/// Most VPC routes on one interface (one request body bounds it further).
pub const MAX_NET_ROUTES: usize = 1024;
/// Longest rule or route text.
pub const MAX_NET_ENTRY_LEN: usize = 64;
/// Largest instance-storage disk one instance may ask for, in GiB.
pub const MAX_INSTANCE_STORAGE_GIB: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Which JSON body a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Drain,
    Attest,
    CreateInstance,
    AttachVolume,
    AttachNetwork,
    NetworkRoutes,
    NetworkRules,
    /// The raw bytes of one release artefact (not JSON), at most [`MAX_ARTEFACT_BYTES`].
    Artefact,
    DeployRelease,
}

/// One entry of the route table.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: Method,
    /// Path template; `{id}` (an instance) and `{volume_id}` are identifier segments.
    pub path: &'static str,
    pub op: Operation,
    pub body: BodyKind,
    pub summary: &'static str,
}

/// Every route the controller serves, each with the call type that a caller sends on it and
/// the answer it gets: one list, expanded into [`ROUTES`] and the [`ControllerCall`] impls.
macro_rules! routes {
    ($($m:ident $p:literal => $op:ident, $body:ident, $s:literal, $call:ident -> $resp:ty;)+) => {
        /// Every route the controller serves. There are no others, and no flag adds any.
        pub const ROUTES: &[RouteSpec] = &[$(RouteSpec {
            method: Method::$m,
            path: $p,
            op: Operation::$op,
            body: BodyKind::$body,
            summary: $s,
        }),+];

        $(impl ControllerCall for calls::$call {
            const OP: Operation = Operation::$op;
            const METHOD: Method = Method::$m;
            const PATH: &'static str = $p;
            type Response = $resp;
        })+
    };
}

routes! {
    Get "/v1/host" => DescribeHost, None, "Describe the host and its free capacity", DescribeHost -> HostDescription;
    Get "/v1/health" => GetHealth, None, "Health of the controller and its audit log", GetHealth -> Health;
    Get "/v1/metrics" => GetMetrics, None, "Prometheus text-format metrics (pull only)", GetMetrics -> MetricsText;
    Get "/v1/audit" => ReadAudit, None, "Audit records after a cursor (pull only)", ReadAudit -> AuditPage;
    Get "/v1/alerts" => ListAlerts, None, "Alerts raised by the monitoring rules", ListAlerts -> AlertList;
    Post "/v1/host/drain" => DrainHost, Drain, "Stop placing new instances on this host", DrainHost -> Ack;
    Put "/v1/host/artefacts/{id}" => UploadArtefact, Artefact, "Store one release artefact under its SHA-256 (the raw request body; the controller checks the digest, so the upload needs no trust). Deployer role only", UploadArtefact -> ArtefactStored;
    Post "/v1/host/releases" => DeployRelease, DeployRelease, "Install a 2-of-3 signed release from uploaded artefacts, self-test its hypervisor, and live-update every running instance's hypervisor to it, and its block and net cards when it carries them (rolled back on any failure; guests never reboot). Deployer role only", DeployRelease -> ReleaseDeployed;
    Post "/v1/host/attest" => AttestHost, Attest, "Quote of the host's measurements over a verifier's nonce (relayed from the attestation agent)", AttestHost -> RelayedEvidence;
    Post "/v1/instances" => CreateInstance, CreateInstance, "Create an instance from an image", CreateInstance -> InstanceDescription;
    Get "/v1/instances/{id}" => DescribeInstance, None, "Describe one instance", DescribeInstance -> InstanceDescription;
    Post "/v1/instances/{id}/start" => StartInstance, None, "Start an instance", StartInstance -> Ack;
    Post "/v1/instances/{id}/stop" => StopInstance, None, "Stop an instance", StopInstance -> Ack;
    Post "/v1/instances/{id}/reboot" => RebootInstance, None, "Reboot an instance", RebootInstance -> Ack;
    Post "/v1/instances/{id}/terminate" => TerminateInstance, None, "Terminate an instance", TerminateInstance -> Ack;
    Post "/v1/instances/{id}/volumes" => AttachVolume, AttachVolume, "Attach a volume with its sealed key", AttachVolume -> Ack;
    Delete "/v1/instances/{id}/volumes/{volume_id}" => DetachVolume, None, "Detach a volume", DetachVolume -> Ack;
    Get "/v1/instances/{id}/console" => GetConsole, None, "Read the instance's console output", GetConsole -> ConsoleOutput;
    Post "/v1/instances/{id}/network" => AttachNetwork, AttachNetwork, "Start the instance's net card with its sealed VPC epoch key and plug it into the VM", AttachNetwork -> NetworkAttached;
    Put "/v1/instances/{id}/network/routes" => SetNetworkRoutes, NetworkRoutes, "Replace the net card's VPC routing table", SetNetworkRoutes -> Ack;
    Put "/v1/instances/{id}/network/rules" => SetNetworkRules, NetworkRules, "Replace the net card's ingress rules", SetNetworkRules -> Ack;
}

/// The route of `op` (every operation of the token vocabulary has exactly one).
pub fn route_of(op: Operation) -> Option<&'static RouteSpec> {
    ROUTES.iter().find(|r| r.op == op)
}

/// Matches `path` against a template; returns the identifier segments in order.
fn match_template<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut ids = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(ids),
            (Some(ts), Some(ps)) if ts.starts_with('{') => ids.push(ps),
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// Finds the route for `method` and `path`; returns it with the path's identifier segments
/// (unchecked: the caller parses them).
pub fn find_route<'p>(
    method: &str,
    path: &'p str,
) -> Result<(&'static RouteSpec, Vec<&'p str>), RequestError> {
    let mut path_matched = false;
    for r in ROUTES {
        if let Some(ids) = match_template(r.path, path) {
            path_matched = true;
            if r.method.as_str() == method {
                return Ok((r, ids));
            }
        }
    }
    if path_matched {
        Err(RequestError::MethodNotAllowed)
    } else {
        Err(RequestError::NoSuchRoute)
    }
}

/// The resources a call touches, as the token's resource patterns name them: `host` for the
/// operator plane (with the instance a quote is bound to), else the instance and the volume.
pub fn resources(op: Operation, instance: Option<&str>, volume: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if op.plane() == bulkhead_tokens::ops::Plane::Operator {
        out.push("host".to_string());
    }
    if let Some(i) = instance {
        out.push(format!("instance:{i}"));
    }
    if let Some(v) = volume {
        out.push(format!("volume:{v}"));
    }
    out
}

// ---- request bodies ------------------------------------------------------------------------

/// Body of `POST /v1/host/drain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Why (kept in the audit log's parameter digest, never interpreted).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Body of `POST /v1/host/attest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The verifier's one-time nonce: 32 bytes, hex.
    pub nonce: String,
    /// Bind the quote to this instance (qualifying data = SHA-256(nonce || instance_id)). The
    /// controller quotes only if the instance runs on this host; the token must also grant
    /// `instance:<id>`. Used by the control plane before the KMS releases a volume key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// A credential (TPM2_MakeCredential for the AK the verifier is enrolling) for the host's
    /// TPM to activate before it quotes; the secret comes back in the evidence. Sealed hosts'
    /// agents answer it; process hosts' agents refuse it (they are endorsed at provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub credential: Option<bulkhead_rot_proto::CredentialChallenge>,
}

/// Body of `POST /v1/host/releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployReleaseRequest {
    /// The signed release (`bulkhead-rot`'s `SignedRelease` JSON: the manifest text exactly as
    /// signed and its signatures), verified by the controller against its pinned trust root.
    pub release: String,
}

/// Body of `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceRequest {
    pub instance_id: String,
    /// Image identifier, resolved by the hypervisor side; never a path.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Optional script the guest runs at boot (the test guest's `bulkhead.run=`), at most
    /// 1024 bytes. Customer data: passed to the customer's own guest, never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// The instance's VPC interface. The instance is created with it but has no net card until
    /// `POST /v1/instances/{id}/network` brings its sealed key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Instance storage: a local ephemeral disk of this many GiB
    /// (1..=[`MAX_INSTANCE_STORAGE_GIB`]), served by a block card whose key is made inside the
    /// card and never leaves it; crypto-erased (card detached, file deleted) at Stop and
    /// Terminate. It is the guest's first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_storage_gib: Option<u32>,
}

/// The `network` object of `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// The VPC number (as in the net cards' encapsulation header), 1 or more.
    pub vpc: u32,
    /// This interface's card id within the VPC.
    pub card_id: u32,
    /// The guest's MAC: unicast, not all zero.
    pub mac: String,
    /// The guest's private IPv4 address, inside `ip/prefix` (not its network or broadcast
    /// address).
    pub ip: String,
    /// Subnet prefix length, 8..=30.
    pub prefix: u8,
    /// The subnet gateway (the card answers for it). Default: the subnet's first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// MTU offered to the guest by DHCP, 576..=9000 (default 1400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Ingress rules, `tcp|udp:PORT[-PORT]:CIDR` or `icmp|all:CIDR`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// VPC routes, `IP=CARD@HOST:PORT`.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// Body of `POST /v1/instances/{id}/network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachNetworkRequest {
    /// The key epoch the sealed key is for (1 or more).
    pub epoch: u32,
    /// The VPC epoch key sealed to this host's key (the KMS's `SealVpcKey` blob), hex. The
    /// controller never opens it; only the net card can.
    pub sealed_epoch_key: String,
}

/// Body of `PUT /v1/instances/{id}/network/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRoutesRequest {
    pub routes: Vec<String>,
}

/// Body of `PUT /v1/instances/{id}/network/rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRulesRequest {
    pub allow: Vec<String>,
}

/// Body of `POST /v1/instances/{id}/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    pub volume_id: String,
    /// The volume's data key sealed to this host's block card: exactly one sealed blob
    /// (`bulkhead_sealing::SealedBlob`, 126 bytes), base64; anything else is refused as
    /// `bad_sealed_key`. The controller never opens it.
    pub sealed_key: String,
    /// Set for a network volume: the storage node that serves its ciphertext. Unset: the
    /// volume is a file in this host's volume directory (embedded mode without storage nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<VolumeStorageRequest>,
}

/// Where a network volume's ciphertext is served, as the control plane placed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeStorageRequest {
    /// The storage node's certificate name (CN, role `service`): the card accepts no other.
    pub node: String,
    /// `IP:PORT` of the node's NBD-over-TLS listener.
    pub nbd_addr: String,
}

// ---- answers -------------------------------------------------------------------------------

/// Answer of `PUT /v1/host/artefacts/{sha256}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArtefactStored {
    pub sha256: String,
    pub size: u64,
}

/// One instance's hypervisor moved to a release's binary by a live update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HypervisorMoved {
    pub instance_id: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The guest's pause as the hypervisors measured it.
    pub pause_us: u64,
}

/// Answer of `POST /v1/host/releases`: the release is installed and active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseDeployed {
    pub request_id: String,
    pub version: u64,
    /// The hypervisor binary new instances start and running ones now run.
    pub hypervisor: String,
    pub moved: Vec<HypervisorMoved>,
    /// Block cards moved to the release's `bulkhead-blockcard` by a card update (empty when the
    /// release carries no block card).
    #[serde(default)]
    pub cards: Vec<CardMoved>,
    /// Net cards moved to the release's `bulkhead-netcard` (empty when the release carries no
    /// net card).
    #[serde(default)]
    pub net_cards: Vec<NetCardMoved>,
    /// The release whose controller the host's supervisor starts next: present when the
    /// release carries `bulkhead-controller`. After this answer the controller audits
    /// `DeployRelease:controller-restart` and exits; the supervisor verifies the release
    /// itself and starts its controller (or the original binary), which adopts every instance.
    #[serde(default)]
    pub controller_restart: Option<u64>,
}

/// One attached volume's block card replaced by a release's card under the running guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CardMoved {
    pub instance_id: String,
    pub volume_id: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The volume state (key included) handed from the old card to the new one, the new card
    /// keyed and locked down: the old card's `HandOver` round trip.
    pub handover_us: u64,
    /// The hypervisor's `ReplaceBlock` (the guest's I/O is stopped for at most this).
    pub replace_us: u64,
}

/// One instance's net card replaced by a release's card under the running guest: the old card
/// stopped (SIGTERM: it wipes its key), the new one started on the same port with the same
/// sealed key and sequence floor, and the guest's NIC reconnected to it in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetCardMoved {
    pub instance_id: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// From the old card's stop to the NIC reconnected (the guest's network is down for this).
    pub gap_us: u64,
}

/// A running net card and the release whose binary it runs (`None`: the configured binary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetCardRelease {
    pub instance_id: String,
    pub pid: u32,
    #[serde(default)]
    pub release: Option<u64>,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostDescription {
    pub host_id: String,
    pub controller_version: String,
    /// Which instance backend this controller drives: `host` (real hypervisor and block card
    /// processes) or `detached` (explicit fallback: no guest kernel configured, nothing runs).
    pub backend: String,
    pub draining: bool,
    pub vcpus_total: u32,
    pub vcpus_free: u32,
    pub memory_mib_total: u64,
    pub memory_mib_free: u64,
    pub instances: u32,
    /// The audit log's durable head: the control plane anchors each pull to it.
    #[schema(value_type = Object)]
    pub audit_head: bulkhead_audit::Head,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub audit_records: u64,
    pub audit_writable: bool,
    pub alerts: u64,
    /// The audit log's durable head (last record, its hash, last checkpoint number): what a
    /// puller anchors its next pull to, so a cut or rewritten history shows.
    #[schema(value_type = Object)]
    pub audit_head: bulkhead_audit::Head,
    /// The host's active release (DeployRelease), if any.
    #[serde(default)]
    pub release: Option<u64>,
    /// The release whose controller binary answers (`None`: the binary the controller was
    /// started with).
    #[serde(default)]
    pub controller_release: Option<u64>,
    /// Every running net card and the release it runs.
    #[serde(default)]
    pub net_cards: Vec<NetCardRelease>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Created,
    Running,
    Stopped,
    Terminated,
}

/// One instance, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceDescription {
    pub instance_id: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub state: InstanceState,
    pub volumes: Vec<String>,
    /// Size of the instance-storage disk, if the instance has one (it is empty after every
    /// Start that follows a Stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_storage_gib: Option<u32>,
    /// The net card's UDP endpoint (`HOSTIP:PORT`) once the interface is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_endpoint: Option<String>,
}

/// `GET /v1/instances/{id}/console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub output: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Raw record lines (each a JSON object, hash-chained).
    pub records: Vec<String>,
    /// Pass as `after` to read on.
    pub next_after: u64,
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: u64,
    pub rule: String,
    pub subject: String,
    pub detail: String,
    pub time: u64,
}

/// `GET /v1/alerts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
}

/// Result of an action without other output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ack {
    pub request_id: String,
    pub status: String,
}

/// `POST /v1/instances/{id}/network`: where the interface's net card receives its VPC peers'
/// datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAttached {
    pub request_id: String,
    /// `HOSTIP:PORT`.
    pub net_endpoint: String,
}

/// `POST /v1/host/attest`: the attestation agent's evidence, relayed unmodified (the
/// controller neither makes nor checks the quote; the verifier does, with `bulkhead-rot`). The
/// shape is the root of trust's one wire type, so a malformed answer stops at the first parser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelayedEvidence(pub bulkhead_rot_proto::HostEvidence);

/// `GET /v1/metrics`: Prometheus text format (not JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsText(pub String);

/// Every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `token_expired`.
    pub code: String,
    pub message: String,
    pub request_id: String,
}

impl ErrorBody {
    /// The refusal in a non-2xx answer, if it is one. Read leniently: only `error.code` is
    /// needed (a refusal written before the controller's handler ran, or by an older
    /// controller, may lack the others).
    pub fn decode(body: &[u8]) -> Option<ErrorBody> {
        #[derive(Deserialize)]
        struct Lenient {
            error: LenientDetail,
        }
        #[derive(Deserialize)]
        struct LenientDetail {
            code: String,
            #[serde(default)]
            message: String,
            #[serde(default)]
            request_id: String,
        }
        let l: Lenient = serde_json::from_slice(body).ok()?;
        Some(ErrorBody {
            error: ErrorDetail {
                code: l.error.code,
                message: l.error.message,
                request_id: l.error.request_id,
            },
        })
    }
}

// ---- request-level refusals ----------------------------------------------------------------

/// Which part of a `network` request is wrong (each has its own code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkField {
    Vpc,
    Mac,
    Ip,
    Gateway,
    Mtu,
    Rule,
    Route,
    Epoch,
    SealedKey,
}

/// Why a request was not understood. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no such route")]
    NoSuchRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("request body is not valid UTF-8")]
    NotUtf8,
    #[error("request body is not valid JSON")]
    Malformed,
    #[error("request body has an unknown field")]
    UnknownField,
    #[error("request body has a missing field or a value of the wrong type")]
    Invalid,
    #[error("this route takes no body")]
    UnexpectedBody,
    #[error("bad instance or volume identifier")]
    BadId,
    #[error("bad query string")]
    BadQuery,
    #[error("sealed key is not valid base64 or is too large")]
    BadSealedKey,
    #[error("bad network {0:?}")]
    BadNetwork(NetworkField),
    #[error("bad storage node name or address")]
    BadStorage,
    #[error("instance_storage_gib must be 1..={MAX_INSTANCE_STORAGE_GIB}")]
    BadInstanceStorage,
}

impl RequestError {
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::NoSuchRoute => "no_such_route",
            RequestError::MethodNotAllowed => "method_not_allowed",
            RequestError::BodyTooLarge => "body_too_large",
            RequestError::NotUtf8 => "body_not_utf8",
            RequestError::Malformed => "body_malformed",
            RequestError::UnknownField => "body_unknown_field",
            RequestError::Invalid => "body_invalid",
            RequestError::UnexpectedBody => "body_unexpected",
            RequestError::BadId => "bad_resource_id",
            RequestError::BadQuery => "bad_query",
            RequestError::BadSealedKey => "bad_sealed_key",
            RequestError::BadStorage => "bad_storage",
            RequestError::BadInstanceStorage => "bad_instance_storage",
            RequestError::BadNetwork(f) => match f {
                NetworkField::Vpc => "bad_network_vpc",
                NetworkField::Mac => "bad_network_mac",
                NetworkField::Ip => "bad_network_ip",
                NetworkField::Gateway => "bad_network_gateway",
                NetworkField::Mtu => "bad_network_mtu",
                NetworkField::Rule => "bad_network_rule",
                NetworkField::Route => "bad_network_route",
                NetworkField::Epoch => "bad_network_epoch",
                NetworkField::SealedKey => "bad_sealed_epoch_key",
            },
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            RequestError::NoSuchRoute => 404,
            RequestError::MethodNotAllowed => 405,
            RequestError::BodyTooLarge => 413,
            _ => 400,
        }
    }
}

/// Decodes one request body: at most [`MAX_BODY_BYTES`], UTF-8, JSON, of type `T` (whose
/// unknown fields are refused). Each failure has its own code.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(RequestError::BodyTooLarge);
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data if e.to_string().starts_with("unknown field") => {
            RequestError::UnknownField
        }
        serde_json::error::Category::Data => RequestError::Invalid,
        _ => RequestError::Malformed,
    })
}

/// The query of `GET /v1/audit`: `after=N&limit=M` (both optional; limit
/// 1..=[`MAX_AUDIT_PAGE`], default [`DEFAULT_AUDIT_PAGE`]); nothing else.
pub fn parse_audit_query(query: Option<&str>) -> Result<(u64, u32), RequestError> {
    let mut after = 0u64;
    let mut limit = DEFAULT_AUDIT_PAGE;
    for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(RequestError::BadQuery)?;
        match k {
            "after" => after = v.parse().map_err(|_| RequestError::BadQuery)?,
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_AUDIT_PAGE).contains(l))
                    .ok_or(RequestError::BadQuery)?
            }
            _ => return Err(RequestError::BadQuery),
        }
    }
    Ok((after, limit))
}

/// An instance-storage size that passed its check (1..=[`MAX_INSTANCE_STORAGE_GIB`] GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstanceStorageGib(u32);

impl InstanceStorageGib {
    pub fn new(gib: u32) -> Result<Self, RequestError> {
        if (1..=MAX_INSTANCE_STORAGE_GIB).contains(&gib) {
            Ok(InstanceStorageGib(gib))
        } else {
            Err(RequestError::BadInstanceStorage)
        }
    }
    pub fn get(self) -> u32 {
        self.0
    }
    /// The disk's size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0) << 30
    }
}

/// Fuzz entry point: routes `data` (first byte picks the route) and decodes the rest as that
/// route's body and as each answer type; a body that decodes must encode and decode back to
/// itself. Never panics on any input.
pub fn fuzz_body(data: &[u8]) {
    fn round<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(body: &[u8]) {
        if let Ok(v) = decode_body::<T>(body) {
            let again = serde_json::to_vec(&v).unwrap_or_default();
            let back = decode_body::<T>(&again);
            assert_eq!(
                back.as_ref().ok(),
                Some(&v),
                "a decoded body must round-trip"
            );
        }
    }
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 12 {
        0 => {
            round::<DrainRequest>(body);
            round::<DeployReleaseRequest>(body);
        }
        1 => round::<AttestRequest>(body),
        2 => round::<CreateInstanceRequest>(body),
        3 => round::<AttachVolumeRequest>(body),
        4 => round::<AttachNetworkRequest>(body),
        5 => round::<NetworkRoutesRequest>(body),
        6 => round::<NetworkRulesRequest>(body),
        7 => {
            let _ = parse_audit_query(std::str::from_utf8(body).ok());
        }
        8 => {
            let _ = HostDescription::decode(body);
            let _ = InstanceDescription::decode(body);
        }
        9 => {
            let _ = AuditPage::decode(body);
            let _ = ErrorBody::decode(body);
        }
        10 => {
            let _ = Ack::decode(body);
            let _ = NetworkAttached::decode(body);
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(body) {
                let (method, path) = text.split_once(' ').unwrap_or(("GET", text));
                let _ = find_route(method, path);
            }
        }
    }
}

#[cfg(test)]
mod tests;
