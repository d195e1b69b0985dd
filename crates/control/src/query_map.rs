//! EC2 Query requests into the JSON API's checked requests (their answers are rendered by
//! [`crate::query_render`]). No operation logic lives here: every
//! request goes through [`ControlRequest::parse`] and [`crate::service::ControlPlane::perform`].

use bulkhead_ec2_query::form::{Filter, Page};
use bulkhead_ec2_query::xml::StateChange;
use bulkhead_ec2_query::{Ec2Request, Ec2Response};
use serde_json::{json, Value};

use crate::api::ControlRequest;
use crate::ControlError;

/// Bulkhead's instance types: (name, vCPUs, MiB). `InstanceType` absent: the first.
pub const INSTANCE_TYPES: &[(&str, u32, u32)] = &[
    ("t3.nano", 1, 128),
    ("t3.micro", 1, 256),
    ("t3.small", 1, 512),
    ("t3.medium", 2, 1024),
];

/// The device name reported for an attachment (the guest sees its first volume as `vda`).
pub const ATTACHED_DEVICE: &str = "/dev/vda";

/// What the answer of a translated request is rendered as.
#[derive(Debug, Clone)]
pub(crate) enum View {
    Run,
    DescribeInstances(Vec<Filter>, Page),
    StateChange(fn(Vec<StateChange>) -> Ec2Response),
    Console,
    CreateVolume,
    DescribeVolumes(Vec<Filter>, Page),
    Attach(String),
    Detach,
    DeleteVolume,
    CreateVpc,
    DescribeVpcs(Vec<Filter>, Page),
    DeleteVpc,
    CreateSubnet,
    DescribeSubnets(Vec<Filter>, Page),
    DeleteSubnet,
    CreateGroup,
    Ingress(bool),
    DescribeGroups(Vec<String>, Vec<Filter>, Page),
    /// With the request's `Description` (echoed in the answer, not kept).
    CreateSnapshot(Option<String>),
    /// With `Owner.N` (botocore's `OwnerIds`).
    DescribeSnapshots(Vec<String>, Vec<Filter>, Page),
    DeleteSnapshot,
}

fn unsupported(what: &'static str) -> ControlError {
    ControlError::Unsupported(what)
}

/// Checks filter names against what `view` can filter on (before anything runs).
fn check_filters(filters: &[Filter], known: &[&str]) -> Result<(), ControlError> {
    match filters.iter().all(|f| known.contains(&f.name.as_str())) {
        true => Ok(()),
        false => Err(unsupported("this filter name")),
    }
}

const INSTANCE_FILTERS: &[&str] = &[
    "instance-id",
    "instance-state-name",
    "image-id",
    "instance-type",
    "subnet-id",
    "vpc-id",
    "private-ip-address",
    "instance.group-id",
];
const VOLUME_FILTERS: &[&str] = &[
    "volume-id",
    "status",
    "size",
    "encrypted",
    "attachment.instance-id",
    "attachment.status",
];
const VPC_FILTERS: &[&str] = &["vpc-id", "cidr-block", "cidr", "is-default", "state"];
const SUBNET_FILTERS: &[&str] = &[
    "subnet-id",
    "vpc-id",
    "cidr-block",
    "default-for-az",
    "state",
];
const GROUP_FILTERS: &[&str] = &["group-id", "group-name", "vpc-id", "description"];
const SNAPSHOT_FILTERS: &[&str] = &[
    "snapshot-id",
    "volume-id",
    "status",
    "owner-id",
    "volume-size",
    "encrypted",
];

fn az_matches(az: Option<&str>, ours: &str) -> Result<(), ControlError> {
    match az {
        Some(a) if a != ours => Err(unsupported("availability zone (one per region)")),
        _ => Ok(()),
    }
}

/// A Query request as the JSON API's checked request, and how to render its answer.
pub(crate) fn translate(r: Ec2Request, az: &str) -> Result<(ControlRequest, View), ControlError> {
    let ids = |v: Vec<String>| json!(v);
    let (action, body, view) = match r {
        Ec2Request::RunInstances(r) => {
            if r.min_count != 1 || r.max_count != 1 {
                return Err(unsupported("MinCount/MaxCount other than 1"));
            }
            az_matches(r.availability_zone.as_deref(), az)?;
            let (_, vcpus, mem) = match r.instance_type.as_deref() {
                None => INSTANCE_TYPES[0],
                Some(t) => *INSTANCE_TYPES
                    .iter()
                    .find(|(n, _, _)| *n == t)
                    .ok_or(unsupported("InstanceType"))?,
            };
            let user_data = match r.user_data {
                Some(b) => Some(String::from_utf8(b).map_err(|_| unsupported("UserData"))?),
                None => None,
            };
            let mut b = json!({
                "ImageId": r.image_id,
                "VcpuCount": vcpus,
                "MemoryMiB": mem,
                "SecurityGroupIds": r.security_group_ids,
            });
            let o = b.as_object_mut().ok_or(ControlError::Internal)?;
            for (k, v) in [
                ("UserData", user_data),
                ("ClientToken", r.client_token),
                ("SubnetId", r.subnet_id),
            ] {
                if let Some(v) = v {
                    o.insert(k.into(), json!(v));
                }
            }
            ("RunInstances", b, View::Run)
        }
        Ec2Request::DescribeInstances(d) => {
            check_filters(&d.filters, INSTANCE_FILTERS)?;
            let v: Vec<String> = d.instance_ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeInstances",
                json!({ "InstanceIds": ids(v) }),
                View::DescribeInstances(d.filters, d.page),
            )
        }
        Ec2Request::StartInstances { instance_ids } => (
            "StartInstances",
            json!({ "InstanceIds": instance_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() }),
            View::StateChange(Ec2Response::StartInstances),
        ),
        Ec2Request::StopInstances(s) => (
            "StopInstances",
            json!({ "InstanceIds": s.instance_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() }),
            View::StateChange(Ec2Response::StopInstances),
        ),
        Ec2Request::TerminateInstances { instance_ids } => (
            "TerminateInstances",
            json!({ "InstanceIds": instance_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() }),
            View::StateChange(Ec2Response::TerminateInstances),
        ),
        Ec2Request::GetConsoleOutput(g) => (
            "GetConsoleOutput",
            json!({ "InstanceId": g.instance_id.as_str() }),
            View::Console,
        ),
        Ec2Request::CreateVolume(c) => {
            az_matches(Some(&c.availability_zone), az)?;
            // Volumes are always encrypted (as with EC2's encryption by default): `Encrypted`
            // absent and `Encrypted=true` are the same request.
            let mut b = json!({ "SizeGiB": c.size_gib, "Encrypted": true });
            if let Some(k) = c.kms_key_id {
                b["KmsKeyId"] = json!(k);
            }
            if let Some(s) = c.snapshot_id {
                b["SnapshotId"] = json!(s.as_str());
            }
            if let Some(t) = c.client_token {
                b["ClientToken"] = json!(t);
            }
            ("CreateVolume", b, View::CreateVolume)
        }
        Ec2Request::DescribeVolumes(d) => {
            check_filters(&d.filters, VOLUME_FILTERS)?;
            let v: Vec<String> = d.volume_ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeVolumes",
                json!({ "VolumeIds": v }),
                View::DescribeVolumes(d.filters, d.page),
            )
        }
        Ec2Request::AttachVolume(a) => (
            "AttachVolume",
            json!({ "VolumeId": a.volume_id.as_str(), "InstanceId": a.instance_id.as_str() }),
            View::Attach(a.device),
        ),
        Ec2Request::DetachVolume(d) => (
            "DetachVolume",
            if d.force {
                json!({ "VolumeId": d.volume_id.as_str(), "Force": true })
            } else {
                json!({ "VolumeId": d.volume_id.as_str() })
            },
            View::Detach,
        ),
        Ec2Request::DeleteVolume { volume_id } => (
            "DeleteVolume",
            json!({ "VolumeId": volume_id.as_str() }),
            View::DeleteVolume,
        ),
        Ec2Request::CreateVpc(c) => {
            let mut b = json!({ "CidrBlock": c.cidr_block });
            if let Some(t) = c.client_token {
                b["ClientToken"] = json!(t);
            }
            ("CreateVpc", b, View::CreateVpc)
        }
        Ec2Request::DescribeVpcs(d) => {
            check_filters(&d.filters, VPC_FILTERS)?;
            let v: Vec<String> = d.ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeVpcs",
                json!({ "VpcIds": v }),
                View::DescribeVpcs(d.filters, d.page),
            )
        }
        Ec2Request::DeleteVpc { vpc_id } => (
            "DeleteVpc",
            json!({ "VpcId": vpc_id.as_str() }),
            View::DeleteVpc,
        ),
        Ec2Request::CreateSubnet(c) => {
            az_matches(c.availability_zone.as_deref(), az)?;
            let mut b = json!({ "VpcId": c.vpc_id.as_str(), "CidrBlock": c.cidr_block });
            if let Some(t) = c.client_token {
                b["ClientToken"] = json!(t);
            }
            ("CreateSubnet", b, View::CreateSubnet)
        }
        Ec2Request::DescribeSubnets(d) => {
            check_filters(&d.filters, SUBNET_FILTERS)?;
            let v: Vec<String> = d.ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeSubnets",
                json!({ "SubnetIds": v }),
                View::DescribeSubnets(d.filters, d.page),
            )
        }
        Ec2Request::DeleteSubnet { subnet_id } => (
            "DeleteSubnet",
            json!({ "SubnetId": subnet_id.as_str() }),
            View::DeleteSubnet,
        ),
        Ec2Request::CreateSecurityGroup(g) => (
            "CreateSecurityGroup",
            json!({ "GroupName": g.group_name, "VpcId": g.vpc_id.as_str(), "Description": g.description }),
            View::CreateGroup,
        ),
        Ec2Request::AuthorizeSecurityGroupIngress(i) => (
            "AuthorizeSecurityGroupIngress",
            ingress_json(&i),
            View::Ingress(true),
        ),
        Ec2Request::RevokeSecurityGroupIngress(i) => (
            "RevokeSecurityGroupIngress",
            ingress_json(&i),
            View::Ingress(false),
        ),
        Ec2Request::DescribeSecurityGroups(d) => {
            check_filters(&d.filters, GROUP_FILTERS)?;
            let v: Vec<String> = d.group_ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeSecurityGroups",
                json!({ "GroupIds": v }),
                View::DescribeGroups(d.group_names, d.filters, d.page),
            )
        }
        Ec2Request::CreateSnapshot(c) => (
            "CreateSnapshot",
            json!({ "VolumeId": c.volume_id.as_str() }),
            View::CreateSnapshot(c.description),
        ),
        Ec2Request::DescribeSnapshots(d) => {
            check_filters(&d.filters, SNAPSHOT_FILTERS)?;
            let v: Vec<String> = d.snapshot_ids.iter().map(|i| i.to_string()).collect();
            (
                "DescribeSnapshots",
                json!({ "SnapshotIds": v }),
                View::DescribeSnapshots(d.owner_ids, d.filters, d.page),
            )
        }
        Ec2Request::DeleteSnapshot { snapshot_id } => (
            "DeleteSnapshot",
            json!({ "SnapshotId": snapshot_id.as_str() }),
            View::DeleteSnapshot,
        ),
    };
    let req = ControlRequest::parse("POST", &format!("/v1/{action}"), &body.to_string())?;
    Ok((req, view))
}

fn ingress_json(i: &bulkhead_ec2_query::vpc::IngressChange) -> Value {
    let perms: Vec<Value> = i
        .permissions
        .iter()
        .map(|p| {
            let mut v = json!({
                "IpProtocol": p.ip_protocol,
                "IpRanges": p.cidr_ips.iter().map(|c| json!({ "CidrIp": c })).collect::<Vec<_>>(),
            });
            if let Some(f) = p.from_port {
                v["FromPort"] = json!(f);
            }
            if let Some(t) = p.to_port {
                v["ToPort"] = json!(t);
            }
            v
        })
        .collect();
    json!({ "GroupId": i.group_id.as_str(), "IpPermissions": perms })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tr(body: &str) -> Result<(ControlRequest, View), ControlError> {
        let call = Ec2Request::parse(format!("Version=2016-11-15&{body}").as_bytes()).unwrap();
        translate(call.request, "us-east-1a")
    }

    #[test]
    fn query_requests_become_the_json_apis_checked_requests() {
        let (r, _) = tr("Action=RunInstances&ImageId=img-1&MinCount=1&MaxCount=1&InstanceType=t3.micro&UserData=ZWNobyBoaQ%3D%3D").unwrap();
        let ControlRequest::RunInstances(r) = r else {
            panic!()
        };
        assert_eq!((r.vcpus, r.memory_mib), (1, 256));
        assert_eq!(r.user_data.as_deref(), Some("echo hi"));
        for (bad, code) in [
            (
                "Action=RunInstances&ImageId=img-1&MinCount=1&MaxCount=2",
                "unsupported",
            ),
            (
                "Action=RunInstances&ImageId=img-1&MinCount=1&MaxCount=1&InstanceType=p5.48xlarge",
                "unsupported",
            ),
            (
                "Action=RunInstances&ImageId=img-1&MinCount=1&MaxCount=1&UserData=%2F%2F8%3D",
                "unsupported",
            ),
            (
                "Action=RunInstances&ImageId=a%2Fb&MinCount=1&MaxCount=1",
                "bad_resource_id",
            ),
            (
                "Action=CreateVolume&Size=1&AvailabilityZone=eu-west-1a",
                "unsupported",
            ),
            (
                "Action=DescribeInstances&Filter.1.Name=tag%3AName&Filter.1.Value.1=x",
                "unsupported",
            ),
            (
                "Action=CreateVpc&CidrBlock=10.0.0.0%2F8",
                "bad_prefix_length",
            ),
        ] {
            assert_eq!(tr(bad).err().map(|e| e.code()), Some(code), "{bad}");
        }
        let (r, _) =
            tr("Action=CreateVolume&Size=2&AvailabilityZone=us-east-1a&Encrypted=true").unwrap();
        assert!(matches!(r, ControlRequest::CreateVolume(c) if c.size_gib == 2));
        let (r, _) =
            tr("Action=CreateVolume&Size=3&AvailabilityZone=us-east-1a&SnapshotId=snap-0a1b")
                .unwrap();
        assert!(
            matches!(r, ControlRequest::CreateVolume(c) if c.size_gib == 3 && c.snapshot_id.as_deref() == Some("snap-0a1b"))
        );
        let (r, v) = tr("Action=CreateSnapshot&VolumeId=vol-9&Description=d").unwrap();
        assert!(matches!(r, ControlRequest::CreateSnapshot(c) if c.volume_id == "vol-9"));
        assert!(matches!(v, View::CreateSnapshot(Some(d)) if d == "d"));
        let (r, _) =
            tr("Action=DescribeSnapshots&SnapshotId.1=snap-1&SnapshotId.2=snap-2").unwrap();
        assert!(
            matches!(r, ControlRequest::DescribeSnapshots(d) if d.snapshot_ids == ["snap-1", "snap-2"])
        );
        let (r, _) = tr("Action=DeleteSnapshot&SnapshotId=snap-3").unwrap();
        assert!(matches!(r, ControlRequest::DeleteSnapshot(d) if d.snapshot_id == "snap-3"));
        assert_eq!(
            tr("Action=DescribeSnapshots&Filter.1.Name=tag%3Ak&Filter.1.Value.1=v")
                .err()
                .map(|e| e.code()),
            Some("unsupported")
        );
        let (r, _) = tr("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=22&IpPermissions.1.ToPort=22&IpPermissions.1.IpRanges.1.CidrIp=10.0.0.0%2F16").unwrap();
        assert!(
            matches!(r, ControlRequest::AuthorizeSecurityGroupIngress(c) if c.rules.len() == 1)
        );
    }
}
