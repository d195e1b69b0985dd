//! The JSON API's answers as EC2 XML answers, with EC2's filters (`Filter.N`, exact values,
//! ANDed across names) and pages (`MaxResults`/`NextToken`: items sorted by id, the token is the
//! first id of the next page) applied to them.

use bulkhead_ec2_query::form::{Filter, Page};
use bulkhead_ec2_query::snapshot::SnapshotResponse;
use bulkhead_ec2_query::vpc::{GroupItem, IpPermission, SubnetItem, VpcItem, VpcResponse};
use bulkhead_ec2_query::xml::{
    AttachmentStateName, InstanceItem, InstanceStateName, Reservation, StateChange,
    VolumeAttachment, VolumeItem, VolumeStateName,
};
use bulkhead_ec2_query::Ec2Response;
use serde_json::Value;

use crate::query_map::{View, ATTACHED_DEVICE, INSTANCE_TYPES};
use crate::ControlError;

mod snapshots;
use snapshots::{owned_by, snapshot_item, snapshot_values};

fn text(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn opt_text(v: &Value, k: &str) -> Option<String> {
    v[k].as_str().map(str::to_string)
}

fn unix(v: &Value, k: &str) -> i64 {
    v[k].as_u64()
        .and_then(|n| i64::try_from(n).ok())
        .unwrap_or(0)
}

fn list<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v[k].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `true` when every filter has a value among the item's values for its name.
fn matches(filters: &[Filter], values: impl Fn(&str) -> Vec<String>) -> bool {
    filters.iter().all(|f| {
        let have = values(&f.name);
        f.values.iter().any(|want| have.contains(want))
    })
}

/// Items sorted by id, from `NextToken` (the first id of the page) on, at most `MaxResults`.
fn paginate<T>(
    mut items: Vec<(String, T)>,
    page: &Page,
) -> Result<(Vec<T>, Option<String>), ControlError> {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let start = match &page.next_token {
        Some(t) => items.partition_point(|(id, _)| id < t),
        None => 0,
    };
    let mut rest: Vec<(String, T)> = items.into_iter().skip(start).collect();
    let mut next = None;
    if let Some(max) = page.max_results.and_then(|m| usize::try_from(m).ok()) {
        if rest.len() > max {
            next = rest.get(max).map(|(id, _)| id.clone());
            rest.truncate(max);
        }
    }
    Ok((rest.into_iter().map(|(_, t)| t).collect(), next))
}

fn instance_state(s: &str) -> InstanceStateName {
    match s {
        "running" => InstanceStateName::Running,
        "stopped" => InstanceStateName::Stopped,
        "terminated" => InstanceStateName::Terminated,
        _ => InstanceStateName::Pending,
    }
}

fn instance_type(v: &Value) -> String {
    let (c, m) = (v["VcpuCount"].as_u64(), v["MemoryMiB"].as_u64());
    INSTANCE_TYPES
        .iter()
        .find(|(_, vc, mm)| Some(u64::from(*vc)) == c && Some(u64::from(*mm)) == m)
        .map(|(n, _, _)| (*n).to_string())
        .unwrap_or_else(|| format!("bh.{}vcpu.{}mib", c.unwrap_or(0), m.unwrap_or(0)))
}

fn instance_item(v: &Value, az: &str) -> InstanceItem {
    InstanceItem {
        instance_id: text(v, "InstanceId"),
        image_id: text(v, "ImageId"),
        state: instance_state(&text(v, "State")),
        instance_type: instance_type(v),
        launch_time_unix: unix(v, "LaunchTime"),
        availability_zone: az.to_string(),
        subnet_id: opt_text(v, "SubnetId"),
        private_ip: opt_text(v, "PrivateIpAddress"),
        security_group_ids: list(v, "SecurityGroups")
            .iter()
            .map(|g| text(g, "GroupId"))
            .collect(),
    }
}

fn reservation(i: InstanceItem, owner: &str) -> Reservation {
    Reservation {
        reservation_id: format!("r-{}", i.instance_id.trim_start_matches("i-")),
        owner_id: owner.to_string(),
        instances: vec![i],
    }
}

fn instance_values(v: &Value, name: &str) -> Vec<String> {
    match name {
        "instance-id" => vec![text(v, "InstanceId")],
        "instance-state-name" => vec![text(v, "State")],
        "image-id" => vec![text(v, "ImageId")],
        "instance-type" => vec![instance_type(v)],
        "subnet-id" => vec![text(v, "SubnetId")],
        "vpc-id" => vec![text(v, "VpcId")],
        "private-ip-address" => vec![text(v, "PrivateIpAddress")],
        "instance.group-id" => list(v, "SecurityGroups")
            .iter()
            .map(|g| text(g, "GroupId"))
            .collect(),
        _ => vec![],
    }
}

fn volume_item(v: &Value, az: &str) -> VolumeItem {
    let state = match text(v, "State").as_str() {
        "in-use" => VolumeStateName::InUse,
        "attaching" | "detaching" => VolumeStateName::InUse,
        "deleting" => VolumeStateName::Deleting,
        // A volume made from a snapshot whose key membership is not yet confirmed.
        "creating" => VolumeStateName::Creating,
        _ => VolumeStateName::Available,
    };
    let attachments = match opt_text(v, "InstanceId") {
        Some(i) => vec![VolumeAttachment {
            volume_id: text(v, "VolumeId"),
            instance_id: i,
            device: ATTACHED_DEVICE.into(),
            state: match text(v, "State").as_str() {
                "attaching" => AttachmentStateName::Attaching,
                "detaching" => AttachmentStateName::Detaching,
                _ => AttachmentStateName::Attached,
            },
            attach_time_unix: unix(v, "CreateTime"),
            delete_on_termination: false,
        }],
        None => vec![],
    };
    VolumeItem {
        volume_id: text(v, "VolumeId"),
        size_gib: v["SizeGiB"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        availability_zone: az.to_string(),
        state,
        create_time_unix: unix(v, "CreateTime"),
        volume_type: "gp3".into(),
        encrypted: true,
        kms_key_id: opt_text(v, "KmsKeyId"),
        snapshot_id: opt_text(v, "SnapshotId"),
        attachments,
    }
}

fn volume_values(v: &Value, name: &str) -> Vec<String> {
    let item = volume_item(v, "");
    match name {
        "volume-id" => vec![item.volume_id],
        "status" => vec![item.state.as_str().to_string()],
        "size" => vec![item.size_gib.to_string()],
        "encrypted" => vec!["true".into()],
        "attachment.instance-id" => item
            .attachments
            .iter()
            .map(|a| a.instance_id.clone())
            .collect(),
        "attachment.status" => item
            .attachments
            .iter()
            .map(|a| a.state.as_str().to_string())
            .collect(),
        _ => vec![],
    }
}

fn attachment(v: &Value, device: &str, state: AttachmentStateName) -> VolumeAttachment {
    VolumeAttachment {
        volume_id: text(v, "VolumeId"),
        instance_id: text(v, "InstanceId"),
        device: device.to_string(),
        state,
        attach_time_unix: i64::try_from(crate::service::now()).unwrap_or(0),
        delete_on_termination: false,
    }
}

fn vpc_item(v: &Value, owner: &str) -> VpcItem {
    VpcItem {
        vpc_id: text(v, "VpcId"),
        cidr_block: text(v, "CidrBlock"),
        is_default: v["IsDefault"].as_bool().unwrap_or(false),
        owner_id: owner.to_string(),
    }
}

fn subnet_item(v: &Value, owner: &str, az: &str) -> SubnetItem {
    SubnetItem {
        subnet_id: text(v, "SubnetId"),
        vpc_id: text(v, "VpcId"),
        cidr_block: text(v, "CidrBlock"),
        availability_zone: az.to_string(),
        available_ip_address_count: v["AvailableIpAddressCount"].as_u64().unwrap_or(0),
        default_for_az: v["DefaultForAz"].as_bool().unwrap_or(false),
        owner_id: owner.to_string(),
    }
}

fn group_item(v: &Value, owner: &str) -> GroupItem {
    GroupItem {
        group_id: text(v, "GroupId"),
        group_name: text(v, "GroupName"),
        description: text(v, "Description"),
        vpc_id: text(v, "VpcId"),
        owner_id: owner.to_string(),
        ingress: list(v, "IpPermissions")
            .iter()
            .map(|p| IpPermission {
                ip_protocol: text(p, "IpProtocol"),
                from_port: p["FromPort"].as_i64().and_then(|n| i32::try_from(n).ok()),
                to_port: p["ToPort"].as_i64().and_then(|n| i32::try_from(n).ok()),
                cidr_ips: list(p, "IpRanges")
                    .iter()
                    .map(|r| text(r, "CidrIp"))
                    .collect(),
            })
            .collect(),
    }
}

/// Filters and pages `items` (JSON), keyed by `id`, rendered by `item`.
fn select<T>(
    items: &[Value],
    id: &str,
    filters: &[Filter],
    page: &Page,
    values: impl Fn(&Value, &str) -> Vec<String>,
    item: impl Fn(&Value) -> T,
) -> Result<(Vec<T>, Option<String>), ControlError> {
    let kept = items
        .iter()
        .filter(|v| matches(filters, |n| values(v, n)))
        .map(|v| (text(v, id), item(v)))
        .collect();
    paginate(kept, page)
}

/// The JSON answer `v` of a translated request, as EC2's answer.
pub(crate) fn render(
    view: View,
    v: &Value,
    owner: &str,
    az: &str,
) -> Result<Ec2Response, ControlError> {
    Ok(match view {
        View::Run => {
            let i = list(v, "Instances").first().ok_or(ControlError::Internal)?;
            Ec2Response::RunInstances(reservation(instance_item(i, az), owner))
        }
        View::DescribeInstances(filters, page) => {
            let (items, next_token) = select(
                list(v, "Instances"),
                "InstanceId",
                &filters,
                &page,
                instance_values,
                |i| instance_item(i, az),
            )?;
            Ec2Response::DescribeInstances {
                reservations: items.into_iter().map(|i| reservation(i, owner)).collect(),
                next_token,
            }
        }
        View::StateChange(make) => make(
            list(v, "Instances")
                .iter()
                .map(|c| StateChange {
                    instance_id: text(c, "InstanceId"),
                    current: instance_state(&text(c, "CurrentState")),
                    previous: instance_state(&text(c, "PreviousState")),
                })
                .collect(),
        ),
        View::Console => Ec2Response::GetConsoleOutput {
            instance_id: text(v, "InstanceId"),
            timestamp_unix: i64::try_from(crate::service::now()).unwrap_or(0),
            output: text(v, "Output").into_bytes(),
        },
        View::CreateVolume => Ec2Response::CreateVolume(volume_item(v, az)),
        View::DescribeVolumes(filters, page) => {
            let (volumes, next_token) = select(
                list(v, "Volumes"),
                "VolumeId",
                &filters,
                &page,
                volume_values,
                |x| volume_item(x, az),
            )?;
            Ec2Response::DescribeVolumes {
                volumes,
                next_token,
            }
        }
        View::Attach(device) => {
            Ec2Response::AttachVolume(attachment(v, &device, AttachmentStateName::Attached))
        }
        View::Detach => Ec2Response::DetachVolume(attachment(
            v,
            ATTACHED_DEVICE,
            AttachmentStateName::Detached,
        )),
        View::DeleteVolume => Ec2Response::DeleteVolume,
        View::CreateVpc => Ec2Response::Vpc(VpcResponse::CreateVpc(vpc_item(&v["Vpc"], owner))),
        View::DescribeVpcs(filters, page) => {
            let values = |x: &Value, n: &str| match n {
                "vpc-id" => vec![text(x, "VpcId")],
                "cidr-block" | "cidr" => vec![text(x, "CidrBlock")],
                "is-default" => vec![text(x, "IsDefault")],
                "state" => vec!["available".to_string()],
                _ => vec![],
            };
            let (vpcs, next_token) =
                select(list(v, "Vpcs"), "VpcId", &filters, &page, values, |x| {
                    vpc_item(x, owner)
                })?;
            Ec2Response::Vpc(VpcResponse::DescribeVpcs { vpcs, next_token })
        }
        View::DeleteVpc => Ec2Response::Vpc(VpcResponse::DeleteVpc),
        View::CreateSubnet => Ec2Response::Vpc(VpcResponse::CreateSubnet(subnet_item(
            &v["Subnet"],
            owner,
            az,
        ))),
        View::DescribeSubnets(filters, page) => {
            let values = |x: &Value, n: &str| match n {
                "subnet-id" => vec![text(x, "SubnetId")],
                "vpc-id" => vec![text(x, "VpcId")],
                "cidr-block" => vec![text(x, "CidrBlock")],
                "default-for-az" => vec![text(x, "DefaultForAz")],
                "state" => vec!["available".to_string()],
                _ => vec![],
            };
            let (subnets, next_token) = select(
                list(v, "Subnets"),
                "SubnetId",
                &filters,
                &page,
                values,
                |x| subnet_item(x, owner, az),
            )?;
            Ec2Response::Vpc(VpcResponse::DescribeSubnets {
                subnets,
                next_token,
            })
        }
        View::DeleteSubnet => Ec2Response::Vpc(VpcResponse::DeleteSubnet),
        View::CreateGroup => Ec2Response::Vpc(VpcResponse::CreateSecurityGroup {
            group_id: text(v, "GroupId"),
        }),
        View::Ingress(true) => Ec2Response::Vpc(VpcResponse::AuthorizeSecurityGroupIngress),
        View::Ingress(false) => Ec2Response::Vpc(VpcResponse::RevokeSecurityGroupIngress),
        View::DescribeGroups(names, filters, page) => {
            let all = list(v, "SecurityGroups");
            if names
                .iter()
                .any(|n| !all.iter().any(|g| &text(g, "GroupName") == n))
            {
                return Err(crate::repo::RepoError::Refused(
                    crate::net_store::NetRefusal::NoSuchGroup,
                )
                .into());
            }
            let named: Vec<Value> = all
                .iter()
                .filter(|g| names.is_empty() || names.contains(&text(g, "GroupName")))
                .cloned()
                .collect();
            let values = |x: &Value, n: &str| match n {
                "group-id" => vec![text(x, "GroupId")],
                "group-name" => vec![text(x, "GroupName")],
                "vpc-id" => vec![text(x, "VpcId")],
                "description" => vec![text(x, "Description")],
                _ => vec![],
            };
            let (groups, next_token) = select(&named, "GroupId", &filters, &page, values, |x| {
                group_item(x, owner)
            })?;
            Ec2Response::Vpc(VpcResponse::DescribeSecurityGroups { groups, next_token })
        }
        View::CreateSnapshot(description) => Ec2Response::Snapshot(
            SnapshotResponse::CreateSnapshot(snapshot_item(v, owner, description)),
        ),
        View::DescribeSnapshots(owners, filters, page) => {
            let all = match owned_by(&owners, owner) {
                true => list(v, "Snapshots"),
                false => &[],
            };
            let values = |x: &Value, n: &str| match n {
                "owner-id" => vec![owner.to_string()],
                _ => snapshot_values(x, n),
            };
            let (snapshots, next_token) =
                select(all, "SnapshotId", &filters, &page, values, |x| {
                    snapshot_item(x, owner, None)
                })?;
            Ec2Response::Snapshot(SnapshotResponse::DescribeSnapshots {
                snapshots,
                next_token,
            })
        }
        View::DeleteSnapshot => Ec2Response::Snapshot(SnapshotResponse::DeleteSnapshot),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_volume_still_creating_is_not_available() {
        let all = json!({"Volumes": [
            {"VolumeId": "vol-1", "State": "creating", "SizeGiB": 2, "SnapshotId": "snap-1"},
            {"VolumeId": "vol-2", "State": "available", "SizeGiB": 1},
        ]});
        let view = View::DescribeVolumes(
            vec![],
            Page {
                max_results: None,
                next_token: None,
            },
        );
        let Ec2Response::DescribeVolumes { volumes, .. } = render(view, &all, "t", "az").unwrap()
        else {
            panic!()
        };
        let states: Vec<&str> = volumes.iter().map(|v| v.state.as_str()).collect();
        assert_eq!(states, ["creating", "available"]);
        assert_eq!(volumes[0].snapshot_id.as_deref(), Some("snap-1"));
    }

    #[test]
    fn describe_filters_and_pages() {
        let all = json!({"Instances": [
            {"InstanceId": "i-3", "State": "running", "VcpuCount": 1, "MemoryMiB": 128},
            {"InstanceId": "i-1", "State": "stopped", "VcpuCount": 1, "MemoryMiB": 128},
            {"InstanceId": "i-2", "State": "running", "VcpuCount": 1, "MemoryMiB": 128},
        ]});
        let f = |n: &str, v: &str| Filter {
            name: n.into(),
            values: vec![v.into()],
        };
        let page = |m: Option<u32>, t: Option<&str>| Page {
            max_results: m,
            next_token: t.map(Into::into),
        };
        let ids = |r: Ec2Response| match r {
            Ec2Response::DescribeInstances {
                reservations,
                next_token,
            } => (
                reservations
                    .iter()
                    .map(|r| r.instances[0].instance_id.clone())
                    .collect::<Vec<_>>(),
                next_token,
            ),
            _ => panic!(),
        };
        let r = render(
            View::DescribeInstances(vec![f("instance-state-name", "running")], page(None, None)),
            &all,
            "t",
            "az",
        )
        .unwrap();
        assert_eq!(ids(r), (vec!["i-2".to_string(), "i-3".into()], None));
        let r = render(
            View::DescribeInstances(vec![], page(Some(2), None)),
            &all,
            "t",
            "az",
        )
        .unwrap();
        assert_eq!(
            ids(r),
            (vec!["i-1".to_string(), "i-2".into()], Some("i-3".into()))
        );
        let r = render(
            View::DescribeInstances(vec![], page(Some(2), Some("i-3"))),
            &all,
            "t",
            "az",
        )
        .unwrap();
        assert_eq!(ids(r), (vec!["i-3".to_string()], None));
        let r = render(
            View::DescribeInstances(
                vec![f("instance-type", "t3.nano"), f("instance-id", "i-1")],
                page(None, None),
            ),
            &all,
            "t",
            "az",
        )
        .unwrap();
        assert_eq!(ids(r).0, ["i-1"]);
    }
}
