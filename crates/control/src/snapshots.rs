//! Snapshots (EBS's CreateSnapshot / DescribeSnapshots / DeleteSnapshot, and CreateVolume with
//! `SnapshotId`).
//!
//! A snapshot is a copy of a detached network volume's ciphertext on the volume's storage node
//! (the node copies cheaply: reflink or sparse copy, or an RBD clone) and a member of the
//! volume's KMS key family: it keeps the volume's data-key blob, and a volume made from it
//! shares that key (the KMS's `ShareDataKey`, on the customer's own signed request). Nothing
//! here ever sees a key or plaintext. Deleting any member (volume or snapshot) destroys only
//! that member's key-family membership; the family's secret goes with its last member.
//!
//! Rows have their own state ([`SnapshotState`]): `pending` while the copy and the key
//! membership are made, `completed`, `deleting`. A failure before the KMS answered, or a KMS
//! refusal, undoes the copy and removes the row; a KMS call whose outcome is unknown (transport
//! error, timeout) leaves the row `pending`, so that the customer's DeleteSnapshot can still
//! destroy a membership the KMS may have made (a membership without a row would keep the
//! family's secret alive after every visible member was deleted: no crypto-erase). A `pending`
//! row can be deleted only once its create has certainly ended ([`PENDING_DELETE_AFTER_SECS`]).
//!
//! A volume made from a snapshot follows the same rule: its row is recorded `creating`
//! ([`VolumeState::Creating`]) before the storage copy and the KMS's `ShareDataKey`, becomes
//! `available` once keyed, and stays `creating` when the KMS's answer was lost (or the row could
//! not be marked `available`); DeleteVolume takes such a row after the same wait and accepts the
//! KMS's `no_grant` for it (the KMS never added it).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_kms_proto::{DestroyDataKeyRequest, ShareDataKeyRequest};
use serde_json::{json, Value};

use crate::api::{CreateSnapshot, CreateVolume, SnapshotRef};
use crate::repo::{SnapshotRow, SnapshotState, VolumeRow, VolumeState};
use crate::service::{new_id, now, volume_json, Caller, ControlPlane};
use crate::ControlError;

/// How long after its creation a `pending` snapshot may be deleted: longer than any create can
/// run (a storage copy and one KMS call, each bounded by its client's timeout), so a delete
/// never races the create's `ShareDataKey` (which would leave a key-family member no row names).
pub const PENDING_DELETE_AFTER_SECS: u64 = 15 * 60;

pub(crate) fn snapshot_json(s: &SnapshotRow) -> Value {
    json!({
        "SnapshotId": s.snapshot_id,
        "VolumeId": s.volume_id,
        "VolumeSize": s.size_gib,
        "Encrypted": true,
        "KmsKeyId": s.kms_key_id,
        "State": s.state.as_str(),
        "StartTime": s.created,
    })
}

impl ControlPlane {
    /// CreateSnapshot of an `available` network volume (the storage node refuses a volume some
    /// host still holds, so an attach racing this one cannot slip in between).
    pub(crate) async fn create_snapshot(
        &self,
        c: &Caller,
        r: &CreateSnapshot,
    ) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, &r.volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        if v.state != VolumeState::Available {
            return Err(ControlError::VolumeInUse);
        }
        let node = v
            .storage_node
            .clone()
            .ok_or(ControlError::Unsupported("snapshots of host-local volumes"))?;
        let row = SnapshotRow {
            snapshot_id: new_id("snap"),
            tenant_id: c.tenant.clone(),
            volume_id: v.volume_id.clone(),
            size_gib: v.size_gib,
            kms_key_id: v.kms_key_id.clone(),
            ciphertext_blob: v.ciphertext_blob.clone(),
            state: SnapshotState::Pending,
            storage_node: Some(node.clone()),
            created: now(),
        };
        // Storage first: a configuration without storage must leave no `pending` row behind.
        let storage = self.storage()?;
        self.repo.insert_snapshot(&row)?;
        let made = match storage
            .snapshot(&node, &row.snapshot_id, &v.volume_id)
            .await
        {
            Err(e) => Err(e),
            Ok(_) => match self
                .kms(&ShareDataKeyRequest {
                    source_id: v.volume_id.clone(),
                    member_id: row.snapshot_id.clone(),
                    ciphertext_blob: B64.encode(&v.ciphertext_blob),
                    customer_request: c.forwarded.clone(),
                })
                .await
            {
                // A typed KMS refusal: no member was added.
                Err(e @ ControlError::Kms(_)) => Err(e),
                Err(e) => {
                    // Unknown outcome: the KMS may have added the member. Keep the row
                    // `pending` (and its copy): the customer's DeleteSnapshot destroys both.
                    tracing::warn!(error = %e, snapshot = %row.snapshot_id, "CreateSnapshot: the KMS's answer was lost; the snapshot stays pending until deleted");
                    return Err(e);
                }
                Ok(r) => Ok(r),
            },
        };
        if let Err(e) = made {
            // Undo: the copy (if any) and the row; the KMS added no member.
            if let Err(u) = storage.delete(&node, &row.snapshot_id).await {
                tracing::warn!(error = %u, snapshot = %row.snapshot_id, "releasing a failed snapshot's storage failed");
            }
            let _ = self.repo.transition_snapshot(
                &c.tenant,
                &row.snapshot_id,
                SnapshotState::Pending,
                SnapshotState::Deleting,
            );
            let _ = self.repo.delete_snapshot(&c.tenant, &row.snapshot_id);
            return Err(e);
        }
        self.repo.transition_snapshot(
            &c.tenant,
            &row.snapshot_id,
            SnapshotState::Pending,
            SnapshotState::Completed,
        )?;
        tracing::info!(tenant = %c.tenant, volume = %v.volume_id, snapshot = %row.snapshot_id, "snapshot completed");
        Ok(snapshot_json(&SnapshotRow {
            state: SnapshotState::Completed,
            ..row
        }))
    }

    pub(crate) fn describe_snapshots(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<Value, ControlError> {
        let all = self.repo.snapshots(tenant)?;
        for id in ids {
            if !all.iter().any(|s| &s.snapshot_id == id) {
                return Err(ControlError::NoSuchSnapshot);
            }
        }
        let out: Vec<Value> = all
            .iter()
            .filter(|s| ids.is_empty() || ids.contains(&s.snapshot_id))
            .map(snapshot_json)
            .collect();
        Ok(json!({ "Snapshots": out }))
    }

    /// DeleteSnapshot: the row goes to `deleting` (compare-and-set; a repeat finishes it), the
    /// KMS drops the snapshot from its key family (on the customer's signed DeleteSnapshot),
    /// then the node releases the copy. Volumes made from it are untouched.
    pub(crate) async fn delete_snapshot(
        &self,
        c: &Caller,
        r: &SnapshotRef,
    ) -> Result<Value, ControlError> {
        let s = self
            .repo
            .snapshot(&c.tenant, &r.snapshot_id)?
            .ok_or(ControlError::NoSuchSnapshot)?;
        if s.state == SnapshotState::Pending
            && now().saturating_sub(s.created) < PENDING_DELETE_AFTER_SECS
        {
            // Its create may still be running: deleting now could race its ShareDataKey.
            return Err(ControlError::WrongState);
        }
        if s.state != SnapshotState::Deleting {
            self.repo
                .transition_snapshot(&c.tenant, &s.snapshot_id, s.state, SnapshotState::Deleting)
                .map_err(|e| match e {
                    crate::repo::RepoError::Stale => ControlError::WrongState,
                    e => e.into(),
                })?;
        }
        match self
            .kms(&DestroyDataKeyRequest {
                volume_id: s.snapshot_id.clone(),
                customer_request: c.forwarded.clone(),
            })
            .await
        {
            Ok(_) => {}
            // A snapshot left `pending` (a crash, or a lost KMS answer) that the KMS never
            // added: not a member. Also on a repeat of such a delete (the row is `deleting`).
            Err(ControlError::Kms("no_grant"))
                if matches!(s.state, SnapshotState::Pending | SnapshotState::Deleting) => {}
            Err(e) => return Err(e),
        }
        if let Some(node) = &s.storage_node {
            self.storage()?.delete(node, &s.snapshot_id).await?;
        }
        self.repo.delete_snapshot(&c.tenant, &s.snapshot_id)?;
        Ok(json!({ "SnapshotId": s.snapshot_id, "State": "deleted" }))
    }

    /// CreateVolume with `SnapshotId`: a completed snapshot of the caller's only (another
    /// tenant's is `no_such_snapshot`, and the refusal is audited as the call's outcome), at
    /// least its size, on its storage node, in its key family.
    pub(crate) async fn create_volume_from_snapshot(
        &self,
        c: &Caller,
        r: &CreateVolume,
        snapshot_id: &str,
    ) -> Result<Value, ControlError> {
        let Some(s) = self
            .repo
            .snapshot(&c.tenant, snapshot_id)?
            .filter(|s| s.state == SnapshotState::Completed)
        else {
            tracing::warn!(tenant = %c.tenant, snapshot = snapshot_id, "CreateVolume from a snapshot that is not the caller's completed snapshot: refused");
            return Err(ControlError::NoSuchSnapshot);
        };
        if r.size_gib < s.size_gib || r.kms_key_id.as_ref().is_some_and(|k| *k != s.kms_key_id) {
            return Err(ControlError::BadShape);
        }
        let node = s
            .storage_node
            .clone()
            .ok_or(ControlError::Unsupported("snapshots of host-local volumes"))?;
        // The row first (`creating`): it must exist whenever the KMS may hold the new member,
        // so that DeleteVolume always reaches it.
        let row = VolumeRow {
            volume_id: new_id("vol"),
            tenant_id: c.tenant.clone(),
            size_gib: r.size_gib,
            kms_key_id: s.kms_key_id.clone(),
            ciphertext_blob: s.ciphertext_blob.clone(),
            state: VolumeState::Creating,
            instance_id: None,
            host_id: None,
            created: now(),
            storage_node: Some(node.clone()),
        };
        let storage = self.storage()?;
        self.repo.insert_volume(&row)?;
        if let Err(e) = storage
            .create_from(&node, &row.volume_id, r.size_gib, &s.snapshot_id)
            .await
        {
            // Before the KMS was asked: nothing to erase, the copy (if any) and the row go.
            self.unmake_creating_volume(&row).await;
            return Err(e);
        }
        let row = self.key_volume_from_snapshot(c, row, &s).await?;
        let mut v = volume_json(&row);
        v["SnapshotId"] = json!(s.snapshot_id);
        Ok(v)
    }

    /// The KMS step of CreateVolume from a snapshot, on a `creating` row whose storage copy is
    /// made: the volume joins the snapshot's key family (`ShareDataKey`), then the row becomes
    /// `available`. A typed KMS refusal (no member was added) undoes the copy and the row; an
    /// unknown outcome (transport error, timeout, an answer that does not parse) keeps both, and
    /// so does a failure to record `available` after the KMS added the member: the customer's
    /// DeleteVolume then destroys whatever membership the KMS made.
    pub(crate) async fn key_volume_from_snapshot(
        &self,
        c: &Caller,
        row: VolumeRow,
        s: &SnapshotRow,
    ) -> Result<VolumeRow, ControlError> {
        match self
            .kms(&ShareDataKeyRequest {
                source_id: s.snapshot_id.clone(),
                member_id: row.volume_id.clone(),
                ciphertext_blob: B64.encode(&s.ciphertext_blob),
                customer_request: c.forwarded.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(e @ ControlError::Kms(_)) => {
                self.unmake_creating_volume(&row).await;
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, volume = %row.volume_id, snapshot = %s.snapshot_id, "CreateVolume from a snapshot: the KMS's answer was lost; the volume stays creating until deleted");
                return Err(e);
            }
        }
        self.repo.transition_volume(
            &row.tenant_id,
            &row.volume_id,
            VolumeState::Creating,
            VolumeState::Available,
            None,
            None,
        )?;
        tracing::info!(tenant = %row.tenant_id, volume = %row.volume_id, snapshot = %s.snapshot_id, "volume created from a snapshot");
        Ok(VolumeRow {
            state: VolumeState::Available,
            ..row
        })
    }

    /// Undo of a `creating` volume the KMS holds no membership of: its storage and its row.
    async fn unmake_creating_volume(&self, row: &VolumeRow) {
        if let (Some(node), Ok(storage)) = (&row.storage_node, self.storage()) {
            if let Err(u) = storage.delete(node, &row.volume_id).await {
                tracing::warn!(error = %u, volume = %row.volume_id, "releasing an unkeyed volume's storage failed");
            }
        }
        let _ = self.repo.transition_volume(
            &row.tenant_id,
            &row.volume_id,
            VolumeState::Creating,
            VolumeState::Deleting,
            None,
            None,
        );
        let _ = self.repo.delete_volume(&row.tenant_id, &row.volume_id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bulkhead_ec2_query::bh1::SignedParts;
    use bulkhead_kms_proto::{CustomerRequest, ForwardedRequest};

    use super::*;
    use crate::workflow::tests::{cp, rt};

    fn caller() -> Caller {
        Caller {
            tenant: "t-a".into(),
            access_key_id: "AK".into(),
            forwarded: CustomerRequest::from(ForwardedRequest {
                authorization: "BH1-HMAC-SHA256 Credential=X".into(),
                parts: SignedParts {
                    method: "POST".into(),
                    path: "/v1/DeleteSnapshot".into(),
                    query: String::new(),
                    host: "cp:8443".into(),
                    date: "20261206T000000Z".into(),
                    body: "{}".into(),
                    nonce: "abcdefabcdefabcdef".into(),
                },
            }),
        }
    }

    fn pending(id: &str, created: u64) -> SnapshotRow {
        SnapshotRow {
            snapshot_id: id.into(),
            tenant_id: "t-a".into(),
            volume_id: "vol-1".into(),
            size_gib: 1,
            kms_key_id: "key-1".into(),
            ciphertext_blob: vec![1, 2, 3],
            state: SnapshotState::Pending,
            storage_node: None,
            created,
        }
    }

    /// A `pending` snapshot whose create may still run is not deleted (its `ShareDataKey` could
    /// land after the delete and leave a key-family member no row names); an old one is taken
    /// to `deleting` and, while the KMS does not answer, stays there for a repeat.
    #[test]
    fn a_pending_snapshot_is_deleted_only_once_its_create_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        let c = caller();
        cp.repo
            .insert_snapshot(&pending("snap-new", now()))
            .unwrap();
        let r = rt().block_on(cp.delete_snapshot(
            &c,
            &SnapshotRef {
                snapshot_id: "snap-new".into(),
                client_token: None,
            },
        ));
        assert!(matches!(r, Err(ControlError::WrongState)), "{r:?}");
        let row = cp.repo.snapshot("t-a", "snap-new").unwrap().unwrap();
        assert_eq!(row.state, SnapshotState::Pending, "nothing changed");

        let old = now() - PENDING_DELETE_AFTER_SECS - 1;
        cp.repo.insert_snapshot(&pending("snap-old", old)).unwrap();
        let r = rt().block_on(cp.delete_snapshot(
            &c,
            &SnapshotRef {
                snapshot_id: "snap-old".into(),
                client_token: None,
            },
        ));
        assert!(r.is_err(), "the KMS answers nothing here: {r:?}");
        let row = cp.repo.snapshot("t-a", "snap-old").unwrap().unwrap();
        assert_eq!(
            row.state,
            SnapshotState::Deleting,
            "kept for a repeat of the delete, never dropped without the KMS"
        );
    }

    /// A configuration without storage nodes refuses CreateSnapshot before any row is written
    /// (a `pending` row left behind could be deleted only 15 minutes later).
    #[test]
    fn create_snapshot_without_storage_leaves_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        let mut v = creating("vol-1", now());
        v.state = VolumeState::Available;
        cp.repo.insert_volume(&v).unwrap();
        let r = rt().block_on(cp.create_snapshot(
            &caller(),
            &CreateSnapshot {
                volume_id: "vol-1".into(),
                client_token: None,
            },
        ));
        assert!(matches!(r, Err(ControlError::Internal)), "{r:?}");
        assert!(cp.repo.snapshots("t-a").unwrap().is_empty(), "no row left");
    }

    fn creating(id: &str, created: u64) -> VolumeRow {
        VolumeRow {
            volume_id: id.into(),
            tenant_id: "t-a".into(),
            size_gib: 2,
            kms_key_id: "key-1".into(),
            ciphertext_blob: vec![1, 2, 3],
            state: VolumeState::Creating,
            instance_id: None,
            host_id: None,
            created,
            storage_node: Some("storage-1".into()),
        }
    }

    fn delete(cp: &ControlPlane, id: &str) -> Result<Value, ControlError> {
        rt().block_on(cp.delete_volume(&caller(), id))
    }

    /// CreateVolume from a snapshot records its row `creating` before the KMS is asked; a lost
    /// `ShareDataKey` answer keeps it (the KMS may have added the member), a fresh one is not
    /// deleted (its create may still run), an old one is taken to `deleting` and stays there,
    /// for a repeat, while the KMS does not answer: a membership is never left without a row.
    #[test]
    fn a_volume_whose_share_answer_was_lost_stays_for_delete_volume() {
        let dir = tempfile::tempdir().unwrap();
        // A storage node that answers nothing either.
        let ca = bulkhead_tokens::pki::CaDir::new(dir.path().join("ca"));
        let cp = cp(dir.path());
        let https = bulkhead_mtls::HttpsClient::from_ca(
            &ca.ca_pem(),
            Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
        )
        .unwrap();
        let node = crate::storage::StorageNodeConfig {
            node_id: "storage-1".into(),
            api_addr: "127.0.0.1:9".into(),
            nbd_addr: "127.0.0.1:9".into(),
        };
        let cp = cp.with_storage(crate::storage::Storage::new(vec![node], https));
        let c = caller();
        let mut snap = pending("snap-1", now());
        snap.state = SnapshotState::Completed;
        snap.storage_node = Some("storage-1".into());
        cp.repo.insert_snapshot(&snap).unwrap();

        // A failure before the KMS was asked (here: the storage copy) leaves no row.
        let req = CreateVolume {
            size_gib: 2,
            encrypted: None,
            kms_key_id: None,
            snapshot_id: Some("snap-1".into()),
            client_token: None,
        };
        let r = rt().block_on(cp.create_volume_from_snapshot(&c, &req, "snap-1"));
        assert!(matches!(r, Err(ControlError::Upstream)), "{r:?}");
        assert!(cp.repo.volumes("t-a").unwrap().is_empty(), "undone");

        // The copy made, the KMS's answer lost: the row stays `creating`.
        cp.repo.insert_volume(&creating("vol-new", now())).unwrap();
        let r = rt().block_on(cp.key_volume_from_snapshot(&c, creating("vol-new", now()), &snap));
        assert!(matches!(r, Err(ControlError::Upstream)), "{r:?}");
        let row = cp.repo.volume("t-a", "vol-new").unwrap().unwrap();
        assert_eq!(row.state, VolumeState::Creating, "kept for DeleteVolume");

        // Its create may still be running: not deleted, nothing changed.
        let r = delete(&cp, "vol-new");
        assert!(matches!(r, Err(ControlError::WrongState)), "{r:?}");
        let row = cp.repo.volume("t-a", "vol-new").unwrap().unwrap();
        assert_eq!(row.state, VolumeState::Creating);

        // Long after: taken to `deleting`, and kept there while the KMS does not answer.
        let old = now() - PENDING_DELETE_AFTER_SECS - 1;
        cp.repo.insert_volume(&creating("vol-old", old)).unwrap();
        let r = delete(&cp, "vol-old");
        assert!(matches!(r, Err(ControlError::Upstream)), "{r:?}");
        let row = cp.repo.volume("t-a", "vol-old").unwrap().unwrap();
        assert_eq!(
            row.state,
            VolumeState::Deleting,
            "kept for a repeat of the delete, never dropped without the KMS"
        );
        assert!(matches!(
            delete(&cp, "vol-old"),
            Err(ControlError::Upstream)
        ));
        assert!(cp.repo.volume("t-a", "vol-old").unwrap().is_some());
    }
}
