//! Snapshots as EC2 answers them (botocore's `Snapshot` shape), from the JSON API's snapshot
//! objects (`crate::snapshots::snapshot_json`).

use bulkhead_ec2_query::snapshot::{SnapshotItem, SnapshotStateName};
use serde_json::Value;

use super::{opt_text, text, unix};
use crate::state::SnapshotState;

/// A snapshot's state as EC2 names it. `deleting` (a DeleteSnapshot that has not finished: its
/// key membership may be destroyed already, its copy not yet released) has no EC2 state; it is
/// `error`: the snapshot can no longer make volumes, and repeating DeleteSnapshot finishes it.
/// A name that is none of ours (a corrupt row) is `error` too.
fn snapshot_state(s: &str) -> SnapshotStateName {
    match SnapshotState::parse(s) {
        Ok(SnapshotState::Pending) => SnapshotStateName::Pending,
        Ok(SnapshotState::Completed) => SnapshotStateName::Completed,
        Ok(SnapshotState::Deleting) | Err(_) => SnapshotStateName::Error,
    }
}

pub(super) fn snapshot_item(v: &Value, owner: &str, description: Option<String>) -> SnapshotItem {
    SnapshotItem {
        snapshot_id: text(v, "SnapshotId"),
        volume_id: text(v, "VolumeId"),
        state: snapshot_state(&text(v, "State")),
        start_time_unix: unix(v, "StartTime"),
        volume_size_gib: v["VolumeSize"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        owner_id: owner.to_string(),
        description,
        kms_key_id: opt_text(v, "KmsKeyId"),
    }
}

pub(super) fn snapshot_values(v: &Value, name: &str) -> Vec<String> {
    let item = snapshot_item(v, "", None);
    match name {
        "snapshot-id" => vec![item.snapshot_id],
        "volume-id" => vec![item.volume_id],
        "status" => vec![item.state.as_str().to_string()],
        "volume-size" => vec![item.volume_size_gib.to_string()],
        "encrypted" => vec!["true".into()],
        _ => vec![],
    }
}

/// `OwnerId.N`: every snapshot here is the caller's, so none match unless `self` or the
/// caller's own id is named (or no owner is).
pub(super) fn owned_by(owners: &[String], owner: &str) -> bool {
    owners.is_empty() || owners.iter().any(|o| o == "self" || o == owner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use bulkhead_ec2_query::form::{Filter, Page};
    use bulkhead_ec2_query::snapshot::SnapshotResponse;
    use bulkhead_ec2_query::Ec2Response;
    use serde_json::json;

    use super::super::render;
    use crate::query_map::View;

    #[test]
    fn snapshots_render_with_ec2_states_owner_and_filters() {
        let all = json!({"Snapshots": [
            {"SnapshotId": "snap-2", "VolumeId": "vol-1", "VolumeSize": 2, "State": "completed", "StartTime": 60, "KmsKeyId": "key-1"},
            {"SnapshotId": "snap-1", "VolumeId": "vol-1", "VolumeSize": 1, "State": "pending", "StartTime": 0},
            {"SnapshotId": "snap-3", "VolumeId": "vol-2", "VolumeSize": 1, "State": "deleting", "StartTime": 0},
        ]});
        let f = |n: &str, v: &str| Filter {
            name: n.into(),
            values: vec![v.into()],
        };
        let describe = |owners: &[&str], filters: Vec<Filter>, max: Option<u32>| {
            let view = View::DescribeSnapshots(
                owners.iter().map(|o| (*o).to_string()).collect(),
                filters,
                Page {
                    max_results: max,
                    next_token: None,
                },
            );
            match render(view, &all, "t-1", "az").unwrap() {
                Ec2Response::Snapshot(SnapshotResponse::DescribeSnapshots {
                    snapshots,
                    next_token,
                }) => (snapshots, next_token),
                other => panic!("{other:?}"),
            }
        };
        let (s, next) = describe(&[], vec![], None);
        let states: Vec<(&str, &str)> = s
            .iter()
            .map(|i| (i.snapshot_id.as_str(), i.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("snap-1", "pending"),
                ("snap-2", "completed"),
                ("snap-3", "error")
            ]
        );
        assert_eq!(next, None);
        assert_eq!(s[1].owner_id, "t-1");
        assert_eq!(s[1].volume_size_gib, 2);
        assert_eq!(s[1].start_time_unix, 60);
        assert_eq!(describe(&["self"], vec![], None).0.len(), 3);
        assert_eq!(describe(&["amazon", "t-1"], vec![], None).0.len(), 3);
        assert!(describe(&["amazon"], vec![], None).0.is_empty());
        let (s, _) = describe(
            &[],
            vec![f("volume-id", "vol-1"), f("status", "completed")],
            None,
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].snapshot_id, "snap-2");
        let (s, next) = describe(&[], vec![f("owner-id", "t-1")], Some(2));
        assert_eq!(s.len(), 2);
        assert_eq!(next.as_deref(), Some("snap-3"));
        let created = render(
            View::CreateSnapshot(Some("nightly".into())),
            &all["Snapshots"][0],
            "t-1",
            "az",
        )
        .unwrap();
        assert!(matches!(
            created,
            Ec2Response::Snapshot(SnapshotResponse::CreateSnapshot(i))
                if i.description.as_deref() == Some("nightly") && i.kms_key_id.as_deref() == Some("key-1")
        ));
    }
}
