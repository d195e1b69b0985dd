//! The attach and detach flows: KMS re-wrap to the instance's attested host, the host's block
//! card, and the undo of every step that ran when a later one fails.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_tokens::Operation;
use serde_json::{json, Value};

use crate::service::{Caller, ControlPlane};
use crate::state::{InstanceState, VolumeState};
use crate::ControlError;

impl ControlPlane {
    /// The attach flow: volume + instance owned by the caller → mark attaching → KMS re-wraps
    /// the data key to the instance's host key under the customer's forwarded AttachVolume →
    /// the host controller hands the sealed blob to the block card → in-use. Any failure rolls
    /// the volume back to available (and asks the host to drop the key).
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
        let host_pub = self
            .host_keys
            .get(&host.host_id)
            .ok_or(ControlError::Internal)?;
        self.repo
            .transition_volume(
                &c.tenant,
                volume_id,
                VolumeState::Available,
                VolumeState::Attaching,
                Some(instance_id),
                Some(&host.host_id),
            )
            .map_err(|_| ControlError::VolumeInUse)?;
        let res = [
            format!("instance:{instance_id}"),
            format!("volume:{volume_id}"),
        ];
        let flow = async {
            // Host attestation: a one-time KMS nonce, quoted by the host's TPM (relayed by its
            // controller), checked by the KMS before it releases the key.
            let challenge = self
                .kms_call("Challenge", &json!({ "host_id": host.host_id }))
                .await?;
            let evidence = if challenge["required"] == true {
                let nonce = challenge["nonce"].as_str().ok_or(ControlError::Internal)?;
                Some(
                    self.hosts
                        .call(
                            &host.host_id,
                            &host.addr,
                            Operation::AttestHost,
                            &["host".to_string(), format!("instance:{instance_id}")],
                            "POST",
                            "/v1/host/attest",
                            // Bound to the instance: the host quotes only if it runs it, and the
                            // KMS recomputes the binding from the customer's signed request.
                            Some(json!({ "nonce": nonce, "instance_id": instance_id })),
                        )
                        .await?,
                )
            } else {
                None
            };
            let sealed = self
                .kms_call(
                    "DecryptForHost",
                    &json!({
                        "volume_id": volume_id,
                        "ciphertext_blob": B64.encode(&v.ciphertext_blob),
                        "host_id": host.host_id,
                        "host_public_key": B64.encode(host_pub),
                        "customer_request": c.forwarded,
                        "evidence": evidence,
                    }),
                )
                .await?;
            let sealed_key = sealed["sealed_key"]
                .as_str()
                .ok_or(ControlError::Internal)?
                .to_string();
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::AttachVolume,
                    &res,
                    "POST",
                    &format!("/v1/instances/{instance_id}/volumes"),
                    Some(json!({"volume_id": volume_id, "sealed_key": sealed_key})),
                )
                .await
        }
        .await;
        match flow {
            Ok(_) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Attaching,
                    VolumeState::InUse,
                    Some(instance_id),
                    Some(&host.host_id),
                )?;
                Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "attached"}))
            }
            Err(e) => {
                if matches!(e, ControlError::Upstream | ControlError::Host(_)) {
                    let _ = self
                        .hosts
                        .call(
                            &host.host_id,
                            &host.addr,
                            Operation::DetachVolume,
                            &res,
                            "DELETE",
                            &format!("/v1/instances/{instance_id}/volumes/{volume_id}"),
                            None,
                        )
                        .await;
                }
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Attaching,
                    VolumeState::Available,
                    None,
                    None,
                )?;
                Err(e)
            }
        }
    }

    pub(crate) async fn detach(&self, c: &Caller, volume_id: &str) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        if v.state != VolumeState::InUse {
            return Err(ControlError::WrongState);
        }
        let (Some(instance_id), Some(host_id)) = (v.instance_id.clone(), v.host_id.clone()) else {
            return Err(ControlError::Internal);
        };
        self.repo
            .transition_volume(
                &c.tenant,
                volume_id,
                VolumeState::InUse,
                VolumeState::Detaching,
                Some(&instance_id),
                Some(&host_id),
            )
            .map_err(|_| ControlError::WrongState)?;
        let host = self.host(&host_id)?;
        let r = self
            .hosts
            .call(
                &host.host_id,
                &host.addr,
                Operation::DetachVolume,
                &[
                    format!("instance:{instance_id}"),
                    format!("volume:{volume_id}"),
                ],
                "DELETE",
                &format!("/v1/instances/{instance_id}/volumes/{volume_id}"),
                None,
            )
            .await;
        match r {
            Ok(_)
            | Err(ControlError::Host("no_such_volume"))
            | Err(ControlError::Host("no_such_instance")) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Detaching,
                    VolumeState::Available,
                    None,
                    None,
                )?;
                Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "detached"}))
            }
            Err(e) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Detaching,
                    VolumeState::InUse,
                    Some(&instance_id),
                    Some(&host_id),
                )?;
                Err(e)
            }
        }
    }
}
