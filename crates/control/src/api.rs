//! The customer API, version 1: `POST /v1/<Action>` with a strict JSON body (unknown fields
//! refused), signed by the customer (see `bulkhead_ec2_query::bh1`). [`ACTIONS`] *is* the route
//! table; [`ControlRequest::parse`] is the one parser between bytes and the service.
//!
//! The request bodies live by resource ([`compute`]: instances, volumes, keys; [`network`]:
//! VPCs, subnets, security groups and their checked forms) and are re-exported here; the shared
//! field checks are in `check`.

mod check;
pub mod compute;
pub mod network;

use crate::net::Cidr;
use crate::ControlError;
use check::{check_id, check_ids, check_token, json};
pub use compute::{
    AttachVolume, CreateKey, CreateSnapshot, CreateVolume, InstanceIds, InstanceRef, RevokeGrant,
    RunInstances, SnapshotIds, SnapshotRef, VolumeIds, VolumeRef, MAX_INSTANCE_STORAGE_GIB,
    MAX_USER_DATA_BYTES,
};
use network::{bad_net, check_description, check_group_name};
pub use network::{
    CreateSecurityGroup, CreateSubnet, CreateVpc, GroupCreate, GroupIds, IngressChange,
    IpPermission, IpRange, SecurityGroupIngress, SubnetCreate, SubnetIds, SubnetRef, VpcCreate,
    VpcIds, VpcRef, MAX_RULES_PER_CALL,
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most ids in one call.
pub const MAX_IDS: usize = 100;

/// Every action, whether it mutates state (and so takes an idempotency `ClientToken`).
pub const ACTIONS: &[(&str, bool)] = &[
    ("RunInstances", true),
    ("DescribeInstances", false),
    ("StopInstances", true),
    ("StartInstances", true),
    ("TerminateInstances", true),
    ("CreateVolume", true),
    ("DescribeVolumes", false),
    ("AttachVolume", true),
    ("DetachVolume", true),
    ("DeleteVolume", true),
    ("CreateSnapshot", true),
    ("DescribeSnapshots", false),
    ("DeleteSnapshot", true),
    ("GetConsoleOutput", false),
    ("CreateKey", true),
    ("RevokeGrant", true),
    ("CreateVpc", true),
    ("DescribeVpcs", false),
    ("DeleteVpc", true),
    ("CreateSubnet", true),
    ("DescribeSubnets", false),
    ("DeleteSubnet", true),
    ("CreateSecurityGroup", true),
    ("AuthorizeSecurityGroupIngress", true),
    ("RevokeSecurityGroupIngress", true),
    ("DescribeSecurityGroups", false),
];
/// A checked customer request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    RunInstances(RunInstances),
    DescribeInstances(InstanceIds),
    StopInstances(InstanceIds),
    StartInstances(InstanceIds),
    TerminateInstances(InstanceIds),
    CreateVolume(CreateVolume),
    DescribeVolumes(VolumeIds),
    AttachVolume(AttachVolume),
    DetachVolume(VolumeRef),
    DeleteVolume(VolumeRef),
    CreateSnapshot(CreateSnapshot),
    DescribeSnapshots(SnapshotIds),
    DeleteSnapshot(SnapshotRef),
    GetConsoleOutput(InstanceRef),
    CreateKey(CreateKey),
    RevokeGrant(RevokeGrant),
    CreateVpc(VpcCreate),
    DescribeVpcs(VpcIds),
    DeleteVpc(VpcRef),
    CreateSubnet(SubnetCreate),
    DescribeSubnets(SubnetIds),
    DeleteSubnet(SubnetRef),
    CreateSecurityGroup(GroupCreate),
    AuthorizeSecurityGroupIngress(IngressChange),
    RevokeSecurityGroupIngress(IngressChange),
    DescribeSecurityGroups(GroupIds),
}
impl ControlRequest {
    /// Parses `POST /v1/<Action>` with `body`. `path` must be exactly one action.
    pub fn parse(method: &str, path: &str, body: &str) -> Result<ControlRequest, ControlError> {
        let action = path
            .strip_prefix("/v1/")
            .ok_or(ControlError::NoSuchAction)?;
        if !ACTIONS.iter().any(|(a, _)| *a == action) {
            return Err(ControlError::NoSuchAction);
        }
        if method != "POST" {
            return Err(ControlError::MethodNotAllowed);
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(ControlError::BodyTooLarge);
        }
        let r = match action {
            "RunInstances" => {
                let r: RunInstances = json(body)?;
                check_id(&r.image_id)?;
                check_token(&r.client_token)?;
                if r.vcpus == 0 || r.vcpus > 64 || r.memory_mib < 16 || r.memory_mib > 1 << 20 {
                    return Err(ControlError::BadShape);
                }
                if r.user_data
                    .as_ref()
                    .is_some_and(|u| u.is_empty() || u.len() > MAX_USER_DATA_BYTES)
                {
                    return Err(ControlError::BadShape);
                }
                match r.tenancy.as_deref() {
                    None | Some("default") | Some("dedicated") => {}
                    Some(_) => return Err(ControlError::BadShape),
                }
                if r.instance_storage_gib
                    .is_some_and(|g| !(1..=MAX_INSTANCE_STORAGE_GIB).contains(&g))
                {
                    return Err(ControlError::BadInstanceStorage);
                }
                if let Some(s) = &r.subnet_id {
                    check_id(s)?;
                }
                check_ids(&r.security_group_ids)?;
                if r.security_group_ids.len() > crate::net::MAX_GROUPS_PER_INSTANCE {
                    return Err(ControlError::BadShape);
                }
                ControlRequest::RunInstances(r)
            }
            "DescribeInstances" | "StopInstances" | "StartInstances" | "TerminateInstances" => {
                let r: InstanceIds = json(body)?;
                check_ids(&r.instance_ids)?;
                check_token(&r.client_token)?;
                match action {
                    "DescribeInstances" => ControlRequest::DescribeInstances(r),
                    "StopInstances" => ControlRequest::StopInstances(r),
                    "StartInstances" => ControlRequest::StartInstances(r),
                    _ => ControlRequest::TerminateInstances(r),
                }
            }
            "CreateVolume" => {
                let r: CreateVolume = json(body)?;
                if let Some(k) = &r.kms_key_id {
                    check_id(k)?;
                }
                if let Some(s) = &r.snapshot_id {
                    check_id(s)?;
                }
                check_token(&r.client_token)?;
                if r.encrypted == Some(false) {
                    return Err(ControlError::EncryptionRequired);
                }
                if r.size_gib == 0 || r.size_gib > 16_384 {
                    return Err(ControlError::BadShape);
                }
                ControlRequest::CreateVolume(r)
            }
            "DescribeVolumes" => {
                let r: VolumeIds = json(body)?;
                check_ids(&r.volume_ids)?;
                ControlRequest::DescribeVolumes(r)
            }
            "AttachVolume" => {
                let r: AttachVolume = json(body)?;
                check_id(&r.volume_id)?;
                check_id(&r.instance_id)?;
                check_token(&r.client_token)?;
                ControlRequest::AttachVolume(r)
            }
            "DetachVolume" | "DeleteVolume" => {
                let r: VolumeRef = json(body)?;
                check_id(&r.volume_id)?;
                check_token(&r.client_token)?;
                if action == "DetachVolume" {
                    ControlRequest::DetachVolume(r)
                } else if r.force.is_some() {
                    return Err(ControlError::UnknownField);
                } else {
                    ControlRequest::DeleteVolume(r)
                }
            }
            "CreateSnapshot" => {
                let r: CreateSnapshot = json(body)?;
                check_id(&r.volume_id)?;
                check_token(&r.client_token)?;
                ControlRequest::CreateSnapshot(r)
            }
            "DescribeSnapshots" => {
                let r: SnapshotIds = json(body)?;
                check_ids(&r.snapshot_ids)?;
                ControlRequest::DescribeSnapshots(r)
            }
            "DeleteSnapshot" => {
                let r: SnapshotRef = json(body)?;
                check_id(&r.snapshot_id)?;
                check_token(&r.client_token)?;
                ControlRequest::DeleteSnapshot(r)
            }
            "GetConsoleOutput" => {
                let r: InstanceRef = json(body)?;
                check_id(&r.instance_id)?;
                ControlRequest::GetConsoleOutput(r)
            }
            "CreateKey" => {
                let r: CreateKey = json(body)?;
                check_token(&r.client_token)?;
                if r.description.as_ref().is_some_and(|d| d.len() > 256) {
                    return Err(ControlError::BadShape);
                }
                ControlRequest::CreateKey(r)
            }
            "RevokeGrant" => {
                let r: RevokeGrant = json(body)?;
                check_id(&r.key_id)?;
                check_id(&r.volume_id)?;
                check_token(&r.client_token)?;
                ControlRequest::RevokeGrant(r)
            }
            "CreateVpc" => {
                let r: CreateVpc = json(body)?;
                check_token(&r.client_token)?;
                ControlRequest::CreateVpc(VpcCreate {
                    cidr: Cidr::parse_block(&r.cidr_block).map_err(bad_net)?,
                    client_token: r.client_token,
                })
            }
            "DescribeVpcs" => {
                let r: VpcIds = json(body)?;
                check_ids(&r.vpc_ids)?;
                ControlRequest::DescribeVpcs(r)
            }
            "DeleteVpc" => {
                let r: VpcRef = json(body)?;
                check_id(&r.vpc_id)?;
                check_token(&r.client_token)?;
                ControlRequest::DeleteVpc(r)
            }
            "CreateSubnet" => {
                let r: CreateSubnet = json(body)?;
                check_id(&r.vpc_id)?;
                check_token(&r.client_token)?;
                ControlRequest::CreateSubnet(SubnetCreate {
                    cidr: Cidr::parse_block(&r.cidr_block).map_err(bad_net)?,
                    vpc_id: r.vpc_id,
                    client_token: r.client_token,
                })
            }
            "DescribeSubnets" => {
                let r: SubnetIds = json(body)?;
                check_ids(&r.subnet_ids)?;
                ControlRequest::DescribeSubnets(r)
            }
            "DeleteSubnet" => {
                let r: SubnetRef = json(body)?;
                check_id(&r.subnet_id)?;
                check_token(&r.client_token)?;
                ControlRequest::DeleteSubnet(r)
            }
            "CreateSecurityGroup" => {
                let r: CreateSecurityGroup = json(body)?;
                check_id(&r.vpc_id)?;
                check_token(&r.client_token)?;
                check_group_name(&r.group_name)?;
                let description = r.description.unwrap_or_default();
                check_description(&description)?;
                ControlRequest::CreateSecurityGroup(GroupCreate {
                    group_name: r.group_name,
                    vpc_id: r.vpc_id,
                    description,
                    client_token: r.client_token,
                })
            }
            "AuthorizeSecurityGroupIngress" => {
                ControlRequest::AuthorizeSecurityGroupIngress(IngressChange::check(json(body)?)?)
            }
            "RevokeSecurityGroupIngress" => {
                ControlRequest::RevokeSecurityGroupIngress(IngressChange::check(json(body)?)?)
            }
            "DescribeSecurityGroups" => {
                let r: GroupIds = json(body)?;
                check_ids(&r.group_ids)?;
                ControlRequest::DescribeSecurityGroups(r)
            }
            _ => return Err(ControlError::NoSuchAction),
        };
        Ok(r)
    }

    pub fn action(&self) -> &'static str {
        match self {
            ControlRequest::RunInstances(_) => "RunInstances",
            ControlRequest::DescribeInstances(_) => "DescribeInstances",
            ControlRequest::StopInstances(_) => "StopInstances",
            ControlRequest::StartInstances(_) => "StartInstances",
            ControlRequest::TerminateInstances(_) => "TerminateInstances",
            ControlRequest::CreateVolume(_) => "CreateVolume",
            ControlRequest::DescribeVolumes(_) => "DescribeVolumes",
            ControlRequest::AttachVolume(_) => "AttachVolume",
            ControlRequest::DetachVolume(_) => "DetachVolume",
            ControlRequest::DeleteVolume(_) => "DeleteVolume",
            ControlRequest::CreateSnapshot(_) => "CreateSnapshot",
            ControlRequest::DescribeSnapshots(_) => "DescribeSnapshots",
            ControlRequest::DeleteSnapshot(_) => "DeleteSnapshot",
            ControlRequest::GetConsoleOutput(_) => "GetConsoleOutput",
            ControlRequest::CreateKey(_) => "CreateKey",
            ControlRequest::RevokeGrant(_) => "RevokeGrant",
            ControlRequest::CreateVpc(_) => "CreateVpc",
            ControlRequest::DescribeVpcs(_) => "DescribeVpcs",
            ControlRequest::DeleteVpc(_) => "DeleteVpc",
            ControlRequest::CreateSubnet(_) => "CreateSubnet",
            ControlRequest::DescribeSubnets(_) => "DescribeSubnets",
            ControlRequest::DeleteSubnet(_) => "DeleteSubnet",
            ControlRequest::CreateSecurityGroup(_) => "CreateSecurityGroup",
            ControlRequest::AuthorizeSecurityGroupIngress(_) => "AuthorizeSecurityGroupIngress",
            ControlRequest::RevokeSecurityGroupIngress(_) => "RevokeSecurityGroupIngress",
            ControlRequest::DescribeSecurityGroups(_) => "DescribeSecurityGroups",
        }
    }

    /// The idempotency token of a mutating call.
    pub fn client_token(&self) -> Option<&str> {
        match self {
            ControlRequest::RunInstances(r) => r.client_token.as_deref(),
            ControlRequest::StopInstances(r)
            | ControlRequest::StartInstances(r)
            | ControlRequest::TerminateInstances(r) => r.client_token.as_deref(),
            ControlRequest::CreateVolume(r) => r.client_token.as_deref(),
            ControlRequest::AttachVolume(r) => r.client_token.as_deref(),
            ControlRequest::DetachVolume(r) | ControlRequest::DeleteVolume(r) => {
                r.client_token.as_deref()
            }
            ControlRequest::CreateSnapshot(r) => r.client_token.as_deref(),
            ControlRequest::DeleteSnapshot(r) => r.client_token.as_deref(),
            ControlRequest::CreateKey(r) => r.client_token.as_deref(),
            ControlRequest::RevokeGrant(r) => r.client_token.as_deref(),
            ControlRequest::CreateVpc(r) => r.client_token.as_deref(),
            ControlRequest::DeleteVpc(r) => r.client_token.as_deref(),
            ControlRequest::CreateSubnet(r) => r.client_token.as_deref(),
            ControlRequest::DeleteSubnet(r) => r.client_token.as_deref(),
            ControlRequest::CreateSecurityGroup(r) => r.client_token.as_deref(),
            ControlRequest::AuthorizeSecurityGroupIngress(r)
            | ControlRequest::RevokeSecurityGroupIngress(r) => r.client_token.as_deref(),
            ControlRequest::DescribeInstances(_)
            | ControlRequest::DescribeVolumes(_)
            | ControlRequest::DescribeSnapshots(_)
            | ControlRequest::GetConsoleOutput(_)
            | ControlRequest::DescribeVpcs(_)
            | ControlRequest::DescribeSubnets(_)
            | ControlRequest::DescribeSecurityGroups(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_refuses_bad_input() {
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/Exec", "{}"),
            Err(ControlError::NoSuchAction)
        ));
        assert!(matches!(
            ControlRequest::parse("GET", "/v1/RunInstances", "{}"),
            Err(ControlError::MethodNotAllowed)
        ));
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/RunInstances", r#"{"ImageId":"img","Evil":1}"#),
            Err(ControlError::UnknownField)
        ));
        assert!(matches!(
            ControlRequest::parse(
                "POST",
                "/v1/AttachVolume",
                r#"{"VolumeId":"../x","InstanceId":"i"}"#
            ),
            Err(ControlError::BadId)
        ));
        assert!(matches!(
            ControlRequest::parse(
                "POST",
                "/v1/CreateVolume",
                r#"{"SizeGiB":1,"Encrypted":false}"#
            ),
            Err(ControlError::EncryptionRequired)
        ));
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/RunInstances", "[1"),
            Err(ControlError::BadBody)
        ));
        let ok = ControlRequest::parse(
            "POST",
            "/v1/RunInstances",
            r#"{"ImageId":"img-1","ClientToken":"t1"}"#,
        );
        assert!(matches!(ok, Ok(ControlRequest::RunInstances(_))));
    }

    fn code(action: &str, body: &str) -> &'static str {
        match ControlRequest::parse("POST", &format!("/v1/{action}"), body) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn vpc_parameters_are_typed_and_checked() {
        assert_eq!(code("CreateVpc", r#"{"CidrBlock":"10.0.0.0/16"}"#), "ok");
        assert_eq!(
            code("CreateVpc", r#"{"CidrBlock":"10.0.0.0/8"}"#),
            "bad_prefix_length"
        );
        assert_eq!(
            code("CreateVpc", r#"{"CidrBlock":"10.0.0.0/29"}"#),
            "bad_prefix_length"
        );
        assert_eq!(
            code("CreateVpc", r#"{"CidrBlock":"10.0.0.1/16"}"#),
            "cidr_has_host_bits"
        );
        assert_eq!(code("CreateVpc", r#"{"CidrBlock":"ten/16"}"#), "bad_cidr");
        assert_eq!(code("CreateVpc", r#"{}"#), "body_malformed");
        assert_eq!(
            code("CreateVpc", r#"{"CidrBlock":"10.0.0.0/16","Tenant":"t-b"}"#),
            "body_unknown_field"
        );
        assert_eq!(
            code(
                "CreateSubnet",
                r#"{"VpcId":"vpc-1","CidrBlock":"10.0.1.0/24"}"#
            ),
            "ok"
        );
        assert_eq!(
            code(
                "CreateSubnet",
                r#"{"VpcId":"../vpc","CidrBlock":"10.0.1.0/24"}"#
            ),
            "bad_resource_id"
        );
        assert_eq!(
            code(
                "CreateSecurityGroup",
                r#"{"VpcId":"vpc-1","GroupName":"sg-web"}"#
            ),
            "bad_parameter"
        );
        assert_eq!(
            code("CreateSecurityGroup", r#"{"VpcId":"vpc-1","GroupName":""}"#),
            "bad_parameter"
        );
        assert_eq!(
            code(
                "CreateSecurityGroup",
                r#"{"VpcId":"vpc-1","GroupName":"web","Description":"front"}"#
            ),
            "ok"
        );
        let perm = |p: &str| format!(r#"{{"GroupId":"sg-1","IpPermissions":[{p}]}}"#);
        let ok = perm(
            r#"{"IpProtocol":"tcp","FromPort":7000,"ToPort":7000,"IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
        );
        match ControlRequest::parse("POST", "/v1/AuthorizeSecurityGroupIngress", &ok) {
            Ok(ControlRequest::AuthorizeSecurityGroupIngress(c)) => {
                assert_eq!(c.rules.len(), 1);
                assert_eq!(c.rules[0].card_text(), "tcp:7000:10.0.0.0/16");
            }
            other => panic!("{other:?}"),
        }
        for (bad, want) in [
            (
                r#"{"IpProtocol":"tcp","IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_port_range",
            ),
            (
                r#"{"IpProtocol":"tcp","FromPort":0,"ToPort":5,"IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_port_range",
            ),
            (
                r#"{"IpProtocol":"tcp","FromPort":9,"ToPort":8,"IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_port_range",
            ),
            (
                r#"{"IpProtocol":"tcp","FromPort":1,"ToPort":70000,"IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_port_range",
            ),
            (
                r#"{"IpProtocol":"icmp","FromPort":8,"ToPort":8,"IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_port_range",
            ),
            (
                r#"{"IpProtocol":"gre","IpRanges":[{"CidrIp":"10.0.0.0/16"}]}"#,
                "bad_protocol",
            ),
            (
                r#"{"IpProtocol":"tcp","FromPort":1,"ToPort":2,"IpRanges":[{"CidrIp":"10.0.0.1/16"}]}"#,
                "cidr_has_host_bits",
            ),
            (
                r#"{"IpProtocol":"tcp","FromPort":1,"ToPort":2,"IpRanges":[]}"#,
                "bad_parameter",
            ),
        ] {
            assert_eq!(
                code("AuthorizeSecurityGroupIngress", &perm(bad)),
                want,
                "{bad}"
            );
            assert_eq!(
                code("RevokeSecurityGroupIngress", &perm(bad)),
                want,
                "{bad}"
            );
        }
        assert_eq!(
            code(
                "AuthorizeSecurityGroupIngress",
                r#"{"GroupId":"sg-1","IpPermissions":[]}"#
            ),
            "bad_parameter"
        );
        assert_eq!(
            code(
                "AuthorizeSecurityGroupIngress",
                &perm(r#"{"IpProtocol":"-1","IpRanges":[{"CidrIp":"0.0.0.0/0"}]}"#)
            ),
            "ok"
        );
        assert_eq!(
            code(
                "RunInstances",
                r#"{"ImageId":"img","SubnetId":"subnet-1","SecurityGroupIds":["sg-1"]}"#
            ),
            "ok"
        );
        // Groups without a subnet: the default subnet's VPC must hold them (checked at run).
        assert_eq!(
            code(
                "RunInstances",
                r#"{"ImageId":"img","SecurityGroupIds":["sg-1"]}"#
            ),
            "ok"
        );
        assert_eq!(
            code(
                "RunInstances",
                r#"{"ImageId":"img","SecurityGroupIds":["a","b","c","d","e","f"]}"#
            ),
            "bad_parameter"
        );
        assert_eq!(
            code("RunInstances", r#"{"ImageId":"img","SubnetId":"subnet/1"}"#),
            "bad_resource_id"
        );
        // Instance storage: 1..=64 GiB, a number.
        for (gib, want) in [
            ("1", "ok"),
            ("64", "ok"),
            ("0", "bad_instance_storage"),
            ("65", "bad_instance_storage"),
            ("4294967296", "body_malformed"),
            ("-1", "body_malformed"),
            ("\"8\"", "body_malformed"),
        ] {
            let body = format!(r#"{{"ImageId":"img","InstanceStorageGiB":{gib}}}"#);
            assert_eq!(code("RunInstances", &body), want, "{gib}");
        }
    }
}
