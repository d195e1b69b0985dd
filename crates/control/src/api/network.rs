//! Request bodies of the VPC, subnet and security-group actions, and the checked forms the
//! parser turns them into (blocks, protocols, ports and rules typed by [`crate::net`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::check::{check_id, check_token};
use crate::net::{Cidr, IngressRule, NetError, PortRange, Protocol};
use crate::ControlError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVpc {
    #[serde(rename = "CidrBlock")]
    pub cidr_block: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpcIds {
    #[serde(rename = "VpcIds", default)]
    pub vpc_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpcRef {
    #[serde(rename = "VpcId")]
    pub vpc_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubnet {
    #[serde(rename = "VpcId")]
    pub vpc_id: String,
    #[serde(rename = "CidrBlock")]
    pub cidr_block: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetIds {
    #[serde(rename = "SubnetIds", default)]
    pub subnet_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetRef {
    #[serde(rename = "SubnetId")]
    pub subnet_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroup {
    #[serde(rename = "GroupName")]
    pub group_name: String,
    #[serde(rename = "VpcId")]
    pub vpc_id: String,
    #[serde(rename = "Description", default)]
    pub description: Option<String>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

/// EC2's `IpRanges` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    #[serde(rename = "CidrIp")]
    pub cidr_ip: String,
}

/// EC2's `IpPermissions` entry: `tcp`/`udp` take `FromPort`..`ToPort`; `icmp` and `-1`/`all`
/// take no ports (or `-1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpPermission {
    #[serde(rename = "IpProtocol")]
    pub ip_protocol: String,
    #[serde(rename = "FromPort", default)]
    pub from_port: Option<i32>,
    #[serde(rename = "ToPort", default)]
    pub to_port: Option<i32>,
    #[serde(rename = "IpRanges")]
    pub ip_ranges: Vec<IpRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupIngress {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "IpPermissions")]
    pub ip_permissions: Vec<IpPermission>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupIds {
    #[serde(rename = "GroupIds", default)]
    pub group_ids: Vec<String>,
}

/// A checked CreateVpc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcCreate {
    pub cidr: Cidr,
    pub client_token: Option<String>,
}

/// A checked CreateSubnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetCreate {
    pub vpc_id: String,
    pub cidr: Cidr,
    pub client_token: Option<String>,
}

/// A checked CreateSecurityGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCreate {
    pub group_name: String,
    pub vpc_id: String,
    pub description: String,
    pub client_token: Option<String>,
}

/// A checked Authorize/RevokeSecurityGroupIngress: one rule per (permission, range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressChange {
    pub group_id: String,
    pub rules: Vec<IngressRule>,
    pub client_token: Option<String>,
}

/// Most rules in one Authorize/Revoke call.
pub const MAX_RULES_PER_CALL: usize = 20;

pub(super) fn bad_net(e: NetError) -> ControlError {
    ControlError::BadNetwork(e)
}

impl IngressChange {
    pub(super) fn check(r: SecurityGroupIngress) -> Result<IngressChange, ControlError> {
        check_id(&r.group_id)?;
        check_token(&r.client_token)?;
        let mut rules = Vec::new();
        if r.ip_permissions.is_empty() {
            return Err(ControlError::BadShape);
        }
        for p in &r.ip_permissions {
            let protocol = Protocol::parse(&p.ip_protocol).map_err(bad_net)?;
            let ports = if protocol.has_ports() {
                let (Some(from), Some(to)) = (p.from_port, p.to_port) else {
                    return Err(bad_net(NetError::BadPorts));
                };
                let port = |n: i32| u16::try_from(n).map_err(|_| bad_net(NetError::BadPorts));
                Some(PortRange::new(port(from)?, port(to)?).map_err(bad_net)?)
            } else {
                if p.from_port.is_some_and(|n| n != -1) || p.to_port.is_some_and(|n| n != -1) {
                    return Err(bad_net(NetError::BadPorts));
                }
                None
            };
            if p.ip_ranges.is_empty() {
                return Err(ControlError::BadShape);
            }
            for range in &p.ip_ranges {
                let source = Cidr::parse(&range.cidr_ip).map_err(bad_net)?;
                rules.push(IngressRule::new(protocol, ports, source).map_err(bad_net)?);
            }
        }
        if rules.len() > MAX_RULES_PER_CALL {
            return Err(ControlError::BadShape);
        }
        Ok(IngressChange {
            group_id: r.group_id,
            rules,
            client_token: r.client_token,
        })
    }
}

pub(super) fn check_group_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with("sg-")
        && name.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(ControlError::BadShape)
    }
}

pub(super) fn check_description(d: &str) -> Result<(), ControlError> {
    if d.len() <= 255 && d.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Ok(())
    } else {
        Err(ControlError::BadShape)
    }
}
