//! The controller's whole API: the route table and the one parser that turns an HTTP request
//! (method, path, query, body bytes) into a typed [`ApiRequest`]. Handlers never see raw bytes.
//!
//! [`ROUTES`] *is* the router: the HTTP server sends every request to [`ApiRequest::parse`],
//! which matches only these entries. Anything else is `no_such_route`.

use base64::Engine as _;
use bulkhead_tokens::ops::valid_resource_id;
use bulkhead_tokens::Operation;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest `user_data` accepted, in bytes (it ends up on the guest's 2048-byte command line).
pub const MAX_USER_DATA_BYTES: usize = 1024;
/// Largest sealed key blob accepted (decoded).
pub const MAX_SEALED_KEY_BYTES: usize = 4096;
/// Most audit records returned by one read.
pub const MAX_AUDIT_PAGE: u32 = 1000;
/// Most ingress rules on one interface.
pub const MAX_NET_RULES: usize = 64;
/// Most VPC routes on one interface (one request body bounds it further).
pub const MAX_NET_ROUTES: usize = 1024;
/// Longest rule or route text.
const MAX_NET_ENTRY_LEN: usize = 64;

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
}

/// One entry of the route table.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: Method,
    /// Path template; `{id}` and `{volume_id}` are identifier segments.
    pub path: &'static str,
    pub op: Operation,
    pub body: BodyKind,
    pub summary: &'static str,
}

macro_rules! route {
    ($m:ident $p:literal => $op:ident, $body:ident, $s:literal) => {
        RouteSpec {
            method: Method::$m,
            path: $p,
            op: Operation::$op,
            body: BodyKind::$body,
            summary: $s,
        }
    };
}

/// Every route the controller serves. There are no others, and no flag adds any.
pub const ROUTES: &[RouteSpec] = &[
    route!(Get "/v1/host" => DescribeHost, None, "Describe the host and its free capacity"),
    route!(Get "/v1/health" => GetHealth, None, "Health of the controller and its audit log"),
    route!(Get "/v1/metrics" => GetMetrics, None, "Prometheus text-format metrics (pull only)"),
    route!(Get "/v1/audit" => ReadAudit, None, "Audit records after a cursor (pull only)"),
    route!(Get "/v1/alerts" => ListAlerts, None, "Alerts raised by the monitoring rules"),
    route!(Post "/v1/host/drain" => DrainHost, Drain, "Stop placing new instances on this host"),
    route!(Post "/v1/host/attest" => AttestHost, Attest, "Quote of the host's measurements over a verifier's nonce (relayed from the attestation agent)"),
    route!(Post "/v1/instances" => CreateInstance, CreateInstance, "Create an instance from an image"),
    route!(Get "/v1/instances/{id}" => DescribeInstance, None, "Describe one instance"),
    route!(Post "/v1/instances/{id}/start" => StartInstance, None, "Start an instance"),
    route!(Post "/v1/instances/{id}/stop" => StopInstance, None, "Stop an instance"),
    route!(Post "/v1/instances/{id}/reboot" => RebootInstance, None, "Reboot an instance"),
    route!(Post "/v1/instances/{id}/terminate" => TerminateInstance, None, "Terminate an instance"),
    route!(Post "/v1/instances/{id}/volumes" => AttachVolume, AttachVolume, "Attach a volume with its sealed key"),
    route!(Delete "/v1/instances/{id}/volumes/{volume_id}" => DetachVolume, None, "Detach a volume"),
    route!(Get "/v1/instances/{id}/console" => GetConsole, None, "Read the instance's console output"),
    route!(Post "/v1/instances/{id}/network" => AttachNetwork, AttachNetwork, "Start the instance's net card with its sealed VPC epoch key and plug it into the VM"),
    route!(Put "/v1/instances/{id}/network/routes" => SetNetworkRoutes, NetworkRoutes, "Replace the net card's VPC routing table"),
    route!(Put "/v1/instances/{id}/network/rules" => SetNetworkRules, NetworkRules, "Replace the net card's ingress rules"),
];

/// Body of `POST /v1/host/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    #[serde(default)]
    pub user_data: Option<String>,
    /// The instance's VPC interface. The instance is created with it but has no net card until
    /// `POST /v1/instances/{id}/network` brings its sealed key.
    #[serde(default)]
    pub network: Option<NetworkRequest>,
    /// Instance storage: a local ephemeral disk of this many GiB
    /// (1..=[`MAX_INSTANCE_STORAGE_GIB`]), served by a block card whose key is made inside the
    /// card and never leaves it; crypto-erased (card detached, file deleted) at Stop and
    /// Terminate. It is the guest's first disk.
    #[serde(default)]
    pub instance_storage_gib: Option<u32>,
}

/// Largest instance-storage disk one instance may ask for, in GiB.
pub const MAX_INSTANCE_STORAGE_GIB: u32 = 64;

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
    #[serde(default)]
    pub gateway: Option<String>,
    /// MTU offered to the guest by DHCP, 576..=9000 (default 1400).
    #[serde(default)]
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

/// `POST /v1/instances/{id}/network`: where the interface's net card receives its VPC peers'
/// datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAttached {
    pub request_id: String,
    /// `HOSTIP:PORT`.
    pub net_endpoint: String,
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

/// A checked VPC interface: every field parsed by the net card's own parsers, so a card never
/// gets a configuration it would refuse. Rules and routes are kept as their (checked) text: it
/// is what the card's command line and control socket take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub vpc: u32,
    pub card_id: u32,
    pub mac: bulkhead_netcard::frame::MacAddr,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u16,
    pub allow: Vec<String>,
    pub routes: Vec<String>,
}

/// Checks ingress rules with the card's parser.
pub fn check_rules(allow: &[String]) -> Result<(), RequestError> {
    if allow.len() > MAX_NET_RULES
        || allow.iter().any(|r| {
            r.len() > MAX_NET_ENTRY_LEN
                || bulkhead_netcard::secgroup::IngressRule::parse_text(r).is_err()
        })
    {
        return Err(RequestError::BadNetwork(NetworkField::Rule));
    }
    Ok(())
}

/// Checks VPC routes with the card's parser (as one table: no address twice, no card at two
/// host addresses, not a route to `local`).
pub fn check_routes(routes: &[String], local: u32) -> Result<(), RequestError> {
    if routes.len() > MAX_NET_ROUTES {
        return Err(RequestError::BadNetwork(NetworkField::Route));
    }
    let mut table = bulkhead_netcard::routes::RouteTable::new();
    for r in routes {
        if r.len() > MAX_NET_ENTRY_LEN
            || table
                .add_text(bulkhead_netcard::encap::CardId(local), r)
                .is_err()
        {
            return Err(RequestError::BadNetwork(NetworkField::Route));
        }
    }
    Ok(())
}

impl NetworkSpec {
    pub fn parse(r: NetworkRequest) -> Result<NetworkSpec, RequestError> {
        let bad = RequestError::BadNetwork;
        if r.vpc == 0 {
            return Err(bad(NetworkField::Vpc));
        }
        let mac = bulkhead_netcard::frame::MacAddr::parse_text(&r.mac)
            .ok()
            .filter(|m| m.0[0] & 1 == 0 && m.0 != [0; 6])
            .ok_or(bad(NetworkField::Mac))?;
        if !(8..=30).contains(&r.prefix) {
            return Err(bad(NetworkField::Ip));
        }
        let ip: std::net::Ipv4Addr = r.ip.parse().map_err(|_| bad(NetworkField::Ip))?;
        let mask = u32::MAX << (32 - u32::from(r.prefix));
        let net = u32::from(ip) & mask;
        let host_part = u32::from(ip) & !mask;
        if host_part == 0 || host_part == !mask {
            return Err(bad(NetworkField::Ip));
        }
        let gateway = match &r.gateway {
            Some(g) => g.parse().map_err(|_| bad(NetworkField::Gateway))?,
            None => std::net::Ipv4Addr::from(net.wrapping_add(1)),
        };
        let gw_host = u32::from(gateway) & !mask;
        if u32::from(gateway) & mask != net || gateway == ip || gw_host == 0 || gw_host == !mask {
            return Err(bad(NetworkField::Gateway));
        }
        let mtu = r.mtu.unwrap_or(1400);
        if !(576..=9000).contains(&mtu) {
            return Err(bad(NetworkField::Mtu));
        }
        check_rules(&r.allow)?;
        check_routes(&r.routes, r.card_id)?;
        Ok(NetworkSpec {
            vpc: r.vpc,
            card_id: r.card_id,
            mac,
            ip,
            prefix: r.prefix,
            gateway,
            mtu,
            allow: r.allow,
            routes: r.routes,
        })
    }
}

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

/// Body of `POST /v1/instances/{id}/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    pub volume_id: String,
    /// The volume's data key sealed to this host's block card, base64. The controller never
    /// opens it.
    pub sealed_key: String,
    /// Set for a network volume: the storage node that serves its ciphertext. Unset: the
    /// volume is a file in this host's volume directory (embedded mode without storage nodes).
    #[serde(default)]
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

/// A checked [`VolumeStorageRequest`]: the card connects to `addr`, pins `node`, and opens the
/// export named by the volume id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkVolume {
    pub node: String,
    pub addr: std::net::SocketAddr,
    pub export: String,
}

/// Sealed key bytes, opaque to the controller.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKeyBlob(pub Vec<u8>);

impl std::fmt::Debug for SealedKeyBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedKeyBlob({} bytes)", self.0.len())
    }
}

/// Identifier of an instance or volume: 1-64 of `A-Za-z0-9-_.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(s: &str) -> Result<Self, RequestError> {
        if valid_resource_id(s) {
            Ok(ResourceId(s.to_string()))
        } else {
            Err(RequestError::BadId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    DescribeHost,
    GetHealth,
    GetMetrics,
    ReadAudit {
        after: u64,
        limit: u32,
    },
    ListAlerts,
    DrainHost,
    AttestHost {
        nonce: [u8; 32],
        /// The instance the quote is bound to, which must run on this host.
        instance: Option<ResourceId>,
    },
    CreateInstance {
        id: ResourceId,
        image: String,
        vcpus: u32,
        memory_mib: u32,
        user_data: Option<String>,
        network: Option<NetworkSpec>,
        instance_storage: Option<InstanceStorageGib>,
    },
    DescribeInstance(ResourceId),
    StartInstance(ResourceId),
    StopInstance(ResourceId),
    RebootInstance(ResourceId),
    TerminateInstance(ResourceId),
    AttachVolume {
        id: ResourceId,
        volume: ResourceId,
        sealed_key: SealedKeyBlob,
        storage: Option<NetworkVolume>,
    },
    DetachVolume {
        id: ResourceId,
        volume: ResourceId,
    },
    GetConsole(ResourceId),
    AttachNetwork {
        id: ResourceId,
        epoch: u32,
        sealed_key: SealedKeyBlob,
    },
    SetNetworkRoutes {
        id: ResourceId,
        routes: Vec<String>,
    },
    SetNetworkRules {
        id: ResourceId,
        allow: Vec<String>,
    },
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

/// Finds the route for `method` and `path`.
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

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, RequestError> {
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data if e.to_string().starts_with("unknown field") => {
            RequestError::UnknownField
        }
        serde_json::error::Category::Data => RequestError::Invalid,
        _ => RequestError::Malformed,
    })
}

fn parse_audit_query(query: Option<&str>) -> Result<(u64, u32), RequestError> {
    let mut after = 0u64;
    let mut limit = 100u32;
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

fn id_at(ids: &[&str], i: usize) -> Result<ResourceId, RequestError> {
    ResourceId::parse(ids.get(i).copied().ok_or(RequestError::BadId)?)
}

impl ApiRequest {
    /// The one parser of the controller's HTTP boundary.
    pub fn parse(
        method: &str,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<ApiRequest, RequestError> {
        let (route, ids) = find_route(method, path)?;
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::BodyTooLarge);
        }
        if route.body == BodyKind::None && !body.is_empty() {
            return Err(RequestError::UnexpectedBody);
        }
        if route.op != Operation::ReadAudit && query.is_some_and(|q| !q.is_empty()) {
            return Err(RequestError::BadQuery);
        }
        let id = || id_at(&ids, 0);
        Ok(match route.op {
            Operation::DescribeHost => ApiRequest::DescribeHost,
            Operation::GetHealth => ApiRequest::GetHealth,
            Operation::GetMetrics => ApiRequest::GetMetrics,
            Operation::ReadAudit => {
                let (after, limit) = parse_audit_query(query)?;
                ApiRequest::ReadAudit { after, limit }
            }
            Operation::ListAlerts => ApiRequest::ListAlerts,
            Operation::DrainHost => {
                let _: DrainRequest = json(body)?;
                ApiRequest::DrainHost
            }
            Operation::AttestHost => {
                let r: AttestRequest = json(body)?;
                let nonce = hex::decode(&r.nonce)
                    .ok()
                    .and_then(|n| <[u8; 32]>::try_from(n).ok())
                    .ok_or(RequestError::Invalid)?;
                let instance = r
                    .instance_id
                    .as_deref()
                    .map(ResourceId::parse)
                    .transpose()?;
                ApiRequest::AttestHost { nonce, instance }
            }
            Operation::CreateInstance => {
                let r: CreateInstanceRequest = json(body)?;
                if r.image.is_empty()
                    || r.image.len() > 128
                    || !r
                        .image
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                    || !(1..=64).contains(&r.vcpus)
                    || !(64..=1024 * 1024).contains(&r.memory_mib)
                    || r.user_data
                        .as_ref()
                        .is_some_and(|u| u.is_empty() || u.len() > MAX_USER_DATA_BYTES)
                {
                    return Err(RequestError::Invalid);
                }
                ApiRequest::CreateInstance {
                    id: ResourceId::parse(&r.instance_id)?,
                    image: r.image,
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    user_data: r.user_data,
                    network: r.network.map(NetworkSpec::parse).transpose()?,
                    instance_storage: r
                        .instance_storage_gib
                        .map(InstanceStorageGib::new)
                        .transpose()?,
                }
            }
            Operation::DescribeInstance => ApiRequest::DescribeInstance(id()?),
            Operation::StartInstance => ApiRequest::StartInstance(id()?),
            Operation::StopInstance => ApiRequest::StopInstance(id()?),
            Operation::RebootInstance => ApiRequest::RebootInstance(id()?),
            Operation::TerminateInstance => ApiRequest::TerminateInstance(id()?),
            Operation::AttachVolume => {
                let r: AttachVolumeRequest = json(body)?;
                if r.sealed_key.len() > MAX_SEALED_KEY_BYTES * 2 {
                    return Err(RequestError::BadSealedKey);
                }
                let blob = base64::engine::general_purpose::STANDARD
                    .decode(r.sealed_key.as_bytes())
                    .ok()
                    .filter(|b| !b.is_empty() && b.len() <= MAX_SEALED_KEY_BYTES)
                    .ok_or(RequestError::BadSealedKey)?;
                let volume = ResourceId::parse(&r.volume_id)?;
                let storage = match r.storage {
                    None => None,
                    Some(s) => {
                        if !bulkhead_tokens::pki::valid_name(&s.node) {
                            return Err(RequestError::BadStorage);
                        }
                        let addr: std::net::SocketAddr =
                            s.nbd_addr.parse().map_err(|_| RequestError::BadStorage)?;
                        if addr.port() == 0 {
                            return Err(RequestError::BadStorage);
                        }
                        Some(NetworkVolume {
                            node: s.node,
                            addr,
                            export: volume.to_string(),
                        })
                    }
                };
                ApiRequest::AttachVolume {
                    id: id()?,
                    volume,
                    sealed_key: SealedKeyBlob(blob),
                    storage,
                }
            }
            Operation::DetachVolume => ApiRequest::DetachVolume {
                id: id()?,
                volume: id_at(&ids, 1)?,
            },
            Operation::GetConsole => ApiRequest::GetConsole(id()?),
            Operation::AttachNetwork => {
                let r: AttachNetworkRequest = json(body)?;
                if r.epoch == 0 {
                    return Err(RequestError::BadNetwork(NetworkField::Epoch));
                }
                let blob = hex::decode(&r.sealed_epoch_key)
                    .ok()
                    .filter(|b| b.len() == bulkhead_sealing::SEALED_BLOB_LEN)
                    .ok_or(RequestError::BadNetwork(NetworkField::SealedKey))?;
                ApiRequest::AttachNetwork {
                    id: id()?,
                    epoch: r.epoch,
                    sealed_key: SealedKeyBlob(blob),
                }
            }
            Operation::SetNetworkRoutes => {
                let r: NetworkRoutesRequest = json(body)?;
                // The card checks the table against its own card id too.
                check_routes(&r.routes, u32::MAX)?;
                ApiRequest::SetNetworkRoutes {
                    id: id()?,
                    routes: r.routes,
                }
            }
            Operation::SetNetworkRules => {
                let r: NetworkRulesRequest = json(body)?;
                check_rules(&r.allow)?;
                ApiRequest::SetNetworkRules {
                    id: id()?,
                    allow: r.allow,
                }
            }
        })
    }

    pub fn operation(&self) -> Operation {
        match self {
            ApiRequest::DescribeHost => Operation::DescribeHost,
            ApiRequest::GetHealth => Operation::GetHealth,
            ApiRequest::GetMetrics => Operation::GetMetrics,
            ApiRequest::ReadAudit { .. } => Operation::ReadAudit,
            ApiRequest::ListAlerts => Operation::ListAlerts,
            ApiRequest::DrainHost => Operation::DrainHost,
            ApiRequest::AttestHost { .. } => Operation::AttestHost,
            ApiRequest::CreateInstance { .. } => Operation::CreateInstance,
            ApiRequest::DescribeInstance(_) => Operation::DescribeInstance,
            ApiRequest::StartInstance(_) => Operation::StartInstance,
            ApiRequest::StopInstance(_) => Operation::StopInstance,
            ApiRequest::RebootInstance(_) => Operation::RebootInstance,
            ApiRequest::TerminateInstance(_) => Operation::TerminateInstance,
            ApiRequest::AttachVolume { .. } => Operation::AttachVolume,
            ApiRequest::DetachVolume { .. } => Operation::DetachVolume,
            ApiRequest::GetConsole(_) => Operation::GetConsole,
            ApiRequest::AttachNetwork { .. } => Operation::AttachNetwork,
            ApiRequest::SetNetworkRoutes { .. } => Operation::SetNetworkRoutes,
            ApiRequest::SetNetworkRules { .. } => Operation::SetNetworkRules,
        }
    }

    /// The concrete resources the request touches, as the token's resource patterns name them.
    pub fn resources(&self) -> Vec<String> {
        let inst = |id: &ResourceId| format!("instance:{id}");
        match self {
            ApiRequest::DescribeHost
            | ApiRequest::GetHealth
            | ApiRequest::GetMetrics
            | ApiRequest::ReadAudit { .. }
            | ApiRequest::ListAlerts
            | ApiRequest::DrainHost
            | ApiRequest::AttestHost { instance: None, .. } => vec!["host".to_string()],
            ApiRequest::AttestHost {
                instance: Some(id), ..
            } => vec!["host".to_string(), inst(id)],
            ApiRequest::CreateInstance { id, .. }
            | ApiRequest::DescribeInstance(id)
            | ApiRequest::StartInstance(id)
            | ApiRequest::StopInstance(id)
            | ApiRequest::RebootInstance(id)
            | ApiRequest::TerminateInstance(id)
            | ApiRequest::GetConsole(id)
            | ApiRequest::AttachNetwork { id, .. }
            | ApiRequest::SetNetworkRoutes { id, .. }
            | ApiRequest::SetNetworkRules { id, .. } => vec![inst(id)],
            ApiRequest::AttachVolume { id, volume, .. }
            | ApiRequest::DetachVolume { id, volume } => {
                vec![inst(id), format!("volume:{volume}")]
            }
        }
    }
}

/// `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub audit_records: u64,
    pub audit_writable: bool,
    pub alerts: u64,
    /// The audit log's durable head (last record, its hash, last checkpoint number): what a
    /// puller anchors its next pull to, so a cut or rewritten history shows.
    #[schema(value_type = Object)]
    pub audit_head: bulkhead_audit::Head,
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub output: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Raw record lines (each a JSON object, hash-chained).
    pub records: Vec<String>,
    /// Pass as `after` to read on.
    pub next_after: u64,
}

/// One alert.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: u64,
    pub rule: String,
    pub subject: String,
    pub detail: String,
    pub time: u64,
}

/// `GET /v1/alerts`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
}

/// Result of an action without other output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ack {
    pub request_id: String,
    pub status: String,
}

/// Every refusal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `token_expired`.
    pub code: String,
    pub message: String,
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_each_route() {
        assert_eq!(
            ApiRequest::parse("GET", "/v1/host", None, b"").unwrap(),
            ApiRequest::DescribeHost
        );
        let r = ApiRequest::parse("POST", "/v1/instances/i-1/reboot", None, b"").unwrap();
        assert_eq!(r.resources(), vec!["instance:i-1".to_string()]);
        let body = br#"{"volume_id":"v-1","sealed_key":"AAEC"}"#;
        let r = ApiRequest::parse("POST", "/v1/instances/i-1/volumes", None, body).unwrap();
        assert_eq!(r.operation(), Operation::AttachVolume);
        let r = ApiRequest::parse("GET", "/v1/audit", Some("after=5&limit=10"), b"").unwrap();
        assert_eq!(
            r,
            ApiRequest::ReadAudit {
                after: 5,
                limit: 10
            }
        );
    }

    #[test]
    fn refuses_bad_input_with_codes() {
        let p =
            |m: &str, path: &str, b: &[u8]| ApiRequest::parse(m, path, None, b).unwrap_err().code();
        assert_eq!(p("GET", "/v1/exec", b""), "no_such_route");
        assert_eq!(p("GET", "/v1/instances/i-1/memory", b""), "no_such_route");
        assert_eq!(p("DELETE", "/v1/host", b""), "method_not_allowed");
        assert_eq!(p("POST", "/v1/instances", b"{"), "body_malformed");
        assert_eq!(p("POST", "/v1/instances", b"\xff\xfe"), "body_not_utf8");
        assert_eq!(
            p(
                "POST",
                "/v1/instances",
                br#"{"instance_id":"i","image":"x","vcpus":1,"memory_mib":128,"debug":true}"#
            ),
            "body_unknown_field"
        );
        assert_eq!(
            p(
                "POST",
                "/v1/instances",
                br#"{"instance_id":"i","image":"x","vcpus":"1","memory_mib":128}"#
            ),
            "body_invalid"
        );
        assert_eq!(
            p("POST", "/v1/instances", &vec![b' '; MAX_BODY_BYTES + 1]),
            "body_too_large"
        );
        assert_eq!(
            p("POST", "/v1/instances/..%2F/start", b""),
            "bad_resource_id"
        );
        assert_eq!(p("GET", "/v1/host", b"x"), "body_unexpected");
    }

    #[test]
    fn instance_storage_is_bounded_and_typed() {
        let create = |v: serde_json::Value| {
            let body = serde_json::json!({"instance_id": "i-1", "image": "test-guest",
                "vcpus": 1, "memory_mib": 128, "instance_storage_gib": v});
            ApiRequest::parse("POST", "/v1/instances", None, body.to_string().as_bytes())
        };
        for (v, code) in [
            (serde_json::json!(0), "bad_instance_storage"),
            (
                serde_json::json!(MAX_INSTANCE_STORAGE_GIB + 1),
                "bad_instance_storage",
            ),
            (serde_json::json!("2"), "body_invalid"),
            (serde_json::json!(-1), "body_invalid"),
            (serde_json::json!(1.5), "body_invalid"),
            (serde_json::json!(u64::from(u32::MAX) + 1), "body_invalid"),
        ] {
            assert_eq!(create(v.clone()).unwrap_err().code(), code, "{v}");
        }
        for gib in [1, MAX_INSTANCE_STORAGE_GIB] {
            let Ok(ApiRequest::CreateInstance {
                instance_storage, ..
            }) = create(serde_json::json!(gib))
            else {
                panic!("{gib} refused");
            };
            assert_eq!(instance_storage.map(InstanceStorageGib::get), Some(gib));
        }
        let Ok(ApiRequest::CreateInstance {
            instance_storage, ..
        }) = create(serde_json::Value::Null)
        else {
            panic!("null refused");
        };
        assert_eq!(instance_storage, None);
    }

    fn create_with(net: serde_json::Value) -> Result<ApiRequest, RequestError> {
        let body = serde_json::json!({"instance_id": "i-1", "image": "test-guest", "vcpus": 1,
            "memory_mib": 128, "network": net});
        ApiRequest::parse("POST", "/v1/instances", None, body.to_string().as_bytes())
    }

    fn good_net() -> serde_json::Value {
        serde_json::json!({"vpc": 7, "card_id": 1, "mac": "02:00:00:00:01:05", "ip": "10.0.1.5",
            "prefix": 24, "allow": ["tcp:7000:10.0.0.0/16", "icmp:10.0.0.0/16"],
            "routes": ["10.0.1.6=2@10.77.0.2:40007"]})
    }

    #[test]
    fn network_object_is_typed_and_checked() {
        let ApiRequest::CreateInstance {
            network: Some(n), ..
        } = create_with(good_net()).unwrap()
        else {
            panic!("no network");
        };
        assert_eq!(n.gateway, std::net::Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(n.mtu, 1400);
        assert_eq!(n.mac.to_string(), "02:00:00:00:01:05");
        let bad = |k: &str, v: serde_json::Value| {
            let mut n = good_net();
            n[k] = v;
            create_with(n).unwrap_err().code()
        };
        assert_eq!(bad("mac", "01:00:00:00:00:01".into()), "bad_network_mac");
        assert_eq!(bad("mac", "00:00:00:00:00:00".into()), "bad_network_mac");
        assert_eq!(bad("mac", "02:00:00:00:00".into()), "bad_network_mac");
        // The address is inside its prefix; the gateway must be in the same subnet.
        assert_eq!(bad("gateway", "10.0.2.1".into()), "bad_network_gateway");
        assert_eq!(bad("gateway", "10.0.1.5".into()), "bad_network_gateway");
        assert_eq!(bad("ip", "10.0.1.0".into()), "bad_network_ip");
        assert_eq!(bad("ip", "10.0.1.255".into()), "bad_network_ip");
        assert_eq!(bad("ip", "10.0.1".into()), "bad_network_ip");
        assert_eq!(bad("prefix", 31.into()), "bad_network_ip");
        assert_eq!(bad("vpc", 0.into()), "bad_network_vpc");
        assert_eq!(bad("mtu", 100.into()), "bad_network_mtu");
        assert_eq!(
            bad("allow", serde_json::json!(["tcp:99999:10.0.0.0/8"])),
            "bad_network_rule"
        );
        assert_eq!(
            bad("allow", serde_json::json!(["--uid=0"])),
            "bad_network_rule"
        );
        assert_eq!(
            bad("routes", serde_json::json!(["10.0.1.6=1@10.77.0.2:40007"])),
            "bad_network_route"
        );
        assert_eq!(
            bad(
                "routes",
                serde_json::json!(["10.0.1.6=2@h:1", "10.0.1.6=3@10.0.0.1:1"])
            ),
            "bad_network_route"
        );
        assert_eq!(bad("key", "00".into()), "body_unknown_field");

        let attach = |b: serde_json::Value| {
            ApiRequest::parse(
                "POST",
                "/v1/instances/i-1/network",
                None,
                b.to_string().as_bytes(),
            )
        };
        let blob = "ab".repeat(bulkhead_sealing::SEALED_BLOB_LEN);
        let r = attach(serde_json::json!({"epoch": 1, "sealed_epoch_key": blob})).unwrap();
        assert_eq!(r.operation(), Operation::AttachNetwork);
        assert_eq!(r.resources(), vec!["instance:i-1".to_string()]);
        let code = |b| attach(b).unwrap_err().code();
        assert_eq!(
            code(serde_json::json!({"epoch": 0, "sealed_epoch_key": blob})),
            "bad_network_epoch"
        );
        assert_eq!(
            code(serde_json::json!({"epoch": 1, "sealed_epoch_key": "abcd"})),
            "bad_sealed_epoch_key"
        );
        assert_eq!(
            code(serde_json::json!({"epoch": 1, "sealed_epoch_key": "zz".repeat(126)})),
            "bad_sealed_epoch_key"
        );
        let put = |path: &str, b: serde_json::Value| {
            ApiRequest::parse("PUT", path, None, b.to_string().as_bytes())
        };
        assert!(put(
            "/v1/instances/i-1/network/routes",
            serde_json::json!({"routes": ["10.0.1.6=2@10.77.0.2:40007"]})
        )
        .is_ok());
        assert_eq!(
            put(
                "/v1/instances/i-1/network/routes",
                serde_json::json!({"routes": ["x"]})
            )
            .unwrap_err()
            .code(),
            "bad_network_route"
        );
        assert!(put(
            "/v1/instances/i-1/network/rules",
            serde_json::json!({"allow": ["all:0.0.0.0/0"]})
        )
        .is_ok());
        assert_eq!(
            put(
                "/v1/instances/i-1/network/rules",
                serde_json::json!({"allow": ["ssh"]})
            )
            .unwrap_err()
            .code(),
            "bad_network_rule"
        );
        assert_eq!(
            ApiRequest::parse("POST", "/v1/instances/i-1/network/rules", None, b"{}")
                .unwrap_err()
                .code(),
            "method_not_allowed"
        );
    }
}
