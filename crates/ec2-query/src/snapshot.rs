//! The snapshot actions of the Query API (CreateSnapshot, DescribeSnapshots, DeleteSnapshot):
//! their typed requests (parsed with the same strict rules as [`crate::form`]) and their XML
//! answers (botocore's `Snapshot` shape). CreateVolume's `SnapshotId` is parsed with the other
//! CreateVolume parameters in [`crate::form`].
//!
//! Not taken (refused as `UnknownParameter`, like every other action's tags):
//! `TagSpecification.N`, `OutpostArn`, `Location`, `RestorableBy.N`.

use crate::form::{Ec2Request, Filter, Page, Params, QueryError, SnapshotId, VolumeId};
use crate::xml::{iso8601, XmlWriter};

/// Longest snapshot `Description` (EC2's limit).
pub const MAX_DESCRIPTION_LEN: usize = 255;
/// The `MaxResults` range of DescribeSnapshots (EC2's).
const DESCRIBE_MAX_RESULTS: (usize, usize) = (5, 1000);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSnapshot {
    pub volume_id: VolumeId,
    /// Checked text, at most [`MAX_DESCRIPTION_LEN`] bytes.
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeSnapshots {
    pub snapshot_ids: Vec<SnapshotId>,
    /// `Owner.N` (botocore's `OwnerIds`): `self`, an account id, or an alias (`amazon`...); only the caller's own
    /// snapshots exist here.
    pub owner_ids: Vec<String>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

type ActionParser = fn(&mut Params) -> Result<Ec2Request, QueryError>;

/// The parser of a snapshot action, `None` for any other name.
pub(crate) fn parser(action: &str) -> Option<ActionParser> {
    let p: ActionParser = match action {
        "CreateSnapshot" => |p| {
            Ok(Ec2Request::CreateSnapshot(CreateSnapshot {
                volume_id: p.volume_id("VolumeId")?,
                description: description(p)?,
            }))
        },
        "DescribeSnapshots" => describe,
        "DeleteSnapshot" => |p| {
            Ok(Ec2Request::DeleteSnapshot {
                snapshot_id: SnapshotId::parse(&p.required_text("SnapshotId", 64)?)?,
            })
        },
        _ => return None,
    };
    Some(p)
}

/// `Description`: may be empty (the aws CLI sends none, boto3 may send `""`), no controls.
fn description(p: &mut Params) -> Result<Option<String>, QueryError> {
    match p.take("Description")? {
        None => Ok(None),
        Some(d) => {
            crate::form::check_text(&d, "Description", MAX_DESCRIPTION_LEN)?;
            Ok(Some(d))
        }
    }
}

fn describe(p: &mut Params) -> Result<Ec2Request, QueryError> {
    let snapshot_ids = p
        .list("SnapshotId", 64)?
        .iter()
        .map(|v| SnapshotId::parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    let owner_ids = p.list("Owner", 64)?;
    let page = p.page(DESCRIBE_MAX_RESULTS.0, DESCRIBE_MAX_RESULTS.1)?;
    if !snapshot_ids.is_empty() && page.max_results.is_some() {
        return Err(QueryError::Combination("SnapshotId", "MaxResults"));
    }
    Ok(Ec2Request::DescribeSnapshots(DescribeSnapshots {
        snapshot_ids,
        owner_ids,
        filters: p.filters()?,
        page,
    }))
}

/// A snapshot's state as EC2 names it (botocore's `SnapshotState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStateName {
    Pending,
    Completed,
    Error,
}

impl SnapshotStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Error => "error",
        }
    }

    /// EC2's `progress`: a completed snapshot is `100%`; nothing else reports partial progress.
    pub fn progress(self) -> &'static str {
        match self {
            Self::Completed => "100%",
            Self::Pending | Self::Error => "0%",
        }
    }
}

/// One `snapshotSet` item, and the CreateSnapshot answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotItem {
    pub snapshot_id: String,
    pub volume_id: String,
    pub state: SnapshotStateName,
    pub start_time_unix: i64,
    pub volume_size_gib: u32,
    pub owner_id: String,
    pub description: Option<String>,
    pub kms_key_id: Option<String>,
}

/// A successful answer to a snapshot action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotResponse {
    CreateSnapshot(SnapshotItem),
    DescribeSnapshots {
        snapshots: Vec<SnapshotItem>,
        next_token: Option<String>,
    },
    DeleteSnapshot,
}

impl SnapshotResponse {
    pub fn action(&self) -> &'static str {
        match self {
            Self::CreateSnapshot(_) => "CreateSnapshot",
            Self::DescribeSnapshots { .. } => "DescribeSnapshots",
            Self::DeleteSnapshot => "DeleteSnapshot",
        }
    }

    pub(crate) fn body(&self, w: &mut XmlWriter) {
        match self {
            Self::CreateSnapshot(s) => snapshot_body(w, s),
            Self::DescribeSnapshots {
                snapshots,
                next_token,
            } => {
                w.set("snapshotSet", snapshots, snapshot_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::DeleteSnapshot => w.leaf("return", "true"),
        }
    }
}

fn snapshot_body(w: &mut XmlWriter, s: &SnapshotItem) {
    w.leaf("snapshotId", &s.snapshot_id);
    w.leaf("volumeId", &s.volume_id);
    w.leaf("status", s.state.as_str());
    w.leaf("startTime", &iso8601(s.start_time_unix));
    w.leaf("progress", s.state.progress());
    w.leaf("ownerId", &s.owner_id);
    w.leaf_opt("description", s.description.as_deref());
    w.leaf("volumeSize", &s.volume_size_gib.to_string());
    // Every snapshot is encrypted: it is a copy of an always-encrypted volume's ciphertext.
    w.leaf("encrypted", "true");
    w.leaf_opt("kmsKeyId", s.kms_key_id.as_deref());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::form::MAX_LIST_INDEX;

    fn parse(s: &str) -> Result<Ec2Request, QueryError> {
        Ec2Request::parse(format!("Version=2016-11-15&{s}").as_bytes()).map(|c| c.request)
    }

    fn code(s: &str) -> &'static str {
        parse(s).unwrap_err().code().as_str()
    }

    #[test]
    fn snapshot_requests() {
        assert_eq!(
            parse("Action=CreateSnapshot&VolumeId=vol-1a&Description=nightly+%3Cb%3E").unwrap(),
            Ec2Request::CreateSnapshot(CreateSnapshot {
                volume_id: VolumeId::parse("vol-1a").unwrap(),
                description: Some("nightly <b>".into()),
            })
        );
        let Ec2Request::CreateSnapshot(c) =
            parse("Action=CreateSnapshot&VolumeId=vol-1&Description=").unwrap()
        else {
            panic!("wrong action")
        };
        assert_eq!(c.description.as_deref(), Some(""));
        let Ec2Request::DescribeSnapshots(d) = parse(
            "Action=DescribeSnapshots&SnapshotId.2=snap-b&SnapshotId.1=snap-a&Owner.1=self&Filter.1.Name=volume-id&Filter.1.Value.1=vol-1",
        )
        .unwrap() else {
            panic!("wrong action")
        };
        let ids: Vec<&str> = d.snapshot_ids.iter().map(SnapshotId::as_str).collect();
        assert_eq!(ids, ["snap-a", "snap-b"]);
        assert_eq!(d.owner_ids, ["self"]);
        assert_eq!(d.filters[0].values, ["vol-1"]);
        assert_eq!(d.page, Page::default());
        let Ec2Request::DescribeSnapshots(d) =
            parse("Action=DescribeSnapshots&MaxResults=5&NextToken=snap-9").unwrap()
        else {
            panic!("wrong action")
        };
        assert_eq!(d.page.max_results, Some(5));
        assert_eq!(
            parse("Action=DeleteSnapshot&SnapshotId=snap-0f").unwrap(),
            Ec2Request::DeleteSnapshot {
                snapshot_id: SnapshotId::parse("snap-0f").unwrap()
            }
        );
        let Ec2Request::CreateVolume(v) =
            parse("Action=CreateVolume&Size=2&AvailabilityZone=bh-1a&SnapshotId=snap-1").unwrap()
        else {
            panic!("wrong action")
        };
        assert_eq!(
            v.snapshot_id.as_ref().map(SnapshotId::as_str),
            Some("snap-1")
        );
    }

    #[test]
    fn bad_snapshot_requests_are_refused_with_ec2_codes() {
        let huge = MAX_LIST_INDEX + 1;
        for (body, want) in [
            ("Action=CreateSnapshot", "MissingParameter"),
            (
                "Action=CreateSnapshot&VolumeId=",
                "InvalidVolumeID.Malformed",
            ),
            (
                "Action=CreateSnapshot&VolumeId=snap-1",
                "InvalidVolumeID.Malformed",
            ),
            (
                "Action=CreateSnapshot&VolumeId=vol-A",
                "InvalidVolumeID.Malformed",
            ),
            (
                "Action=CreateSnapshot&VolumeId=vol-1&Description=a%07b",
                "InvalidParameterValue",
            ),
            (
                "Action=CreateSnapshot&VolumeId=vol-1&TagSpecification.1.ResourceType=snapshot",
                "UnknownParameter",
            ),
            (
                "Action=CreateSnapshot&VolumeId=vol-1&SnapshotId=snap-1",
                "UnknownParameter",
            ),
            ("Action=DeleteSnapshot", "MissingParameter"),
            ("Action=DeleteSnapshot&SnapshotId=", "InvalidParameterValue"),
            (
                "Action=DeleteSnapshot&SnapshotId=vol-1",
                "InvalidSnapshotID.Malformed",
            ),
            (
                "Action=DeleteSnapshot&SnapshotId=snap-",
                "InvalidSnapshotID.Malformed",
            ),
            (
                "Action=DeleteSnapshot&SnapshotId=snap-1%2F..",
                "InvalidSnapshotID.Malformed",
            ),
            (
                "Action=DeleteSnapshot&SnapshotId.1=snap-1",
                "MissingParameter",
            ),
            (
                "Action=DescribeSnapshots&SnapshotId.1=i-1",
                "InvalidSnapshotID.Malformed",
            ),
            (
                "Action=DescribeSnapshots&SnapshotId.2=snap-1",
                "InvalidParameter",
            ),
            (
                "Action=DescribeSnapshots&SnapshotId.0=snap-1",
                "InvalidParameter",
            ),
            (
                "Action=DescribeSnapshots&Owner.1=self&Owner.3=x",
                "InvalidParameter",
            ),
            (
                "Action=DescribeSnapshots&SnapshotId.1=snap-1&MaxResults=5",
                "InvalidParameterCombination",
            ),
            (
                "Action=DescribeSnapshots&MaxResults=4",
                "InvalidParameterValue",
            ),
            (
                "Action=DescribeSnapshots&MaxResults=1001",
                "InvalidParameterValue",
            ),
            (
                "Action=DescribeSnapshots&RestorableBy.1=1",
                "UnknownParameter",
            ),
            (
                "Action=CreateVolume&Size=1&AvailabilityZone=z&SnapshotId=vol-1",
                "InvalidSnapshotID.Malformed",
            ),
        ] {
            assert_eq!(code(body), want, "{body}");
        }
        for key in [
            format!("SnapshotId.{huge}=snap-1"),
            format!("Owner.{huge}=self"),
            "SnapshotId.99999999999999999999=snap-1".to_string(),
        ] {
            assert_eq!(
                code(&format!("Action=DescribeSnapshots&{key}")),
                "InvalidParameter",
                "{key}"
            );
        }
        let long = "a".repeat(MAX_DESCRIPTION_LEN + 1);
        assert_eq!(
            code(&format!(
                "Action=CreateSnapshot&VolumeId=vol-1&Description={long}"
            )),
            "InvalidParameterValue"
        );
    }

    #[test]
    fn answers_are_ec2s_snapshot_shape() {
        let item = SnapshotItem {
            snapshot_id: "snap-1".into(),
            volume_id: "vol-1".into(),
            state: SnapshotStateName::Completed,
            start_time_unix: 0,
            volume_size_gib: 2,
            owner_id: "t-<a>".into(),
            description: None,
            kms_key_id: Some("key-1".into()),
        };
        let x = crate::Ec2Response::Snapshot(SnapshotResponse::CreateSnapshot(item.clone()))
            .to_xml("r");
        assert!(x.contains("<CreateSnapshotResponse xmlns="), "{x}");
        assert!(x.contains("<status>completed</status><startTime>1970-01-01T00:00:00.000Z</startTime><progress>100%</progress><ownerId>t-&lt;a&gt;</ownerId><volumeSize>2</volumeSize><encrypted>true</encrypted>"), "{x}");
        assert!(!x.contains("description"), "{x}");
        let x = crate::Ec2Response::Snapshot(SnapshotResponse::DescribeSnapshots {
            snapshots: vec![SnapshotItem {
                state: SnapshotStateName::Pending,
                ..item
            }],
            next_token: None,
        })
        .to_xml("r");
        assert!(
            x.contains("<snapshotSet><item><snapshotId>snap-1</snapshotId>"),
            "{x}"
        );
        assert!(x.contains("<progress>0%</progress>"), "{x}");
        assert!(!x.contains("nextToken"), "{x}");
    }
}
