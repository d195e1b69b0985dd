//! What this boundary accepts and answers, as data: every action, the wire parameters its parser
//! takes, the XML fields its writer emits, and the EC2 error codes it can answer with.
//!
//! This table is the source of truth for the published model of the Query API
//! (`docs/ec2-query-model.json`, `docs/ec2-query-api.md`, written by `scripts/ec2-model.py` from
//! botocore's own EC2 model restricted to what is listed here). It cannot drift from the code: the
//! unit tests below run every documented parameter through [`crate::Ec2Request::parse`] (each is
//! accepted, each required one is missed when absent, every parameter documented for another
//! action is refused as `UnknownParameter`), and render every answer fully populated through
//! [`crate::Ec2Response::to_xml`] to compare the emitted fields with [`ActionDoc::output`];
//! `tests/ec2_model.rs` runs every member botocore's model has for each action through the parser.
//!
//! Wire names use `N` and `M` for list indexes: `InstanceId.N` is `InstanceId.1`, `InstanceId.2`...

use crate::code::Ec2ErrorCode;
use crate::snapshot::{SnapshotItem, SnapshotResponse, SnapshotStateName};
use crate::vpc::{GroupItem, IpPermission, SubnetItem, VpcItem, VpcResponse};
use crate::xml::{
    AttachmentStateName, Ec2Response, InstanceItem, InstanceStateName, Reservation, StateChange,
    VolumeAttachment, VolumeItem, VolumeStateName,
};

/// One wire parameter of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamDoc {
    /// The wire name, with `N`/`M` for list indexes (`Filter.N.Value.M`).
    pub wire: &'static str,
    /// The action is refused (`MissingParameter`) without it.
    pub required: bool,
    /// Other parameters (wire names of the same action) it is only accepted with.
    pub requires: &'static [&'static str],
    /// A value the parser accepts (used by the tests and shown in the docs).
    pub sample: &'static str,
    /// EC2's API has it (`false`: a Bulkhead extension no AWS SDK sends).
    pub in_ec2: bool,
}

/// One action: what it takes, what it answers, how it can be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionDoc {
    /// The `Action` value.
    pub name: &'static str,
    /// Its parameters besides [`COMMON_PARAMS`].
    pub params: &'static [ParamDoc],
    /// The XML leaf elements of the answer below `<ActionResponse>` (besides `requestId`), as
    /// dotted paths with `item` for list entries; an empty container is listed as a leaf.
    pub output: &'static [&'static str],
    /// The codes the control plane answers this action with besides [`COMMON_ERRORS`] (from its
    /// mapping of refusals, `ec2_code` in `crates/control/src/query.rs`).
    pub errors: &'static [Ec2ErrorCode],
}

/// Parameters every action takes.
pub const COMMON_PARAMS: &[ParamDoc] = &[
    req("Action", "DescribeInstances"),
    req("Version", crate::form::API_VERSION),
    opt("DryRun", "true"),
];

/// Codes any action can answer with: authentication, the form parser's refusals, `DryRun`, and
/// our own failures.
pub const COMMON_ERRORS: &[Ec2ErrorCode] = {
    use Ec2ErrorCode as C;
    &[
        C::MissingAuthenticationToken,
        C::AuthFailure,
        C::IncompleteSignature,
        C::SignatureDoesNotMatch,
        C::RequestExpired,
        C::MalformedQueryString,
        C::InvalidRequest,
        C::MissingAction,
        C::InvalidAction,
        C::MissingParameter,
        C::InvalidParameter,
        C::InvalidParameterValue,
        C::InvalidParameterCombination,
        C::UnknownParameter,
        C::InvalidInstanceIdMalformed,
        C::InvalidVolumeIdMalformed,
        C::InvalidVpcIdMalformed,
        C::InvalidSubnetIdMalformed,
        C::InvalidGroupIdMalformed,
        C::InvalidSnapshotIdMalformed,
        C::DryRunOperation,
        C::InternalError,
        C::Unavailable,
    ]
};

const fn req(wire: &'static str, sample: &'static str) -> ParamDoc {
    ParamDoc {
        wire,
        required: true,
        requires: &[],
        sample,
        in_ec2: true,
    }
}

const fn opt(wire: &'static str, sample: &'static str) -> ParamDoc {
    ParamDoc {
        wire,
        required: false,
        requires: &[],
        sample,
        in_ec2: true,
    }
}

const fn with(
    wire: &'static str,
    sample: &'static str,
    requires: &'static [&'static str],
) -> ParamDoc {
    ParamDoc {
        wire,
        required: false,
        requires,
        sample,
        in_ec2: true,
    }
}

/// Accepted by the parser, but not part of EC2's API for this action.
const fn ext(wire: &'static str, sample: &'static str) -> ParamDoc {
    ParamDoc {
        wire,
        required: false,
        requires: &[],
        sample,
        in_ec2: false,
    }
}

const FILTER_NAME: ParamDoc = with("Filter.N.Name", "vpc-id", &["Filter.N.Value.M"]);
const FILTER_VALUE: ParamDoc = with("Filter.N.Value.M", "vpc-1", &["Filter.N.Name"]);
const MAX_RESULTS: ParamDoc = opt("MaxResults", "5");
const NEXT_TOKEN: ParamDoc = opt("NextToken", "t1");

const INGRESS: &[ParamDoc] = &[
    req("GroupId", "sg-1"),
    req("IpPermissions.N.IpProtocol", "tcp"),
    with(
        "IpPermissions.N.FromPort",
        "22",
        &["IpPermissions.N.IpProtocol"],
    ),
    with(
        "IpPermissions.N.ToPort",
        "22",
        &["IpPermissions.N.IpProtocol"],
    ),
    with(
        "IpPermissions.N.IpRanges.M.CidrIp",
        "10.0.0.0/8",
        &["IpPermissions.N.IpProtocol"],
    ),
    with(
        "IpPermissions.N.IpRanges.M.Description",
        "ssh",
        &[
            "IpPermissions.N.IpProtocol",
            "IpPermissions.N.IpRanges.M.CidrIp",
        ],
    ),
];

const STATE_CHANGE: &[&str] = &[
    "instancesSet.item.instanceId",
    "instancesSet.item.currentState.code",
    "instancesSet.item.currentState.name",
    "instancesSet.item.previousState.code",
    "instancesSet.item.previousState.name",
];

const ATTACHMENT: &[&str] = &[
    "volumeId",
    "instanceId",
    "device",
    "status",
    "attachTime",
    "deleteOnTermination",
];

const RETURN: &[&str] = &["return"];

/// Every action the parser takes, in the order of [`crate::Ec2Request`].
pub const ACTIONS: &[ActionDoc] = {
    use Ec2ErrorCode as C;
    &[
        ActionDoc {
            name: "RunInstances",
            params: &[
                req("ImageId", "ami-1"),
                req("MinCount", "1"),
                req("MaxCount", "1"),
                opt("InstanceType", "t3.micro"),
                opt("UserData", "aGk="),
                opt("ClientToken", "tok-1"),
                opt("SubnetId", "subnet-1"),
                opt("SecurityGroupId.N", "sg-1"),
                opt("Placement.AvailabilityZone", "bh-1a"),
            ],
            output: &[
                "reservationId",
                "ownerId",
                "groupSet",
                "instancesSet.item.instanceId",
                "instancesSet.item.imageId",
                "instancesSet.item.instanceState.code",
                "instancesSet.item.instanceState.name",
                "instancesSet.item.instanceType",
                "instancesSet.item.launchTime",
                "instancesSet.item.placement.availabilityZone",
                "instancesSet.item.subnetId",
                "instancesSet.item.privateIpAddress",
                "instancesSet.item.groupSet.item.groupId",
            ],
            errors: &[
                C::InvalidAmiIdNotFound,
                C::InvalidSubnetIdNotFound,
                C::InvalidGroupNotFound,
                C::InsufficientInstanceCapacity,
                C::InsufficientFreeAddressesInSubnet,
                C::IdempotentParameterMismatch,
            ],
        },
        ActionDoc {
            name: "DescribeInstances",
            params: &[
                opt("InstanceId.N", "i-1"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "reservationSet.item.reservationId",
                "reservationSet.item.ownerId",
                "reservationSet.item.groupSet",
                "reservationSet.item.instancesSet.item.instanceId",
                "reservationSet.item.instancesSet.item.imageId",
                "reservationSet.item.instancesSet.item.instanceState.code",
                "reservationSet.item.instancesSet.item.instanceState.name",
                "reservationSet.item.instancesSet.item.instanceType",
                "reservationSet.item.instancesSet.item.launchTime",
                "reservationSet.item.instancesSet.item.placement.availabilityZone",
                "reservationSet.item.instancesSet.item.subnetId",
                "reservationSet.item.instancesSet.item.privateIpAddress",
                "reservationSet.item.instancesSet.item.groupSet.item.groupId",
                "nextToken",
            ],
            errors: &[C::InvalidInstanceIdNotFound],
        },
        ActionDoc {
            name: "StartInstances",
            params: &[req("InstanceId.N", "i-1")],
            output: STATE_CHANGE,
            errors: &[C::InvalidInstanceIdNotFound, C::IncorrectInstanceState],
        },
        ActionDoc {
            name: "StopInstances",
            params: &[
                req("InstanceId.N", "i-1"),
                opt("Force", "true"),
                opt("Hibernate", "false"),
            ],
            output: STATE_CHANGE,
            errors: &[C::InvalidInstanceIdNotFound, C::IncorrectInstanceState],
        },
        ActionDoc {
            name: "TerminateInstances",
            params: &[req("InstanceId.N", "i-1")],
            output: STATE_CHANGE,
            errors: &[C::InvalidInstanceIdNotFound, C::IncorrectInstanceState],
        },
        ActionDoc {
            name: "GetConsoleOutput",
            params: &[req("InstanceId", "i-1"), opt("Latest", "true")],
            output: &["instanceId", "timestamp", "output"],
            errors: &[C::InvalidInstanceIdNotFound],
        },
        ActionDoc {
            name: "CreateVolume",
            params: &[
                req("Size", "8"),
                req("AvailabilityZone", "bh-1a"),
                opt("Encrypted", "true"),
                with("KmsKeyId", "key-1", &["Encrypted"]),
                opt("SnapshotId", "snap-1"),
                opt("VolumeType", "gp3"),
                opt("ClientToken", "tok-1"),
            ],
            output: &[
                "volumeId",
                "size",
                "snapshotId",
                "availabilityZone",
                "status",
                "createTime",
                "volumeType",
                "encrypted",
                "kmsKeyId",
                "attachmentSet.item.volumeId",
                "attachmentSet.item.instanceId",
                "attachmentSet.item.device",
                "attachmentSet.item.status",
                "attachmentSet.item.attachTime",
                "attachmentSet.item.deleteOnTermination",
            ],
            errors: &[
                C::InvalidKmsKeyNotFound,
                C::InvalidSnapshotNotFound,
                C::IdempotentParameterMismatch,
            ],
        },
        ActionDoc {
            name: "DescribeVolumes",
            params: &[
                opt("VolumeId.N", "vol-1"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "volumeSet.item.volumeId",
                "volumeSet.item.size",
                "volumeSet.item.snapshotId",
                "volumeSet.item.availabilityZone",
                "volumeSet.item.status",
                "volumeSet.item.createTime",
                "volumeSet.item.volumeType",
                "volumeSet.item.encrypted",
                "volumeSet.item.kmsKeyId",
                "volumeSet.item.attachmentSet.item.volumeId",
                "volumeSet.item.attachmentSet.item.instanceId",
                "volumeSet.item.attachmentSet.item.device",
                "volumeSet.item.attachmentSet.item.status",
                "volumeSet.item.attachmentSet.item.attachTime",
                "volumeSet.item.attachmentSet.item.deleteOnTermination",
                "nextToken",
            ],
            errors: &[C::InvalidVolumeNotFound],
        },
        ActionDoc {
            name: "AttachVolume",
            params: &[
                req("VolumeId", "vol-1"),
                req("InstanceId", "i-1"),
                req("Device", "/dev/vdb"),
            ],
            output: ATTACHMENT,
            errors: &[
                C::InvalidVolumeNotFound,
                C::InvalidInstanceIdNotFound,
                C::VolumeInUse,
                C::IncorrectState,
                C::UnauthorizedOperation,
            ],
        },
        ActionDoc {
            name: "DetachVolume",
            params: &[
                req("VolumeId", "vol-1"),
                opt("InstanceId", "i-1"),
                opt("Device", "/dev/vdb"),
                opt("Force", "true"),
            ],
            output: ATTACHMENT,
            errors: &[C::InvalidVolumeNotFound, C::IncorrectState],
        },
        ActionDoc {
            name: "DeleteVolume",
            params: &[req("VolumeId", "vol-1")],
            output: RETURN,
            errors: &[C::InvalidVolumeNotFound, C::VolumeInUse],
        },
        ActionDoc {
            name: "CreateVpc",
            params: &[req("CidrBlock", "10.1.0.0/16"), ext("ClientToken", "tok-1")],
            output: &[
                "vpc.vpcId",
                "vpc.ownerId",
                "vpc.state",
                "vpc.cidrBlock",
                "vpc.dhcpOptionsId",
                "vpc.instanceTenancy",
                "vpc.isDefault",
            ],
            errors: &[C::InvalidVpcRange, C::IdempotentParameterMismatch],
        },
        ActionDoc {
            name: "DescribeVpcs",
            params: &[
                opt("VpcId.N", "vpc-1"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "vpcSet.item.vpcId",
                "vpcSet.item.ownerId",
                "vpcSet.item.state",
                "vpcSet.item.cidrBlock",
                "vpcSet.item.dhcpOptionsId",
                "vpcSet.item.instanceTenancy",
                "vpcSet.item.isDefault",
                "nextToken",
            ],
            errors: &[C::InvalidVpcIdNotFound],
        },
        ActionDoc {
            name: "DeleteVpc",
            params: &[req("VpcId", "vpc-1")],
            output: RETURN,
            errors: &[C::InvalidVpcIdNotFound, C::DependencyViolation],
        },
        ActionDoc {
            name: "CreateSubnet",
            params: &[
                req("VpcId", "vpc-1"),
                req("CidrBlock", "10.1.1.0/24"),
                opt("AvailabilityZone", "bh-1a"),
                ext("ClientToken", "tok-1"),
            ],
            output: &[
                "subnet.subnetId",
                "subnet.ownerId",
                "subnet.state",
                "subnet.vpcId",
                "subnet.cidrBlock",
                "subnet.availableIpAddressCount",
                "subnet.availabilityZone",
                "subnet.defaultForAz",
                "subnet.mapPublicIpOnLaunch",
            ],
            errors: &[
                C::InvalidVpcIdNotFound,
                C::InvalidSubnetRange,
                C::InvalidSubnetConflict,
                C::IdempotentParameterMismatch,
            ],
        },
        ActionDoc {
            name: "DescribeSubnets",
            params: &[
                opt("SubnetId.N", "subnet-1"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "subnetSet.item.subnetId",
                "subnetSet.item.ownerId",
                "subnetSet.item.state",
                "subnetSet.item.vpcId",
                "subnetSet.item.cidrBlock",
                "subnetSet.item.availableIpAddressCount",
                "subnetSet.item.availabilityZone",
                "subnetSet.item.defaultForAz",
                "subnetSet.item.mapPublicIpOnLaunch",
                "nextToken",
            ],
            errors: &[C::InvalidSubnetIdNotFound],
        },
        ActionDoc {
            name: "DeleteSubnet",
            params: &[req("SubnetId", "subnet-1")],
            output: RETURN,
            errors: &[C::InvalidSubnetIdNotFound, C::DependencyViolation],
        },
        ActionDoc {
            name: "CreateSecurityGroup",
            params: &[
                req("GroupName", "web"),
                req("GroupDescription", "front end"),
                req("VpcId", "vpc-1"),
            ],
            output: &["return", "groupId"],
            errors: &[C::InvalidVpcIdNotFound, C::InvalidGroupDuplicate],
        },
        ActionDoc {
            name: "AuthorizeSecurityGroupIngress",
            params: INGRESS,
            output: RETURN,
            errors: &[
                C::InvalidGroupNotFound,
                C::InvalidPermissionDuplicate,
                C::RulesPerSecurityGroupLimitExceeded,
            ],
        },
        ActionDoc {
            name: "RevokeSecurityGroupIngress",
            params: INGRESS,
            output: RETURN,
            errors: &[C::InvalidGroupNotFound, C::InvalidPermissionNotFound],
        },
        ActionDoc {
            name: "DescribeSecurityGroups",
            params: &[
                opt("GroupId.N", "sg-1"),
                opt("GroupName.N", "default"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "securityGroupInfo.item.ownerId",
                "securityGroupInfo.item.groupId",
                "securityGroupInfo.item.groupName",
                "securityGroupInfo.item.groupDescription",
                "securityGroupInfo.item.vpcId",
                "securityGroupInfo.item.ipPermissions.item.ipProtocol",
                "securityGroupInfo.item.ipPermissions.item.fromPort",
                "securityGroupInfo.item.ipPermissions.item.toPort",
                "securityGroupInfo.item.ipPermissions.item.groups",
                "securityGroupInfo.item.ipPermissions.item.ipRanges.item.cidrIp",
                "securityGroupInfo.item.ipPermissionsEgress.item.ipProtocol",
                "securityGroupInfo.item.ipPermissionsEgress.item.groups",
                "securityGroupInfo.item.ipPermissionsEgress.item.ipRanges.item.cidrIp",
                "nextToken",
            ],
            errors: &[C::InvalidGroupNotFound],
        },
        ActionDoc {
            name: "CreateSnapshot",
            params: &[req("VolumeId", "vol-1"), opt("Description", "nightly")],
            output: &[
                "snapshotId",
                "volumeId",
                "status",
                "startTime",
                "progress",
                "ownerId",
                "description",
                "volumeSize",
                "encrypted",
                "kmsKeyId",
            ],
            errors: &[
                C::InvalidVolumeNotFound,
                C::VolumeInUse,
                C::UnauthorizedOperation,
            ],
        },
        ActionDoc {
            name: "DescribeSnapshots",
            params: &[
                opt("SnapshotId.N", "snap-1"),
                opt("Owner.N", "self"),
                FILTER_NAME,
                FILTER_VALUE,
                MAX_RESULTS,
                NEXT_TOKEN,
            ],
            output: &[
                "snapshotSet.item.snapshotId",
                "snapshotSet.item.volumeId",
                "snapshotSet.item.status",
                "snapshotSet.item.startTime",
                "snapshotSet.item.progress",
                "snapshotSet.item.ownerId",
                "snapshotSet.item.description",
                "snapshotSet.item.volumeSize",
                "snapshotSet.item.encrypted",
                "snapshotSet.item.kmsKeyId",
                "nextToken",
            ],
            errors: &[C::InvalidSnapshotNotFound],
        },
        ActionDoc {
            name: "DeleteSnapshot",
            params: &[req("SnapshotId", "snap-1")],
            output: RETURN,
            errors: &[
                C::InvalidSnapshotNotFound,
                C::IncorrectState,
                C::UnauthorizedOperation,
            ],
        },
    ]
};

/// The documented action of that name.
pub fn action(name: &str) -> Option<&'static ActionDoc> {
    ACTIONS.iter().find(|a| a.name == name)
}

/// The wire key of a parameter with every `N`/`M` index set to `1`.
pub fn first_key(wire: &str) -> String {
    wire.split('.')
        .map(|part| match part {
            "N" | "M" => "1",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn attachment() -> VolumeAttachment {
    VolumeAttachment {
        volume_id: "vol-1".into(),
        instance_id: "i-1".into(),
        device: "/dev/vdb".into(),
        state: AttachmentStateName::Attached,
        attach_time_unix: 1,
        delete_on_termination: false,
    }
}

fn volume() -> VolumeItem {
    VolumeItem {
        volume_id: "vol-1".into(),
        size_gib: 8,
        availability_zone: "bh-1a".into(),
        state: VolumeStateName::InUse,
        create_time_unix: 1,
        volume_type: "gp3".into(),
        encrypted: true,
        kms_key_id: Some("key-1".into()),
        snapshot_id: Some("snap-1".into()),
        attachments: vec![attachment()],
    }
}

fn snapshot() -> SnapshotItem {
    SnapshotItem {
        snapshot_id: "snap-1".into(),
        volume_id: "vol-1".into(),
        state: SnapshotStateName::Completed,
        start_time_unix: 1,
        volume_size_gib: 8,
        owner_id: "t".into(),
        description: Some("nightly".into()),
        kms_key_id: Some("key-1".into()),
    }
}

fn reservation() -> Reservation {
    Reservation {
        reservation_id: "r-1".into(),
        owner_id: "t".into(),
        instances: vec![InstanceItem {
            instance_id: "i-1".into(),
            image_id: "ami-1".into(),
            state: InstanceStateName::Running,
            instance_type: "t3.micro".into(),
            launch_time_unix: 1,
            availability_zone: "bh-1a".into(),
            subnet_id: Some("subnet-1".into()),
            private_ip: Some("10.0.0.5".into()),
            security_group_ids: vec!["sg-1".into()],
        }],
    }
}

fn changes() -> Vec<StateChange> {
    vec![StateChange {
        instance_id: "i-1".into(),
        current: InstanceStateName::Stopping,
        previous: InstanceStateName::Running,
    }]
}

fn vpc() -> VpcItem {
    VpcItem {
        vpc_id: "vpc-1".into(),
        cidr_block: "10.0.0.0/16".into(),
        is_default: false,
        owner_id: "t".into(),
    }
}

fn subnet() -> SubnetItem {
    SubnetItem {
        subnet_id: "subnet-1".into(),
        vpc_id: "vpc-1".into(),
        cidr_block: "10.0.1.0/24".into(),
        availability_zone: "bh-1a".into(),
        available_ip_address_count: 250,
        default_for_az: false,
        owner_id: "t".into(),
    }
}

/// An example answer to `action` with every optional field present and one item in every list
/// (what the tests render to check [`ActionDoc::output`]); `None` for an action not in [`ACTIONS`].
pub fn example_response(action: &str) -> Option<Ec2Response> {
    let next = Some("n".to_owned());
    Some(match action {
        "RunInstances" => Ec2Response::RunInstances(reservation()),
        "DescribeInstances" => Ec2Response::DescribeInstances {
            reservations: vec![reservation()],
            next_token: next,
        },
        "StartInstances" => Ec2Response::StartInstances(changes()),
        "StopInstances" => Ec2Response::StopInstances(changes()),
        "TerminateInstances" => Ec2Response::TerminateInstances(changes()),
        "GetConsoleOutput" => Ec2Response::GetConsoleOutput {
            instance_id: "i-1".into(),
            timestamp_unix: 1,
            output: b"boot".to_vec(),
        },
        "CreateVolume" => Ec2Response::CreateVolume(volume()),
        "DescribeVolumes" => Ec2Response::DescribeVolumes {
            volumes: vec![volume()],
            next_token: next,
        },
        "AttachVolume" => Ec2Response::AttachVolume(attachment()),
        "DetachVolume" => Ec2Response::DetachVolume(attachment()),
        "DeleteVolume" => Ec2Response::DeleteVolume,
        "CreateVpc" => Ec2Response::Vpc(VpcResponse::CreateVpc(vpc())),
        "DescribeVpcs" => Ec2Response::Vpc(VpcResponse::DescribeVpcs {
            vpcs: vec![vpc()],
            next_token: next,
        }),
        "DeleteVpc" => Ec2Response::Vpc(VpcResponse::DeleteVpc),
        "CreateSubnet" => Ec2Response::Vpc(VpcResponse::CreateSubnet(subnet())),
        "DescribeSubnets" => Ec2Response::Vpc(VpcResponse::DescribeSubnets {
            subnets: vec![subnet()],
            next_token: next,
        }),
        "DeleteSubnet" => Ec2Response::Vpc(VpcResponse::DeleteSubnet),
        "CreateSecurityGroup" => Ec2Response::Vpc(VpcResponse::CreateSecurityGroup {
            group_id: "sg-1".into(),
        }),
        "AuthorizeSecurityGroupIngress" => {
            Ec2Response::Vpc(VpcResponse::AuthorizeSecurityGroupIngress)
        }
        "RevokeSecurityGroupIngress" => Ec2Response::Vpc(VpcResponse::RevokeSecurityGroupIngress),
        "DescribeSecurityGroups" => Ec2Response::Vpc(VpcResponse::DescribeSecurityGroups {
            groups: vec![GroupItem {
                group_id: "sg-1".into(),
                group_name: "web".into(),
                description: "d".into(),
                vpc_id: "vpc-1".into(),
                owner_id: "t".into(),
                ingress: vec![IpPermission {
                    ip_protocol: "tcp".into(),
                    from_port: Some(22),
                    to_port: Some(22),
                    cidr_ips: vec!["10.0.0.0/8".into()],
                }],
            }],
            next_token: next,
        }),
        "CreateSnapshot" => Ec2Response::Snapshot(SnapshotResponse::CreateSnapshot(snapshot())),
        "DescribeSnapshots" => Ec2Response::Snapshot(SnapshotResponse::DescribeSnapshots {
            snapshots: vec![snapshot()],
            next_token: next,
        }),
        "DeleteSnapshot" => Ec2Response::Snapshot(SnapshotResponse::DeleteSnapshot),
        _ => return None,
    })
}

/// Appends `s` as a JSON string (the table holds only static ASCII text, but escape anyway).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_list<T>(out: &mut String, items: &[T], mut each: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        each(out, item);
    }
    out.push(']');
}

fn json_param(out: &mut String, p: &ParamDoc) {
    out.push_str("{\"wire\": ");
    json_str(out, p.wire);
    out.push_str(", \"required\": ");
    out.push_str(if p.required { "true" } else { "false" });
    out.push_str(", \"requires\": ");
    json_list(out, p.requires, |o, r| json_str(o, r));
    out.push_str(", \"sample\": ");
    json_str(out, p.sample);
    out.push_str(", \"in_ec2\": ");
    out.push_str(if p.in_ec2 { "true" } else { "false" });
    out.push('}');
}

fn json_codes(out: &mut String, codes: &[Ec2ErrorCode]) {
    json_list(out, codes, |o, c| json_str(o, c.as_str()));
}

/// The whole table as JSON (what `scripts/ec2-model.py` reads, through
/// `cargo run -p bulkhead-ec2-query --example doc-table`).
pub fn table_json() -> String {
    let mut out = String::from("{\n  \"api_version\": ");
    json_str(&mut out, crate::form::API_VERSION);
    out.push_str(",\n  \"common_params\": ");
    json_list(&mut out, COMMON_PARAMS, json_param);
    out.push_str(",\n  \"common_errors\": ");
    json_codes(&mut out, COMMON_ERRORS);
    out.push_str(",\n  \"actions\": [");
    for (i, a) in ACTIONS.iter().enumerate() {
        out.push_str(if i == 0 { "\n    " } else { ",\n    " });
        out.push_str("{\"name\": ");
        json_str(&mut out, a.name);
        out.push_str(", \"params\": ");
        json_list(&mut out, a.params, json_param);
        out.push_str(", \"output\": ");
        json_list(&mut out, a.output, |o, f| json_str(o, f));
        out.push_str(", \"errors\": ");
        json_codes(&mut out, a.errors);
        out.push('}');
    }
    out.push_str("\n  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::collections::BTreeSet;

    use super::*;
    use crate::form::{Ec2Request, QueryError};

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    }

    /// `Action=…&Version=…` and `params` (wire name, value), form-encoded.
    fn body(action: &str, params: &[(String, &str)]) -> String {
        let mut out = format!("Action={action}&Version={}", crate::form::API_VERSION);
        for (k, v) in params {
            out.push_str(&format!("&{}={}", encode(k), encode(v)));
        }
        out
    }

    fn param<'a>(a: &'a ActionDoc, wire: &str) -> &'a ParamDoc {
        a.params.iter().find(|p| p.wire == wire).unwrap_or_else(|| {
            panic!(
                "{}: {wire} is required by a parameter but not listed",
                a.name
            )
        })
    }

    /// The required parameters, plus `extra` and what each of them requires.
    fn with_params(a: &ActionDoc, extra: &[&ParamDoc]) -> Vec<(String, &'static str)> {
        let mut keys: Vec<&ParamDoc> = a.params.iter().filter(|p| p.required).collect();
        for p in extra {
            keys.push(p);
            keys.extend(p.requires.iter().map(|r| param(a, r)));
        }
        let mut seen = BTreeSet::new();
        keys.into_iter()
            .filter(|p| seen.insert(p.wire))
            .map(|p| (first_key(p.wire), p.sample))
            .collect()
    }

    fn parse(a: &ActionDoc, params: &[(String, &str)]) -> Result<crate::Ec2Call, QueryError> {
        Ec2Request::parse(body(a.name, params).as_bytes())
    }

    #[test]
    fn every_documented_action_and_parameter_is_accepted() {
        let names: BTreeSet<&str> = ACTIONS.iter().map(|a| a.name).collect();
        assert_eq!(names.len(), ACTIONS.len(), "an action is listed twice");
        for a in ACTIONS {
            let call = parse(a, &with_params(a, &[])).unwrap_or_else(|e| panic!("{}: {e}", a.name));
            assert_eq!(call.request.action(), a.name);
            assert!(!call.dry_run);
            let mut wires = BTreeSet::new();
            for p in a.params {
                assert!(wires.insert(p.wire), "{}: {} listed twice", a.name, p.wire);
                let params = with_params(a, &[p]);
                let call = parse(a, &params)
                    .unwrap_or_else(|e| panic!("{}: documented {} refused: {e}", a.name, p.wire));
                assert_eq!(call.request.action(), a.name);
            }
            let mut all = with_params(a, &[]);
            all.push(("DryRun".into(), "true"));
            assert!(parse(a, &all).unwrap().dry_run, "{}: DryRun", a.name);
        }
    }

    #[test]
    fn every_required_parameter_is_required() {
        for a in ACTIONS {
            let full = with_params(a, &[]);
            for p in a.params.iter().filter(|p| p.required) {
                let key = first_key(p.wire);
                let without: Vec<_> = full.iter().filter(|(k, _)| *k != key).cloned().collect();
                match parse(a, &without) {
                    Err(QueryError::MissingParameter(_)) => {}
                    other => panic!("{}: without {} gives {other:?}", a.name, p.wire),
                }
            }
        }
    }

    #[test]
    fn no_undocumented_parameter_is_accepted() {
        let mut candidates: Vec<&ParamDoc> = ACTIONS.iter().flat_map(|a| a.params).collect();
        let extra = [
            opt("Foo", "1"),
            opt("Filter.N.Other", "x"),
            opt("TagSpecification.N.ResourceType", "instance"),
            opt("IpPermissions.N.UserIdGroupPairs.M.GroupId", "sg-2"),
            opt("IpPermissions.N.Ipv6Ranges.M.CidrIpv6", "::/0"),
        ];
        candidates.extend(extra.iter());
        for a in ACTIONS {
            for c in &candidates {
                if a.params.iter().any(|p| p.wire == c.wire) {
                    continue;
                }
                let mut params = with_params(a, &[]);
                params.push((first_key(c.wire), c.sample));
                if c.wire.starts_with("IpPermissions.N.") {
                    // Under a documented permission, so only the unknown member is left over.
                    params.push(("IpPermissions.1.IpProtocol".into(), "tcp"));
                }
                let mut seen = BTreeSet::new();
                params.retain(|(k, _)| seen.insert(k.clone()));
                match parse(a, &params) {
                    Err(QueryError::UnknownParameter) => {}
                    other => panic!("{}: undocumented {} gives {other:?}", a.name, c.wire),
                }
            }
        }
    }

    /// The dotted paths of the elements with no child element, below the root and `requestId`.
    fn leaf_paths(xml: &str) -> BTreeSet<String> {
        let body = xml.split_once("?>").map_or(xml, |(_, b)| b);
        let mut stack: Vec<String> = Vec::new();
        let mut has_child: Vec<bool> = Vec::new();
        let mut out = BTreeSet::new();
        let mut rest = body;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').unwrap() + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.last().map(String::as_str), Some(name));
                if !has_child.pop().unwrap() && stack.len() > 1 {
                    out.insert(stack[1..].join("."));
                }
                stack.pop();
            } else {
                let name = tag.split(' ').next().unwrap();
                if let Some(parent) = has_child.last_mut() {
                    *parent = true;
                }
                stack.push(name.to_owned());
                has_child.push(false);
            }
        }
        assert!(stack.is_empty(), "unbalanced: {xml}");
        out.remove("requestId");
        out
    }

    #[test]
    fn documented_output_is_what_the_writer_emits() {
        for a in ACTIONS {
            let r = example_response(a.name).unwrap();
            assert_eq!(r.action(), a.name);
            let emitted = leaf_paths(&r.to_xml("req-1"));
            let documented: BTreeSet<String> = a.output.iter().map(|s| (*s).to_owned()).collect();
            assert_eq!(
                documented.len(),
                a.output.len(),
                "{}: a field listed twice",
                a.name
            );
            assert_eq!(emitted, documented, "{}", a.name);
        }
    }

    #[test]
    fn table_json_is_json() {
        let v: serde_json::Value = serde_json::from_str(&table_json()).unwrap();
        assert_eq!(v["actions"].as_array().unwrap().len(), ACTIONS.len());
        assert_eq!(v["actions"][0]["params"][0]["wire"], "ImageId");
    }
}
