//! One customer call end to end: authenticate and parse ([`ControlPlane::handle`]), audit the
//! decision, honour the idempotency token, act ([`ControlPlane::perform`]), and the table from
//! each [`ControlRequest`] to the operation that serves it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_audit::EntryKind;
use bulkhead_controller_proto::calls;
use bulkhead_kms_proto::{
    CreateKeyRequest, DestroyDataKeyRequest, GenerateDataKeyRequest, RevokeGrantRequest,
};
use bulkhead_tokens::Operation;
use serde_json::{json, Value};

use super::{instance_json, new_id, now, volume_json, Caller, ControlPlane, RawRequest};
use crate::api::ControlRequest;
use crate::repo::VolumeRow;
use crate::state::{InstanceState, VolumeState};
use crate::ControlError;

impl ControlPlane {
    /// Handles one customer request end to end. Returns (status, JSON body).
    pub async fn handle(&self, r: RawRequest) -> (u16, Value) {
        let request_id = new_id("req");
        let op_name = r
            .path
            .strip_prefix("/v1/")
            .unwrap_or("-")
            .chars()
            .take(40)
            .collect::<String>();
        let decided = self.authenticate(&r).and_then(|c| {
            let req = ControlRequest::parse(&r.method, &r.path, &r.body)?;
            Ok((c, req))
        });
        let (caller, req) = match decided {
            Ok(x) => x,
            Err(e) => {
                let _ = self
                    .audit(
                        EntryKind::Request,
                        &request_id,
                        ("-", ""),
                        &op_name,
                        vec![],
                        Some(&r.body),
                        e.code(),
                    )
                    .await;
                return error_body(&e, &request_id);
            }
        };
        match self.perform(&request_id, &caller, req, &r.body).await {
            Ok(v) => (200, v),
            Err(e) => error_body(&e, &request_id),
        }
    }

    /// One authenticated, parsed call, whichever front end it came through (the JSON API or the
    /// EC2 Query API): audit the decision durably, honour the idempotency token (`body` is what
    /// was signed: its hash tells a retry from a different call), act, audit the outcome.
    pub(crate) async fn perform(
        &self,
        request_id: &str,
        caller: &Caller,
        req: ControlRequest,
        body: &str,
    ) -> Result<Value, ControlError> {
        let who = (caller.tenant.as_str(), caller.access_key_id.as_str());
        self.audit(
            EntryKind::Request,
            request_id,
            who,
            req.action(),
            vec![format!("tenant:{}", caller.tenant)],
            Some(body),
            "ok",
        )
        .await?;
        let idem = match req.client_token() {
            Some(t) => Some((t.to_string(), self.request_mac(body)?)),
            None => None,
        };
        if let Some((token, hash)) = &idem {
            match self.repo.idempotency(&caller.tenant, req.action(), token) {
                Ok(Some((h, resp))) if &h == hash => {
                    let v = serde_json::from_str(&resp).unwrap_or(Value::Null);
                    let _ = self
                        .audit(
                            EntryKind::Outcome,
                            request_id,
                            who,
                            req.action(),
                            vec![],
                            None,
                            "idempotent_replay",
                        )
                        .await;
                    return Ok(v);
                }
                Ok(Some(_)) => return Err(ControlError::IdempotencyMismatch),
                Ok(None) => {}
                Err(e) => return Err(ControlError::Repo(e)),
            }
        }
        let action = req.action();
        let result = self.execute(caller, req).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        let _ = self
            .audit(
                EntryKind::Outcome,
                request_id,
                who,
                action,
                vec![],
                None,
                code,
            )
            .await;
        match &result {
            Ok(v) => {
                if let Some((token, hash)) = idem {
                    if let Err(e) = self.repo.put_idempotency(
                        &caller.tenant,
                        action,
                        &token,
                        &hash,
                        &v.to_string(),
                    ) {
                        tracing::error!(error = %e, "idempotency record not stored");
                    }
                }
                tracing::info!(tenant = %caller.tenant, action, request_id, "ok");
            }
            Err(e) => {
                tracing::info!(tenant = %caller.tenant, action, request_id, code = e.code(), "refused");
            }
        }
        result
    }

    pub(super) async fn execute(
        &self,
        c: &Caller,
        req: ControlRequest,
    ) -> Result<Value, ControlError> {
        match req {
            ControlRequest::RunInstances(r) => self.run_instance(c, r).await,
            ControlRequest::DescribeInstances(r) => {
                let all = self.repo.instances(&c.tenant)?;
                for id in &r.instance_ids {
                    if !all.iter().any(|i| &i.instance_id == id) {
                        return Err(ControlError::NoSuchInstance);
                    }
                }
                let ifs = self.repo.interfaces(&c.tenant)?;
                let groups = self.repo.security_groups(&c.tenant)?;
                let out: Vec<Value> = all
                    .iter()
                    .filter(|i| {
                        r.instance_ids.is_empty() || r.instance_ids.contains(&i.instance_id)
                    })
                    .map(|i| {
                        let mut v = instance_json(i);
                        if let Some(n) = ifs.iter().find(|n| n.instance_id == i.instance_id) {
                            crate::vpcs::add_interface_json(&mut v, n, &groups);
                        }
                        v
                    })
                    .collect();
                Ok(json!({ "Instances": out }))
            }
            ControlRequest::StopInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::StopInstance,
                    InstanceState::Stopped,
                )
                .await
            }
            ControlRequest::StartInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::StartInstance,
                    InstanceState::Running,
                )
                .await
            }
            ControlRequest::TerminateInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::TerminateInstance,
                    InstanceState::Terminated,
                )
                .await
            }
            ControlRequest::CreateVolume(r) if r.snapshot_id.is_some() => {
                let sid = r.snapshot_id.clone().unwrap_or_default();
                self.create_volume_from_snapshot(c, &r, &sid).await
            }
            ControlRequest::CreateSnapshot(r) => self.create_snapshot(c, &r).await,
            ControlRequest::DescribeSnapshots(r) => {
                self.describe_snapshots(&c.tenant, &r.snapshot_ids)
            }
            ControlRequest::DeleteSnapshot(r) => self.delete_snapshot(c, &r).await,
            ControlRequest::CreateVolume(r) => {
                let volume_id = new_id("vol");
                // A network volume's storage first: nothing of the customer's one-use
                // authorization is spent if the node refuses.
                let node = match &self.storage {
                    Some(s) => {
                        let n = s.place(&volume_id).ok_or(ControlError::Internal)?;
                        s.create(&n.node_id, &volume_id, r.size_gib).await?;
                        Some(n.node_id.clone())
                    }
                    None => None,
                };
                let v = self
                    .kms(&GenerateDataKeyRequest {
                        key_id: r.kms_key_id.clone(),
                        volume_id: volume_id.clone(),
                        customer_request: c.forwarded.clone(),
                    })
                    .await;
                let v = match (v, &node) {
                    (Ok(v), _) => v,
                    (Err(e), Some(n)) => {
                        if let Err(e) = self.storage()?.delete(n, &volume_id).await {
                            tracing::warn!(error = %e, volume = %volume_id, "releasing an unkeyed volume's storage failed");
                        }
                        return Err(e);
                    }
                    (Err(e), None) => return Err(e),
                };
                let blob = B64
                    .decode(&v.ciphertext_blob)
                    .map_err(|_| ControlError::Internal)?;
                let key_id = v.key_id;
                let row = VolumeRow {
                    volume_id,
                    tenant_id: c.tenant.clone(),
                    size_gib: r.size_gib,
                    kms_key_id: key_id,
                    ciphertext_blob: blob,
                    state: VolumeState::Available,
                    instance_id: None,
                    host_id: None,
                    created: now(),
                    storage_node: node,
                };
                self.repo.insert_volume(&row)?;
                Ok(volume_json(&row))
            }
            ControlRequest::DescribeVolumes(r) => {
                let all = self.repo.volumes(&c.tenant)?;
                for id in &r.volume_ids {
                    if !all.iter().any(|v| &v.volume_id == id) {
                        return Err(ControlError::NoSuchVolume);
                    }
                }
                let out: Vec<Value> = all
                    .iter()
                    .filter(|v| r.volume_ids.is_empty() || r.volume_ids.contains(&v.volume_id))
                    .map(volume_json)
                    .collect();
                Ok(json!({ "Volumes": out }))
            }
            ControlRequest::AttachVolume(r) => self.attach(c, &r.volume_id, &r.instance_id).await,
            ControlRequest::DetachVolume(r) => {
                self.detach(&c.tenant, &r.volume_id, r.force == Some(true))
                    .await
            }
            ControlRequest::DeleteVolume(r) => self.delete_volume(c, &r.volume_id).await,
            ControlRequest::GetConsoleOutput(r) => {
                let i = self
                    .repo
                    .instance(&c.tenant, &r.instance_id)?
                    .ok_or(ControlError::NoSuchInstance)?;
                let host = self.host(&i.host_id)?;
                let call = calls::GetConsole {
                    instance_id: i.instance_id.clone(),
                };
                let v = self.hosts.call(&host.host_id, &host.addr, &call).await?;
                Ok(json!({ "InstanceId": i.instance_id, "Output": v.output }))
            }
            ControlRequest::CreateKey(_) => {
                let v = self
                    .kms(&CreateKeyRequest {
                        customer_request: c.forwarded.clone(),
                    })
                    .await?;
                Ok(json!({ "KeyId": v.key_id }))
            }
            ControlRequest::CreateVpc(r) => self.create_vpc(c, &r).await,
            ControlRequest::DescribeVpcs(r) => self.describe_vpcs(&c.tenant, &r.vpc_ids),
            ControlRequest::DeleteVpc(r) => self.delete_vpc(&c.tenant, &r.vpc_id),
            ControlRequest::CreateSubnet(r) => self.create_subnet(&c.tenant, &r),
            ControlRequest::DescribeSubnets(r) => self.describe_subnets(&c.tenant, &r.subnet_ids),
            ControlRequest::DeleteSubnet(r) => self.delete_subnet(&c.tenant, &r.subnet_id),
            ControlRequest::CreateSecurityGroup(r) => self.create_security_group(&c.tenant, &r),
            ControlRequest::AuthorizeSecurityGroupIngress(r) => {
                self.change_ingress(&c.tenant, &r, true).await
            }
            ControlRequest::RevokeSecurityGroupIngress(r) => {
                self.change_ingress(&c.tenant, &r, false).await
            }
            ControlRequest::DescribeSecurityGroups(r) => {
                self.describe_security_groups(&c.tenant, &r.group_ids)
            }
            ControlRequest::RevokeGrant(r) => {
                let v = self
                    .kms(&RevokeGrantRequest {
                        key_id: r.key_id.clone(),
                        volume_id: r.volume_id.clone(),
                        customer_request: c.forwarded.clone(),
                    })
                    .await?;
                Ok(json!({ "KeyId": r.key_id, "VolumeId": r.volume_id, "Revoked": v.revoked }))
            }
        }
    }
}

impl ControlPlane {
    /// DeleteVolume: the row is taken to `deleting` by compare-and-set (from `available`, or
    /// from `creating` once its create has certainly ended), then the KMS crypto-erases its
    /// key on the customer's own signed request, then its storage and its row go. A delete
    /// interrupted after the first step finishes on a repeat.
    pub(crate) async fn delete_volume(
        &self,
        c: &Caller,
        volume_id: &str,
    ) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        // An attach's first step needs the volume `available` too, so the two cannot both
        // proceed.
        let take = |from: VolumeState| {
            self.repo
                .transition_volume(
                    &c.tenant,
                    volume_id,
                    from,
                    VolumeState::Deleting,
                    None,
                    None,
                )
                .map_err(|e| match e {
                    crate::repo::RepoError::Stale => ControlError::VolumeInUse,
                    e => e.into(),
                })
        };
        match v.state {
            VolumeState::Available => take(VolumeState::Available)?,
            // A create from a snapshot that may still be running: deleting now could race its
            // ShareDataKey and leave a key-family member no row names.
            VolumeState::Creating
                if now().saturating_sub(v.created)
                    < crate::snapshots::PENDING_DELETE_AFTER_SECS =>
            {
                return Err(ControlError::WrongState)
            }
            VolumeState::Creating => take(VolumeState::Creating)?,
            VolumeState::Deleting => {}
            _ => return Err(ControlError::VolumeInUse),
        }
        // Crypto-erase first: once the KMS has destroyed the data key (or this volume's
        // key-family membership), whatever ciphertext remains anywhere is noise. A crash after
        // it leaves a `deleting` row whose repeat finishes the delete.
        match self
            .kms(&DestroyDataKeyRequest {
                volume_id: volume_id.to_string(),
                customer_request: c.forwarded.clone(),
            })
            .await
        {
            Ok(_) => {}
            // A volume left `creating` (a lost KMS answer) that the KMS never added: nothing to
            // erase. Also on a repeat of such a delete (the row is `deleting`).
            Err(ControlError::Kms("no_grant"))
                if matches!(v.state, VolumeState::Creating | VolumeState::Deleting) => {}
            Err(e) => return Err(e),
        }
        self.release_storage(&v).await?;
        if !self.repo.delete_volume(&c.tenant, volume_id)? {
            return Err(ControlError::VolumeInUse);
        }
        Ok(json!({ "VolumeId": volume_id, "State": "deleted" }))
    }
}

pub(crate) fn error_body(e: &ControlError, request_id: &str) -> (u16, Value) {
    (
        e.status(),
        json!({"error": {"code": e.code(), "message": e.to_string(), "request_id": request_id}}),
    )
}
