//! EC2 snapshots over the EC2 Query API, driven by the real, unmodified aws CLI (botocore from
//! PyPI) against a real cluster of the real binaries with a storage node (issue 15, issue 19):
//! `create-snapshot` of a network volume, `describe-snapshots` (ids, `--owner-ids self`, filters,
//! pages), `create-volume --snapshot-id`, `delete-snapshot`, and the EC2 error codes for another
//! tenant's, a missing and a malformed snapshot. The control plane verifies the SigV4 request,
//! the KMS verifies the same forwarded request again (`ShareDataKey` on the signed CreateSnapshot
//! and CreateVolume, `DestroyDataKey` on the signed DeleteSnapshot). No guest boots: what a guest
//! reads from a volume made from a snapshot is `network_volumes.rs`'s (JSON API, same code).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bulkhead_devcluster::cluster::{self, ReplicaOptions, StartOptions, StorageEngine};
use serde_json::Value;

mod common;
use common::aws::{clients_or_skip, creds, Env, REGION};
use common::*;

/// The EC2 error code in the aws CLI's message (`An error occurred (CODE) when calling ...`).
fn error_code(stderr: &Value) -> String {
    let s = stderr.as_str().unwrap_or_default();
    s.split_once("An error occurred (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(code, _)| code.to_string())
        .unwrap_or_else(|| format!("(no code in {s:?})"))
}

fn refused(env: &Env, args: &[&str]) -> String {
    let (ok, v) = env.aws(args);
    assert!(!ok, "aws ec2 {args:?} succeeded: {v}");
    error_code(&v)
}

#[test]
fn the_aws_cli_snapshots_a_network_volume_over_the_ec2_query_api() {
    if clients_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let b = bins();
    let c = cluster::start_replicated(
        dir.path(),
        &StartOptions {
            hosts: 1,
            controller_args: backend_args(&b),
            bins: b,
            record: false,
            poll_interval_ms: 500,
            database_url: None,
            // No host takes part in a snapshot: attestation and namespaces are the other
            // cluster tests'.
            attest: Some(false),
            netns: Some(false),
        },
        &ReplicaOptions {
            storage: Some(StorageEngine::File),
            ..ReplicaOptions::default()
        },
    )
    .unwrap();
    assert!(c.storage.is_some(), "the cluster has a storage node");
    let (a, bk) = (creds(&c, "tenant-a"), creds(&c, "tenant-b"));
    let env = Env::new(&c, &a, &bk);
    let env_b = Env::new(&c, &bk, &a);
    let az = format!("{REGION}a");
    let started = std::time::Instant::now();

    let v = env.aws_ok(&["create-volume", "--size", "1", "--availability-zone", &az]);
    let vol = v["VolumeId"].as_str().unwrap().to_string();

    // CreateSnapshot: botocore reads EC2's Snapshot shape.
    let t = std::time::Instant::now();
    let s = env.aws_ok(&[
        "create-snapshot",
        "--volume-id",
        &vol,
        "--description",
        "nightly <a> & b",
    ]);
    let create_ms = t.elapsed().as_millis();
    let sid = s["SnapshotId"].as_str().unwrap().to_string();
    assert!(sid.starts_with("snap-"), "{s}");
    assert_eq!(s["VolumeId"], vol.as_str(), "{s}");
    assert_eq!(s["State"], "completed", "{s}");
    assert_eq!(s["Progress"], "100%", "{s}");
    assert_eq!(s["VolumeSize"], 1, "{s}");
    assert_eq!(s["Encrypted"], true, "{s}");
    assert_eq!(s["Description"], "nightly <a> & b", "{s}");
    assert!(s["OwnerId"].as_str().is_some_and(|o| !o.is_empty()), "{s}");
    assert!(s["StartTime"].as_str().is_some(), "{s}");
    let owner = s["OwnerId"].as_str().unwrap().to_string();

    // DescribeSnapshots: by id, by owner, by filter, paged.
    let d = env.aws_ok(&["describe-snapshots", "--snapshot-ids", &sid]);
    assert_eq!(d["Snapshots"][0]["SnapshotId"], sid.as_str(), "{d}");
    assert_eq!(d["Snapshots"][0]["State"], "completed", "{d}");
    for owners in ["self", owner.as_str()] {
        let d = env.aws_ok(&["describe-snapshots", "--owner-ids", owners]);
        assert_eq!(d["Snapshots"].as_array().map(Vec::len), Some(1), "{d}");
    }
    let d = env.aws_ok(&["describe-snapshots", "--owner-ids", "amazon"]);
    assert_eq!(d["Snapshots"], serde_json::json!([]), "{d}");
    let d = env.aws_ok(&[
        "describe-snapshots",
        "--filters",
        &format!("Name=volume-id,Values={vol}"),
        "Name=status,Values=completed",
    ]);
    assert_eq!(d["Snapshots"][0]["SnapshotId"], sid.as_str(), "{d}");
    let d = env.aws_ok(&[
        "describe-snapshots",
        "--filters",
        "Name=status,Values=pending",
    ]);
    assert_eq!(d["Snapshots"], serde_json::json!([]), "{d}");

    // CreateVolume from it: larger, in the snapshot's key family (the KMS verified the signed
    // CreateVolume naming the snapshot).
    let clone = env.aws_ok(&[
        "create-volume",
        "--size",
        "2",
        "--availability-zone",
        &az,
        "--snapshot-id",
        &sid,
    ]);
    assert_eq!(clone["SnapshotId"], sid.as_str(), "{clone}");
    assert_eq!(clone["Size"], 2, "{clone}");
    let clone_id = clone["VolumeId"].as_str().unwrap().to_string();
    // A second snapshot, then pages of one.
    let s2 = env.aws_ok(&["create-snapshot", "--volume-id", &clone_id]);
    let sid2 = s2["SnapshotId"].as_str().unwrap().to_string();
    assert!(s2.get("Description").is_none(), "{s2}");
    let p1 = env.aws_ok(&["describe-snapshots", "--max-results", "5", "--no-paginate"]);
    assert_eq!(p1["Snapshots"].as_array().map(Vec::len), Some(2), "{p1}");
    let mut ids = vec![sid.clone(), sid2.clone()];
    ids.sort();
    let listed: Vec<&str> = p1["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["SnapshotId"].as_str())
        .collect();
    assert_eq!(listed, ids, "{p1}");

    // Refusals with EC2's codes: another tenant's snapshot does not exist for it; a smaller
    // volume than the snapshot; malformed ids; a snapshot of a volume that does not exist.
    assert_eq!(
        refused(&env_b, &["describe-snapshots", "--snapshot-ids", &sid]),
        "InvalidSnapshot.NotFound"
    );
    assert_eq!(
        refused(&env_b, &["delete-snapshot", "--snapshot-id", &sid]),
        "InvalidSnapshot.NotFound"
    );
    assert_eq!(
        refused(
            &env_b,
            &[
                "create-volume",
                "--size",
                "2",
                "--availability-zone",
                &az,
                "--snapshot-id",
                &sid
            ]
        ),
        "InvalidSnapshot.NotFound"
    );
    let d = env_b.aws_ok(&["describe-snapshots"]);
    assert_eq!(
        d["Snapshots"],
        serde_json::json!([]),
        "tenant B sees none: {d}"
    );
    assert_eq!(
        refused(&env_b, &["create-snapshot", "--volume-id", &vol]),
        "InvalidVolume.NotFound"
    );
    assert_eq!(
        refused(
            &env,
            &[
                "create-volume",
                "--size",
                "1",
                "--availability-zone",
                &az,
                "--snapshot-id",
                &sid2
            ]
        ),
        "InvalidParameterValue",
        "smaller than the snapshot"
    );
    assert_eq!(
        refused(&env, &["delete-snapshot", "--snapshot-id", "snap-XYZ"]),
        "InvalidSnapshotID.Malformed"
    );
    assert_eq!(
        refused(&env, &["create-snapshot", "--volume-id", "snap-1"]),
        "InvalidVolumeID.Malformed"
    );
    assert_eq!(
        refused(&env, &["describe-snapshots", "--snapshot-ids", "snap-0"]),
        "InvalidSnapshot.NotFound"
    );
    let audit = std::fs::read_to_string(c.dir.join("control/audit.log")).unwrap();
    assert!(
        audit.contains("no_such_snapshot"),
        "the control plane audited tenant B's refusals"
    );

    // DeleteSnapshot (the KMS verified the signed DeleteSnapshot naming it), then it is gone.
    for id in [&sid, &sid2] {
        let r = env.aws_ok(&["delete-snapshot", "--snapshot-id", id]);
        assert_eq!(r, Value::Null, "delete-snapshot prints nothing: {r}");
        assert_eq!(
            refused(&env, &["describe-snapshots", "--snapshot-ids", id]),
            "InvalidSnapshot.NotFound"
        );
    }
    let data = c.storage.as_ref().unwrap().state_dir.join("data");
    for id in [&sid, &sid2] {
        assert!(
            !data.join(format!("{id}.raw")).exists(),
            "{id}'s copy is left on the node"
        );
    }
    // The volumes outlive their snapshots.
    let vols = env.aws_ok(&["describe-volumes", "--volume-ids", &vol, &clone_id]);
    assert_eq!(vols["Volumes"].as_array().map(Vec::len), Some(2), "{vols}");
    env.aws_ok(&["delete-volume", "--volume-id", &clone_id]);
    env.aws_ok(&["delete-volume", "--volume-id", &vol]);
    eprintln!(
        "ec2 snapshots: create-snapshot {create_ms} ms through the aws CLI; whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
