//! The controller's whole API: the route table and the one parser that turns an HTTP request
//! (method, path, query, body bytes) into a typed [`ApiRequest`]. Handlers never see raw bytes.
//!
//! [`ROUTES`] *is* the router: the HTTP server sends every request to [`ApiRequest::parse`],
//! which matches only these entries. Anything else is `no_such_route`. The route table, the
//! bodies, the answers and the refusal codes are the wire crate's
//! (`bulkhead-controller-proto`, which the control plane sends with); what is checked here
//! beyond their shape (identifiers, the `network` object with the net card's own parsers,
//! sealed key blobs, storage node names) is this module's.

use bulkhead_tokens::ops::valid_resource_id;
use bulkhead_tokens::Operation;
use serde::{Deserialize, Serialize};

use bulkhead_controller_proto::{decode_body as json, parse_audit_query};
pub use bulkhead_controller_proto::{
    find_route, Ack, Alert, AlertList, ArtefactStored, AttachNetworkRequest, AttachVolumeRequest,
    AttestRequest, AuditPage, BodyKind, CardMoved, ConsoleOutput, CreateInstanceRequest,
    DeployReleaseRequest, DrainRequest, ErrorBody, ErrorDetail, Health, HostDescription,
    HypervisorMoved, InstanceDescription, InstanceState, InstanceStorageGib, Method, NetCardMoved,
    NetCardRelease, NetworkAttached, NetworkField, NetworkRequest, NetworkRoutesRequest,
    NetworkRulesRequest, RelayedEvidence, ReleaseDeployed, RequestError, RouteSpec,
    VolumeStorageRequest, MAX_ARTEFACT_BYTES, MAX_AUDIT_PAGE, MAX_BODY_BYTES,
    MAX_INSTANCE_STORAGE_GIB, MAX_NET_ENTRY_LEN, MAX_NET_ROUTES, MAX_NET_RULES,
    MAX_USER_DATA_BYTES, ROUTES,
};

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

/// A checked [`VolumeStorageRequest`]: the card connects to `addr`, pins `node`, and opens the
/// export named by the volume id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkVolume {
    pub node: String,
    pub addr: std::net::SocketAddr,
    pub export: String,
}

/// A sealed key, opaque to the controller: exactly one blob of the sealing format, typed once
/// from the KMS's answer through the control plane and this API to the card.
pub use bulkhead_sealing::SealedBlob;

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
    /// One release artefact's bytes under their SHA-256 (checked when stored).
    UploadArtefact {
        sha256: [u8; 32],
        bytes: bytes::Bytes,
    },
    /// A signed release, as text (verified by the deploy step, with rot's checker).
    DeployRelease {
        release: String,
    },
    AttestHost {
        nonce: [u8; 32],
        /// The instance the quote is bound to, which must run on this host.
        instance: Option<ResourceId>,
        /// A credential for the TPM to activate first (relayed to the agent, which checks it).
        credential: Option<bulkhead_rot_proto::CredentialChallenge>,
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
        sealed_key: SealedBlob,
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
        sealed_key: SealedBlob,
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

/// The largest body `route` takes: an artefact upload's raw bytes, or a JSON body.
pub fn max_body(route: &RouteSpec) -> usize {
    if route.body == BodyKind::Artefact {
        MAX_ARTEFACT_BYTES
    } else {
        MAX_BODY_BYTES
    }
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
        if body.len() > max_body(route) {
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
            Operation::UploadArtefact => {
                let seg = ids.first().copied().ok_or(RequestError::BadId)?;
                if seg.len() != 64 || !seg.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(RequestError::BadId);
                }
                let sha256 = hex::decode(seg)
                    .ok()
                    .and_then(|d| <[u8; 32]>::try_from(d).ok())
                    .ok_or(RequestError::BadId)?;
                if body.is_empty() {
                    return Err(RequestError::Invalid);
                }
                ApiRequest::UploadArtefact {
                    sha256,
                    bytes: bytes::Bytes::copy_from_slice(body),
                }
            }
            Operation::DeployRelease => {
                let r: DeployReleaseRequest = json(body)?;
                if r.release.is_empty() {
                    return Err(RequestError::Invalid);
                }
                ApiRequest::DeployRelease { release: r.release }
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
                ApiRequest::AttestHost {
                    nonce,
                    instance,
                    credential: r.credential,
                }
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
                let blob =
                    SealedBlob::from_base64(&r.sealed_key).ok_or(RequestError::BadSealedKey)?;
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
                    sealed_key: blob,
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
                let blob = SealedBlob::from_hex(&r.sealed_epoch_key)
                    .ok_or(RequestError::BadNetwork(NetworkField::SealedKey))?;
                ApiRequest::AttachNetwork {
                    id: id()?,
                    epoch: r.epoch,
                    sealed_key: blob,
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
            ApiRequest::UploadArtefact { .. } => Operation::UploadArtefact,
            ApiRequest::DeployRelease { .. } => Operation::DeployRelease,
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

    /// The concrete resources the request touches, as the token's resource patterns name them
    /// ([`bulkhead_controller_proto::resources`]: the same list a caller's token is minted for).
    pub fn resources(&self) -> Vec<String> {
        let (instance, volume) = match self {
            ApiRequest::DescribeHost
            | ApiRequest::GetHealth
            | ApiRequest::GetMetrics
            | ApiRequest::ReadAudit { .. }
            | ApiRequest::ListAlerts
            | ApiRequest::DrainHost
            | ApiRequest::UploadArtefact { .. }
            | ApiRequest::DeployRelease { .. } => (None, None),
            ApiRequest::AttestHost { instance, .. } => (instance.as_ref(), None),
            ApiRequest::CreateInstance { id, .. }
            | ApiRequest::DescribeInstance(id)
            | ApiRequest::StartInstance(id)
            | ApiRequest::StopInstance(id)
            | ApiRequest::RebootInstance(id)
            | ApiRequest::TerminateInstance(id)
            | ApiRequest::GetConsole(id)
            | ApiRequest::AttachNetwork { id, .. }
            | ApiRequest::SetNetworkRoutes { id, .. }
            | ApiRequest::SetNetworkRules { id, .. } => (Some(id), None),
            ApiRequest::AttachVolume { id, volume, .. }
            | ApiRequest::DetachVolume { id, volume } => (Some(id), Some(volume)),
        };
        bulkhead_controller_proto::resources(
            self.operation(),
            instance.map(ResourceId::as_str),
            volume.map(ResourceId::as_str),
        )
    }
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
        let blob = SealedBlob::from_slice(&[3u8; bulkhead_sealing::SEALED_BLOB_LEN]).unwrap();
        let body = format!(
            r#"{{"volume_id":"v-1","sealed_key":"{}"}}"#,
            blob.to_base64()
        );
        let r =
            ApiRequest::parse("POST", "/v1/instances/i-1/volumes", None, body.as_bytes()).unwrap();
        assert_eq!(r.operation(), Operation::AttachVolume);
        match r {
            ApiRequest::AttachVolume { sealed_key, .. } => assert_eq!(sealed_key, blob),
            other => panic!("{other:?}"),
        }
        // Anything but exactly one sealed blob is refused at the boundary, with its code.
        for bad in ["AAEC", "", "not base64", &"A".repeat(4096)] {
            let body = format!(r#"{{"volume_id":"v-1","sealed_key":"{bad}"}}"#);
            let e = ApiRequest::parse("POST", "/v1/instances/i-1/volumes", None, body.as_bytes())
                .unwrap_err();
            assert_eq!(e.code(), "bad_sealed_key", "{bad:.12}");
        }
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
    fn deploy_routes_parse() {
        let sha = "ab".repeat(32);
        let r =
            ApiRequest::parse("PUT", &format!("/v1/host/artefacts/{sha}"), None, b"xyz").unwrap();
        assert_eq!(r.operation(), Operation::UploadArtefact);
        assert_eq!(r.resources(), vec!["host".to_string()]);
        let code = |path: &str, body: &[u8]| {
            ApiRequest::parse("PUT", path, None, body)
                .unwrap_err()
                .code()
        };
        assert_eq!(
            code(&format!("/v1/host/artefacts/{sha}"), b""),
            "body_invalid"
        );
        assert_eq!(code("/v1/host/artefacts/abcd", b"x"), "bad_resource_id");
        assert_eq!(
            code(&format!("/v1/host/artefacts/{}", "AB".repeat(32)), b"x"),
            "bad_resource_id"
        );
        // Large raw bodies only on the artefact route.
        let big = vec![0u8; MAX_BODY_BYTES + 1];
        assert!(ApiRequest::parse("PUT", &format!("/v1/host/artefacts/{sha}"), None, &big).is_ok());
        assert_eq!(
            ApiRequest::parse("POST", "/v1/host/releases", None, &big)
                .unwrap_err()
                .code(),
            "body_too_large"
        );
        let r =
            ApiRequest::parse("POST", "/v1/host/releases", None, br#"{"release":"{}"}"#).unwrap();
        assert_eq!(r.operation(), Operation::DeployRelease);
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
