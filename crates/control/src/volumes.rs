//! The attach and detach workflows ([`crate::workflow`]): KMS re-wrap to the instance's attested
//! host, the host's block card, each step with its undo.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_controller_proto::{calls, AttachVolumeRequest, AttestRequest, VolumeStorageRequest};
use bulkhead_kms_proto::{ChallengeRequest, DecryptForHostRequest};
use serde_json::{json, Value};

use crate::repo::RepoError;
use crate::service::{Caller, ControlPlane};
use crate::state::{InstanceState, VolumeState};
use crate::workflow::{Kind, Live, StepFuture, Steps, WorkflowRow};
use crate::ControlError;

/// AttachVolume, in order. Every step but [`AttachStep::Release`] is safe to repeat; that one
/// spends the customer's forwarded authorization (the KMS honours it once), so an attach
/// interrupted before its sealed key was recorded is unwound, and one interrupted after it is
/// finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStep {
    /// Volume `available → attaching`, naming the instance and host. Undo: back to available.
    Mark,
    /// A one-time KMS nonce for the host (`{"nonce"}`; null when the KMS needs no attestation).
    Challenge,
    /// The host's TPM quote of the nonce, bound to the instance (`{"evidence"}`).
    Attest,
    /// KMS DecryptForHost under the customer's forwarded AttachVolume (`{"sealed_key"}`).
    Release,
    /// A network volume: its storage node grants it to this host at a new generation and cuts
    /// every other host's connection to it (fencing). Nothing for a host-local volume. Undo:
    /// revoke at a newer generation.
    Grant,
    /// The host's controller starts the block card with the sealed key and hot-plugs the disk.
    /// Undo: DetachVolume on the host (the card zeroizes the key).
    Plug,
    /// Volume `attaching → in-use`.
    Commit,
}

/// DetachVolume, in order; every step is safe to repeat, so an interrupted detach is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachStep {
    /// Volume `in-use → detaching`. Undo: back to in-use.
    Mark,
    /// DetachVolume on the host (the card zeroizes the key; a host that no longer has the
    /// volume or instance counts as done). A forced detach also counts an unreachable host as
    /// done: the next step fences it.
    Unplug,
    /// A network volume: its storage node revokes the host's grant (a host that comes back
    /// cannot reopen the volume). Nothing for a host-local volume.
    Revoke,
    /// Volume `detaching → available`.
    Commit,
}

/// Moves `w`'s volume `from → to`; when it is already at `to` for the same instance (a step
/// repeated after a crash), that is success.
fn move_volume(
    cp: &ControlPlane,
    w: &WorkflowRow,
    from: VolumeState,
    to: VolumeState,
) -> Result<(), ControlError> {
    let attached = matches!(
        to,
        VolumeState::Attaching | VolumeState::InUse | VolumeState::Detaching
    );
    let (inst, host) = if attached {
        (Some(w.instance()?), Some(w.host()?))
    } else {
        (None, None)
    };
    match cp
        .repo
        .transition_volume(&w.tenant_id, w.volume()?, from, to, inst, host)
    {
        Ok(()) => Ok(()),
        Err(RepoError::Stale) => {
            let v = cp.repo.volume(&w.tenant_id, w.volume()?)?;
            match v {
                Some(v) if v.state == to && v.instance_id.as_deref() == inst => Ok(()),
                _ => Err(ControlError::WrongState),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Undo of a volume move: back `to → from`, only if the volume is still where this workflow
/// left it (for this instance); anything else is not ours to change.
fn move_back(
    cp: &ControlPlane,
    w: &WorkflowRow,
    at: VolumeState,
    back: VolumeState,
) -> Result<(), ControlError> {
    let Some(v) = cp.repo.volume(&w.tenant_id, w.volume()?)? else {
        return Ok(());
    };
    if v.state != at || v.instance_id.as_deref() != Some(w.instance()?) {
        return Ok(());
    }
    let keep = back == VolumeState::InUse;
    cp.repo.transition_volume(
        &w.tenant_id,
        w.volume()?,
        at,
        back,
        keep.then_some(w.instance()?),
        if keep { w.host_id.as_deref() } else { None },
    )?;
    Ok(())
}

/// DetachVolume on `w`'s host; a host that no longer has the volume or the instance is done.
async fn unplug(cp: &ControlPlane, w: &WorkflowRow) -> Result<(), ControlError> {
    let call = calls::DetachVolume {
        instance_id: w.instance()?.to_string(),
        volume_id: w.volume()?.to_string(),
    };
    match cp.on_host(w.host()?, &call).await {
        Ok(_)
        | Err(ControlError::Host("no_such_volume"))
        | Err(ControlError::Host("no_such_instance")) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The storage node of `w`'s volume, if it is a network volume.
fn storage_node(cp: &ControlPlane, w: &WorkflowRow) -> Result<Option<String>, ControlError> {
    Ok(cp
        .repo
        .volume(&w.tenant_id, w.volume()?)?
        .ok_or(ControlError::NoSuchVolume)?
        .storage_node)
}

/// Revokes `w`'s host's grant of a network volume at a new generation.
async fn revoke(cp: &ControlPlane, w: &WorkflowRow) -> Result<(), ControlError> {
    match storage_node(cp, w)? {
        Some(node) => cp.storage()?.revoke(&node, w.volume()?).await,
        None => Ok(()),
    }
}

fn done<'a>() -> StepFuture<'a, ()> {
    Box::pin(async { Ok(()) })
}

impl AttachStep {
    async fn run(
        self,
        cp: &ControlPlane,
        w: &WorkflowRow,
        live: Live<'_>,
    ) -> Result<Value, ControlError> {
        let host_id = w.host()?;
        match self {
            // Strict (never repeated): a volume another attach holds is refused.
            AttachStep::Mark => {
                cp.repo
                    .transition_volume(
                        &w.tenant_id,
                        w.volume()?,
                        VolumeState::Available,
                        VolumeState::Attaching,
                        Some(w.instance()?),
                        Some(host_id),
                    )
                    .map_err(|_| ControlError::VolumeInUse)?;
                Ok(Value::Null)
            }
            // Host attestation: a one-time KMS nonce, quoted by the host's TPM (relayed by its
            // controller), checked by the KMS before it releases the key.
            AttachStep::Challenge => {
                let c = cp
                    .kms(&ChallengeRequest {
                        host_id: host_id.to_string(),
                    })
                    .await?;
                let nonce = c.required.then_some(c.nonce);
                Ok(json!({ "nonce": nonce }))
            }
            AttachStep::Attest => {
                let Some(nonce) = w.output("nonce") else {
                    return Ok(json!({ "evidence": null }));
                };
                // Bound to the instance: the host quotes only if it runs it, and the KMS
                // recomputes the binding from the customer's signed request.
                let call = calls::AttestHost(AttestRequest {
                    nonce: nonce.to_string(),
                    instance_id: Some(w.instance()?.to_string()),
                    credential: None,
                });
                let evidence = cp.on_host(host_id, &call).await?;
                Ok(json!({ "evidence": evidence }))
            }
            AttachStep::Release => {
                // Only a live call holds the customer's authorization; it is never stored.
                let c = live.caller.ok_or(ControlError::Internal)?;
                let v = cp
                    .repo
                    .volume(&w.tenant_id, w.volume()?)?
                    .ok_or(ControlError::NoSuchVolume)?;
                let host_pub = cp.host_keys.get(host_id).ok_or(ControlError::Internal)?;
                let sealed = cp
                    .kms(&DecryptForHostRequest {
                        volume_id: v.volume_id,
                        ciphertext_blob: B64.encode(&v.ciphertext_blob),
                        host_id: host_id.to_string(),
                        host_public_key: B64.encode(host_pub),
                        customer_request: c.forwarded.clone(),
                        evidence: crate::evidence_of(w.outputs.get("evidence"))?,
                    })
                    .await?;
                Ok(json!({ "sealed_key": sealed.sealed_key.to_base64() }))
            }
            AttachStep::Grant => {
                if let Some(node) = storage_node(cp, w)? {
                    cp.storage()?.grant(&node, w.volume()?, host_id).await?;
                }
                Ok(Value::Null)
            }
            AttachStep::Plug => {
                let sealed_key = w.output("sealed_key").ok_or(ControlError::Internal)?;
                let storage = match storage_node(cp, w)? {
                    Some(node) => {
                        let n = cp.storage()?.node(&node)?;
                        Some(VolumeStorageRequest {
                            node: n.node_id.clone(),
                            nbd_addr: n.nbd_addr.clone(),
                        })
                    }
                    None => None,
                };
                let call = calls::AttachVolume {
                    instance_id: w.instance()?.to_string(),
                    body: AttachVolumeRequest {
                        volume_id: w.volume()?.to_string(),
                        sealed_key: sealed_key.to_string(),
                        storage,
                    },
                };
                match cp.on_host(host_id, &call).await {
                    // Repeated after a crash: the card already has it.
                    Ok(_) | Err(ControlError::Host("volume_attached")) => Ok(Value::Null),
                    Err(e) => Err(e),
                }
            }
            AttachStep::Commit => {
                move_volume(cp, w, VolumeState::Attaching, VolumeState::InUse)?;
                Ok(Value::Null)
            }
        }
    }
}

impl Steps for AttachStep {
    const KIND: Kind = Kind::Attach;
    const ALL: &'static [Self] = &[
        AttachStep::Mark,
        AttachStep::Challenge,
        AttachStep::Attest,
        AttachStep::Release,
        AttachStep::Grant,
        AttachStep::Plug,
        AttachStep::Commit,
    ];

    fn repeatable(self) -> bool {
        // Mark is a compare-and-set from available: after a crash the volume is no longer
        // available, and a fresh nonce, quote and release would need the spent authorization.
        matches!(
            self,
            AttachStep::Challenge
                | AttachStep::Attest
                | AttachStep::Grant
                | AttachStep::Plug
                | AttachStep::Commit
        )
    }

    fn may_act_on_error(self) -> bool {
        // A failed or timed-out hot-plug may have left the card keyed.
        self == AttachStep::Plug
    }

    fn forward<'a>(
        self,
        cp: &'a ControlPlane,
        w: &'a WorkflowRow,
        live: Live<'a>,
    ) -> StepFuture<'a, Value> {
        Box::pin(self.run(cp, w, live))
    }

    fn undo<'a>(self, cp: &'a ControlPlane, w: &'a WorkflowRow) -> StepFuture<'a, ()> {
        match self {
            AttachStep::Mark => {
                Box::pin(
                    async move { move_back(cp, w, VolumeState::Attaching, VolumeState::Available) },
                )
            }
            AttachStep::Plug => Box::pin(unplug(cp, w)),
            AttachStep::Grant => Box::pin(revoke(cp, w)),
            // Nothing to take back: a nonce expires, a quote is public, a sealed key only opens
            // on that host and is dropped with the workflow's outputs.
            _ => done(),
        }
    }
}

impl DetachStep {
    async fn run(self, cp: &ControlPlane, w: &WorkflowRow) -> Result<Value, ControlError> {
        match self {
            DetachStep::Mark => move_volume(cp, w, VolumeState::InUse, VolumeState::Detaching)?,
            DetachStep::Unplug => {
                match unplug(cp, w).await {
                    Err(ControlError::Upstream) if w.outputs.get("force") == Some(&json!(true)) => {
                        tracing::warn!(volume = w.volume()?, host = w.host()?, "forced detach: the host is unreachable; its storage grant is revoked next");
                    }
                    r => r?,
                }
            }
            DetachStep::Revoke => revoke(cp, w).await?,
            DetachStep::Commit => {
                move_volume(cp, w, VolumeState::Detaching, VolumeState::Available)?
            }
        }
        Ok(Value::Null)
    }
}

impl Steps for DetachStep {
    const KIND: Kind = Kind::Detach;
    const ALL: &'static [Self] = &[
        DetachStep::Mark,
        DetachStep::Unplug,
        DetachStep::Revoke,
        DetachStep::Commit,
    ];

    fn forward<'a>(
        self,
        cp: &'a ControlPlane,
        w: &'a WorkflowRow,
        _: Live<'a>,
    ) -> StepFuture<'a, Value> {
        Box::pin(self.run(cp, w))
    }

    fn undo<'a>(self, cp: &'a ControlPlane, w: &'a WorkflowRow) -> StepFuture<'a, ()> {
        match self {
            DetachStep::Mark => {
                Box::pin(
                    async move { move_back(cp, w, VolumeState::Detaching, VolumeState::InUse) },
                )
            }
            // A card that was stopped cannot be re-keyed without the customer: not undone.
            _ => done(),
        }
    }
}

impl ControlPlane {
    /// AttachVolume: volume and instance owned by the caller, then the [`AttachStep`]s.
    pub(crate) async fn attach(
        &self,
        c: &Caller,
        volume_id: &str,
        instance_id: &str,
    ) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        let i = self
            .repo
            .instance(&c.tenant, instance_id)?
            .ok_or(ControlError::NoSuchInstance)?;
        if !matches!(i.state, InstanceState::Running | InstanceState::Stopped) {
            return Err(ControlError::WrongState);
        }
        if v.state != VolumeState::Available {
            return Err(ControlError::VolumeInUse);
        }
        let host = self.host(&i.host_id)?;
        if !self.host_keys.contains_key(&host.host_id) {
            return Err(ControlError::Internal);
        }
        let mut w = self.begin(
            Kind::Attach,
            &c.tenant,
            Some(instance_id),
            Some(volume_id),
            Some(&host.host_id),
        )?;
        let live = Live {
            caller: Some(c),
            run: None,
        };
        self.drive::<AttachStep>(&mut w, live).await?;
        Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "attached"}))
    }

    /// DetachVolume (and the detaches of TerminateInstances): the [`DetachStep`]s.
    pub(crate) async fn detach(
        &self,
        tenant: &str,
        volume_id: &str,
        force: bool,
    ) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        if v.state != VolumeState::InUse {
            return Err(ControlError::WrongState);
        }
        let (Some(instance_id), Some(host_id)) = (v.instance_id.as_deref(), v.host_id.as_deref())
        else {
            return Err(ControlError::Internal);
        };
        let mut w = self.begin_with(
            Kind::Detach,
            tenant,
            Some(instance_id),
            Some(volume_id),
            Some(host_id),
            force.then(|| json!({ "force": true })),
        )?;
        self.drive::<DetachStep>(&mut w, Live::default()).await?;
        Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "detached"}))
    }
}
