//! botocore's own EC2 Query serializer (with the EC2 service model shipped in botocore) produces
//! the request bodies; the Rust parser turns each into the expected typed request.

mod common;

use bulkhead_ec2_query::form::{
    AttachVolume, CreateVolume, DescribeInstances, DescribeVolumes, DetachVolume, Filter,
    GetConsoleOutput, InstanceId, Page, RunInstances, SnapshotId, StopInstances, VolumeId,
};
use bulkhead_ec2_query::snapshot::{CreateSnapshot, DescribeSnapshots};
use bulkhead_ec2_query::{Ec2Call, Ec2Request};
use serde_json::json;

fn iid(s: &str) -> InstanceId {
    InstanceId::parse(s).expect("valid instance id")
}

fn vid(s: &str) -> VolumeId {
    VolumeId::parse(s).expect("valid volume id")
}

fn sid(s: &str) -> SnapshotId {
    SnapshotId::parse(s).expect("valid snapshot id")
}

fn call(request: Ec2Request) -> Ec2Call {
    Ec2Call {
        dry_run: false,
        request,
    }
}

#[test]
fn botocore_serialized_bodies_parse_into_the_expected_requests() {
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let user_data = "#!/bin/sh\necho 'hi ü' > /tmp/x && exit 0\n";
    let many: Vec<String> = (1..=12).map(|i| format!("i-{i:x}0")).collect();
    let cases: Vec<(serde_json::Value, Ec2Call)> = vec![
        (
            json!({"op": "RunInstances", "params": {
                "ImageId": "ami-1", "MinCount": 1, "MaxCount": 2, "InstanceType": "t3.micro",
                "UserData": base64_std(user_data.as_bytes()), "ClientToken": "tok-1",
                "SecurityGroupIds": ["sg-a", "sg-b"], "SubnetId": "subnet-1",
                "Placement": {"AvailabilityZone": "bh-1a"}, "DryRun": true}}),
            Ec2Call {
                dry_run: true,
                request: Ec2Request::RunInstances(RunInstances {
                    image_id: "ami-1".into(),
                    min_count: 1,
                    max_count: 2,
                    instance_type: Some("t3.micro".into()),
                    user_data: Some(user_data.as_bytes().to_vec()),
                    client_token: Some("tok-1".into()),
                    subnet_id: Some("subnet-1".into()),
                    security_group_ids: vec!["sg-a".into(), "sg-b".into()],
                    availability_zone: Some("bh-1a".into()),
                }),
            },
        ),
        (
            json!({"op": "DescribeInstances", "params": {
                "Filters": [{"Name": "instance-state-name", "Values": ["running", "pending"]},
                            {"Name": "tag:Name", "Values": ["my box & co=1 +%"]}],
                "MaxResults": 10, "NextToken": "tok/+=="}}),
            call(Ec2Request::DescribeInstances(DescribeInstances {
                instance_ids: vec![],
                filters: vec![
                    Filter {
                        name: "instance-state-name".into(),
                        values: vec!["running".into(), "pending".into()],
                    },
                    Filter {
                        name: "tag:Name".into(),
                        values: vec!["my box & co=1 +%".into()],
                    },
                ],
                page: Page {
                    max_results: Some(10),
                    next_token: Some("tok/+==".into()),
                },
            })),
        ),
        (
            json!({"op": "DescribeInstances", "params": {"InstanceIds": many}}),
            call(Ec2Request::DescribeInstances(DescribeInstances {
                instance_ids: many.iter().map(|s| iid(s)).collect(),
                filters: vec![],
                page: Page::default(),
            })),
        ),
        (
            json!({"op": "StartInstances", "params": {"InstanceIds": ["i-1", "i-2"]}}),
            call(Ec2Request::StartInstances {
                instance_ids: vec![iid("i-1"), iid("i-2")],
            }),
        ),
        (
            json!({"op": "StopInstances", "params": {"InstanceIds": ["i-1"], "Force": true}}),
            call(Ec2Request::StopInstances(StopInstances {
                instance_ids: vec![iid("i-1")],
                force: true,
                hibernate: false,
            })),
        ),
        (
            json!({"op": "TerminateInstances", "params": {"InstanceIds": ["i-9"]}}),
            call(Ec2Request::TerminateInstances {
                instance_ids: vec![iid("i-9")],
            }),
        ),
        (
            json!({"op": "GetConsoleOutput", "params": {"InstanceId": "i-3", "Latest": true}}),
            call(Ec2Request::GetConsoleOutput(GetConsoleOutput {
                instance_id: iid("i-3"),
                latest: true,
            })),
        ),
        (
            json!({"op": "CreateVolume", "params": {"Size": 8, "AvailabilityZone": "bh-1a",
                "Encrypted": true, "KmsKeyId": "key-1", "VolumeType": "gp3", "ClientToken": "c1"}}),
            call(Ec2Request::CreateVolume(CreateVolume {
                size_gib: 8,
                availability_zone: "bh-1a".into(),
                encrypted: true,
                kms_key_id: Some("key-1".into()),
                snapshot_id: None,
                volume_type: Some("gp3".into()),
                client_token: Some("c1".into()),
            })),
        ),
        (
            json!({"op": "CreateVolume", "params": {"Size": 4, "AvailabilityZone": "bh-1a",
                "SnapshotId": "snap-0a"}}),
            call(Ec2Request::CreateVolume(CreateVolume {
                size_gib: 4,
                availability_zone: "bh-1a".into(),
                encrypted: false,
                kms_key_id: None,
                snapshot_id: Some(sid("snap-0a")),
                volume_type: None,
                client_token: None,
            })),
        ),
        (
            json!({"op": "CreateSnapshot", "params": {"VolumeId": "vol-3",
                "Description": "nightly & <co> +%"}}),
            call(Ec2Request::CreateSnapshot(CreateSnapshot {
                volume_id: vid("vol-3"),
                description: Some("nightly & <co> +%".into()),
            })),
        ),
        (
            json!({"op": "DescribeSnapshots", "params": {"SnapshotIds": ["snap-1", "snap-2"],
                "OwnerIds": ["self"],
                "Filters": [{"Name": "volume-id", "Values": ["vol-3"]}]}}),
            call(Ec2Request::DescribeSnapshots(DescribeSnapshots {
                snapshot_ids: vec![sid("snap-1"), sid("snap-2")],
                owner_ids: vec!["self".into()],
                filters: vec![Filter {
                    name: "volume-id".into(),
                    values: vec!["vol-3".into()],
                }],
                page: Page::default(),
            })),
        ),
        (
            json!({"op": "DescribeSnapshots", "params": {"MaxResults": 5, "NextToken": "snap-9"}}),
            call(Ec2Request::DescribeSnapshots(DescribeSnapshots {
                snapshot_ids: vec![],
                owner_ids: vec![],
                filters: vec![],
                page: Page {
                    max_results: Some(5),
                    next_token: Some("snap-9".into()),
                },
            })),
        ),
        (
            json!({"op": "DeleteSnapshot", "params": {"SnapshotId": "snap-7"}}),
            call(Ec2Request::DeleteSnapshot {
                snapshot_id: sid("snap-7"),
            }),
        ),
        (
            json!({"op": "DescribeVolumes", "params": {"VolumeIds": ["vol-1", "vol-2"]}}),
            call(Ec2Request::DescribeVolumes(DescribeVolumes {
                volume_ids: vec![vid("vol-1"), vid("vol-2")],
                filters: vec![],
                page: Page::default(),
            })),
        ),
        (
            json!({"op": "DescribeVolumes", "params": {"Filters": [{"Name": "attachment.instance-id", "Values": ["i-1"]}], "MaxResults": 5, "NextToken": "n"}}),
            call(Ec2Request::DescribeVolumes(DescribeVolumes {
                volume_ids: vec![],
                filters: vec![Filter {
                    name: "attachment.instance-id".into(),
                    values: vec!["i-1".into()],
                }],
                page: Page {
                    max_results: Some(5),
                    next_token: Some("n".into()),
                },
            })),
        ),
        (
            json!({"op": "AttachVolume", "params": {"VolumeId": "vol-1", "InstanceId": "i-1", "Device": "/dev/sdf"}}),
            call(Ec2Request::AttachVolume(AttachVolume {
                volume_id: vid("vol-1"),
                instance_id: iid("i-1"),
                device: "/dev/sdf".into(),
            })),
        ),
        (
            json!({"op": "DetachVolume", "params": {"VolumeId": "vol-1", "InstanceId": "i-1", "Force": false}}),
            call(Ec2Request::DetachVolume(DetachVolume {
                volume_id: vid("vol-1"),
                instance_id: Some(iid("i-1")),
                device: None,
                force: false,
            })),
        ),
        (
            json!({"op": "DeleteVolume", "params": {"VolumeId": "vol-7"}}),
            call(Ec2Request::DeleteVolume {
                volume_id: vid("vol-7"),
            }),
        ),
    ];
    let input = serde_json::Value::Array(cases.iter().map(|(j, _)| j.clone()).collect());
    let bodies = common::run_json(
        python,
        "ec2_serialize.py",
        &[],
        input.to_string().as_bytes(),
    );
    let bodies = bodies.as_array().expect("a list");
    assert_eq!(bodies.len(), cases.len());
    for ((case, want), body) in cases.iter().zip(bodies) {
        let body = body.as_str().expect("a body string");
        let got = Ec2Request::parse(body.as_bytes()).unwrap_or_else(|e| {
            panic!(
                "{}: botocore's body {body:?} refused: {e} ({})",
                case["op"],
                e.code()
            )
        });
        assert_eq!(&got, want, "{}: body {body:?}", case["op"]);
        assert_eq!(
            got.request.action(),
            case["op"].as_str().unwrap_or_default()
        );
        // The same body with a key repeated is refused, whatever the action.
        let first = body
            .split('&')
            .find(|p| !p.starts_with("Action="))
            .unwrap_or_default();
        let dup = format!("{body}&{first}");
        assert_eq!(
            Ec2Request::parse(dup.as_bytes()).map_err(|e| e.code().as_str()),
            Err("InvalidParameter"),
            "{}: duplicate {first}",
            case["op"]
        );
    }
}

fn base64_std(raw: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(raw)
}
