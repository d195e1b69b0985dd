//! The EC2 Query form parser on arbitrary bodies: never a panic, every refusal has an EC2 code,
//! and what it accepts names a known action and only well-formed ids.
#![no_main]

use bulkhead_ec2_query::form::{InstanceId, SnapshotId, VolumeId};
use bulkhead_ec2_query::{Ec2Request, QueryError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Ec2Request::parse(data) {
        Err(e) => {
            let e: QueryError = e;
            assert!(!e.code().as_str().is_empty());
        }
        Ok(call) => {
            assert!(data.len() <= bulkhead_ec2_query::form::MAX_FORM_BODY);
            match &call.request {
                Ec2Request::DescribeInstances(d) => {
                    for id in &d.instance_ids {
                        assert!(InstanceId::parse(id.as_str()).is_ok());
                    }
                    for f in &d.filters {
                        assert!(!f.values.is_empty());
                    }
                }
                Ec2Request::DeleteVolume { volume_id } => {
                    assert!(VolumeId::parse(volume_id.as_str()).is_ok());
                }
                Ec2Request::DeleteSnapshot { snapshot_id } => {
                    assert!(SnapshotId::parse(snapshot_id.as_str()).is_ok());
                }
                Ec2Request::DescribeSnapshots(d) => {
                    for id in &d.snapshot_ids {
                        assert!(SnapshotId::parse(id.as_str()).is_ok());
                    }
                }
                Ec2Request::CreateSnapshot(c) => {
                    assert!(VolumeId::parse(c.volume_id.as_str()).is_ok());
                    assert!(c.description.as_ref().is_none_or(
                        |d| d.len() <= bulkhead_ec2_query::snapshot::MAX_DESCRIPTION_LEN
                    ));
                }
                Ec2Request::RunInstances(r) => {
                    assert!(r.min_count >= 1 && r.min_count <= r.max_count);
                }
                _ => {}
            }
            assert!(!call.request.action().is_empty());
        }
    }
});
