//! botocore's own EC2 response parser (with botocore's EC2 service model) reads every response
//! body and error document this crate writes, and finds what was written.

mod common;

use bulkhead_ec2_query::snapshot::{SnapshotItem, SnapshotResponse, SnapshotStateName};
use bulkhead_ec2_query::xml::{
    AttachmentStateName, InstanceItem, InstanceStateName, Reservation, StateChange,
    VolumeAttachment, VolumeItem, VolumeStateName,
};
use bulkhead_ec2_query::{error_xml, Ec2ErrorCode, Ec2Response};
use serde_json::{json, Value};

fn instance(id: &str, state: InstanceStateName) -> InstanceItem {
    InstanceItem {
        instance_id: id.into(),
        image_id: "ami-1".into(),
        state,
        instance_type: "t3.micro".into(),
        launch_time_unix: 1_714_564_800,
        availability_zone: "bh-1a".into(),
        subnet_id: Some("subnet-1".into()),
        private_ip: Some("10.0.0.5".into()),
        security_group_ids: vec!["sg-a".into()],
    }
}

fn attachment(state: AttachmentStateName) -> VolumeAttachment {
    VolumeAttachment {
        volume_id: "vol-1".into(),
        instance_id: "i-1".into(),
        device: "/dev/sdf".into(),
        state,
        attach_time_unix: 1_714_564_860,
        delete_on_termination: false,
    }
}

fn volume() -> VolumeItem {
    VolumeItem {
        volume_id: "vol-1".into(),
        size_gib: 8,
        availability_zone: "bh-1a".into(),
        state: VolumeStateName::InUse,
        create_time_unix: 1_714_564_800,
        volume_type: "gp3".into(),
        encrypted: true,
        kms_key_id: Some("key-<1>&".into()),
        snapshot_id: None,
        attachments: vec![attachment(AttachmentStateName::Attached)],
    }
}

fn snapshot(id: &str, state: SnapshotStateName) -> SnapshotItem {
    SnapshotItem {
        snapshot_id: id.into(),
        volume_id: "vol-1".into(),
        state,
        start_time_unix: 1_714_564_800,
        volume_size_gib: 8,
        owner_id: "tenant-a".into(),
        description: Some("nightly <&>".into()),
        kms_key_id: Some("key-1".into()),
    }
}

#[test]
fn botocore_reads_our_responses_and_errors() {
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let reservation = Reservation {
        reservation_id: "r-1".into(),
        owner_id: "tenant-a".into(),
        instances: vec![
            instance("i-1", InstanceStateName::Pending),
            instance("i-2", InstanceStateName::Running),
        ],
    };
    let change = vec![StateChange {
        instance_id: "i-1".into(),
        current: InstanceStateName::Stopping,
        previous: InstanceStateName::Running,
    }];
    let console = b"Linux version 6.1\r\n\x1b[0m login: \xff".to_vec();
    let responses = vec![
        Ec2Response::RunInstances(reservation.clone()),
        Ec2Response::DescribeInstances {
            reservations: vec![reservation.clone(), reservation],
            next_token: Some("p2 &<>".into()),
        },
        Ec2Response::StartInstances(change.clone()),
        Ec2Response::StopInstances(change.clone()),
        Ec2Response::TerminateInstances(change),
        Ec2Response::GetConsoleOutput {
            instance_id: "i-1".into(),
            timestamp_unix: 1_714_564_900,
            output: console.clone(),
        },
        Ec2Response::CreateVolume(VolumeItem {
            state: VolumeStateName::Creating,
            attachments: vec![],
            snapshot_id: Some("snap-1".into()),
            ..volume()
        }),
        Ec2Response::DescribeVolumes {
            volumes: vec![volume()],
            next_token: None,
        },
        Ec2Response::AttachVolume(attachment(AttachmentStateName::Attaching)),
        Ec2Response::DetachVolume(attachment(AttachmentStateName::Detaching)),
        Ec2Response::DeleteVolume,
        Ec2Response::Snapshot(SnapshotResponse::CreateSnapshot(snapshot(
            "snap-1",
            SnapshotStateName::Completed,
        ))),
        Ec2Response::Snapshot(SnapshotResponse::DescribeSnapshots {
            snapshots: vec![
                snapshot("snap-1", SnapshotStateName::Pending),
                SnapshotItem {
                    description: None,
                    kms_key_id: None,
                    ..snapshot("snap-2", SnapshotStateName::Error)
                },
            ],
            next_token: Some("snap-3".into()),
        }),
        Ec2Response::Snapshot(SnapshotResponse::DeleteSnapshot),
    ];
    let mut input: Vec<Value> = responses
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"op": r.action(), "status": 200, "body": r.to_xml(&format!("req-{i}"))}))
        .collect();
    let errors = [
        (Ec2ErrorCode::SignatureDoesNotMatch, "DescribeInstances"),
        (Ec2ErrorCode::InvalidInstanceIdMalformed, "StartInstances"),
        (Ec2ErrorCode::AuthFailure, "RunInstances"),
        (Ec2ErrorCode::InvalidAction, "DeleteVolume"),
        (Ec2ErrorCode::InvalidSnapshotNotFound, "DeleteSnapshot"),
        (
            Ec2ErrorCode::InvalidSnapshotIdMalformed,
            "DescribeSnapshots",
        ),
    ];
    for (code, op) in errors {
        input.push(json!({"op": op, "status": code.http_status(),
            "body": error_xml(code, "it said <no> & \"\u{7}\"", "err-req")}));
    }
    let parsed = common::run_json(
        python,
        "ec2_parse.py",
        &[],
        Value::Array(input).to_string().as_bytes(),
    );
    let p = parsed.as_array().expect("a list");
    for (i, r) in p.iter().enumerate().take(responses.len()) {
        assert_eq!(
            r["ResponseMetadata"]["RequestId"],
            format!("req-{i}"),
            "{i}: {r}"
        );
    }

    let run = &p[0];
    assert_eq!(run["ReservationId"], "r-1");
    assert_eq!(run["OwnerId"], "tenant-a");
    assert_eq!(run["Instances"][0]["InstanceId"], "i-1");
    assert_eq!(
        run["Instances"][0]["State"],
        json!({"Code": 0, "Name": "pending"})
    );
    assert_eq!(run["Instances"][1]["State"]["Name"], "running");
    assert_eq!(
        run["Instances"][0]["Placement"]["AvailabilityZone"],
        "bh-1a"
    );
    assert_eq!(
        run["Instances"][0]["LaunchTime"],
        "2024-05-01T12:00:00+00:00"
    );
    assert_eq!(run["Instances"][0]["SecurityGroups"][0]["GroupId"], "sg-a");
    assert_eq!(run["Instances"][0]["PrivateIpAddress"], "10.0.0.5");

    let desc = &p[1];
    assert_eq!(desc["Reservations"].as_array().map(Vec::len), Some(2));
    assert_eq!(desc["Reservations"][1]["Instances"][1]["InstanceId"], "i-2");
    assert_eq!(desc["NextToken"], "p2 &<>");

    for c in &p[2..5] {
        assert_eq!(
            c["StartingInstances"]
                .as_array()
                .or(c["StoppingInstances"].as_array())
                .or(c["TerminatingInstances"].as_array())
                .map(Vec::len),
            Some(1),
            "{c}"
        );
    }
    assert_eq!(
        p[3]["StoppingInstances"][0]["CurrentState"],
        json!({"Code": 64, "Name": "stopping"})
    );
    assert_eq!(
        p[3]["StoppingInstances"][0]["PreviousState"],
        json!({"Code": 16, "Name": "running"})
    );

    let out = &p[5];
    assert_eq!(out["InstanceId"], "i-1");
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(out["Output"].as_str().expect("Output is a string"))
        .expect("base64 as EC2 sends it");
    assert_eq!(decoded, console);

    let created = &p[6];
    assert_eq!(created["VolumeId"], "vol-1");
    assert_eq!(created["Size"], 8);
    assert_eq!(created["State"], "creating");
    assert_eq!(created["Encrypted"], true);
    assert_eq!(created["KmsKeyId"], "key-<1>&");
    assert_eq!(created["SnapshotId"], "snap-1");

    let vols = &p[7];
    assert_eq!(vols["Volumes"][0]["State"], "in-use");
    assert_eq!(vols["Volumes"][0]["Attachments"][0]["State"], "attached");
    assert_eq!(vols["Volumes"][0]["Attachments"][0]["Device"], "/dev/sdf");
    assert_eq!(
        vols["Volumes"][0]["Attachments"][0]["DeleteOnTermination"],
        false
    );
    assert!(vols.get("NextToken").is_none());

    assert_eq!(p[8]["State"], "attaching");
    assert_eq!(p[8]["InstanceId"], "i-1");
    assert_eq!(p[9]["State"], "detaching");

    let snap = &p[11];
    assert_eq!(
        (
            &snap["SnapshotId"],
            &snap["VolumeId"],
            &snap["State"],
            &snap["Progress"],
        ),
        (
            &json!("snap-1"),
            &json!("vol-1"),
            &json!("completed"),
            &json!("100%")
        )
    );
    assert_eq!(snap["StartTime"], "2024-05-01T12:00:00+00:00");
    assert_eq!(snap["VolumeSize"], 8);
    assert_eq!(snap["Encrypted"], true);
    assert_eq!(snap["OwnerId"], "tenant-a");
    assert_eq!(snap["Description"], "nightly <&>");
    assert_eq!(snap["KmsKeyId"], "key-1");
    let snaps = &p[12];
    assert_eq!(snaps["Snapshots"][0]["State"], "pending");
    assert_eq!(snaps["Snapshots"][0]["Progress"], "0%");
    assert_eq!(snaps["Snapshots"][1]["SnapshotId"], "snap-2");
    assert_eq!(snaps["Snapshots"][1]["State"], "error");
    assert!(snaps["Snapshots"][1].get("Description").is_none());
    assert_eq!(snaps["NextToken"], "snap-3");
    assert_eq!(p[13]["ResponseMetadata"]["RequestId"], "req-13");

    for (k, (code, _)) in errors.iter().enumerate() {
        let e = &p[responses.len() + k];
        assert_eq!(e["Error"]["Code"], code.as_str(), "{e}");
        assert_eq!(e["Error"]["Message"], "it said <no> & \"\u{fffd}\"", "{e}");
        assert_eq!(e["ResponseMetadata"]["RequestId"], "err-req", "{e}");
    }
}
