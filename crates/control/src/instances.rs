//! RunInstances and the lifecycle calls (Start/Stop/TerminateInstances) against the hosts.

use bulkhead_tokens::Operation;
use serde_json::{json, Value};

use crate::api;
use crate::repo::InstanceRow;
use crate::service::{instance_json, new_id, now, Caller, ControlPlane, THREADS_PER_CORE};
use crate::state::InstanceState;
use crate::ControlError;

impl ControlPlane {
    pub(crate) async fn run_instance(
        &self,
        c: &Caller,
        r: api::RunInstances,
    ) -> Result<Value, ControlError> {
        let cores = r.vcpus.div_ceil(THREADS_PER_CORE);
        let dedicated = r.tenancy.as_deref() == Some("dedicated");
        let row = {
            let _g = self.placement.lock().await;
            let mut hosts = self.repo.hosts()?;
            let live = self.repo.live_instances()?;
            // The best host with room that attests; a host that fails is left out and the
            // next best is tried.
            let mut refused = 0;
            let host_id = loop {
                let Some((host_id, _)) = Self::place(&hosts, &live, &c.tenant, cores, dedicated)
                else {
                    return Err(if refused > 0 {
                        ControlError::NoAttestedHost
                    } else {
                        ControlError::NoCapacity
                    });
                };
                let h = hosts
                    .iter()
                    .find(|h| h.host_id == host_id)
                    .cloned()
                    .ok_or(ControlError::Internal)?;
                match self.ensure_attested(&h).await {
                    Ok(()) => break host_id,
                    Err(e) => {
                        tracing::warn!(host = %host_id, code = e.code(), "not placing on a host that did not attest");
                        refused += 1;
                        hosts.retain(|x| x.host_id != host_id);
                    }
                }
            };
            let row = InstanceRow {
                instance_id: new_id("i"),
                tenant_id: c.tenant.clone(),
                host_id: host_id.clone(),
                image_id: r.image_id.clone(),
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                cores,
                dedicated,
                state: InstanceState::Pending,
                created: now(),
            };
            self.repo.insert_instance(&row)?;
            self.repo
                .set_host_dedicated(&host_id, if dedicated { Some(&c.tenant) } else { None })?;
            row
        };
        let host = self.host(&row.host_id)?;
        let res = [format!("instance:{}", row.instance_id)];
        let created = async {
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::CreateInstance,
                    &res,
                    "POST",
                    "/v1/instances",
                    Some(create_body(&row, r.user_data.as_deref())),
                )
                .await?;
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::StartInstance,
                    &res,
                    "POST",
                    &format!("/v1/instances/{}/start", row.instance_id),
                    None,
                )
                .await
        }
        .await;
        if let Err(e) = created {
            // Release the reservation; the instance never ran.
            let _ = self
                .hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::TerminateInstance,
                    &res,
                    "POST",
                    &format!("/v1/instances/{}/terminate", row.instance_id),
                    None,
                )
                .await;
            self.repo.set_instance_state(
                &c.tenant,
                &row.instance_id,
                InstanceState::Pending,
                InstanceState::Terminated,
            )?;
            return Err(e);
        }
        self.repo.set_instance_state(
            &c.tenant,
            &row.instance_id,
            InstanceState::Pending,
            InstanceState::Running,
        )?;
        let mut out = row;
        out.state = InstanceState::Running;
        Ok(json!({ "Instances": [instance_json(&out)] }))
    }

    pub(crate) async fn lifecycle(
        &self,
        c: &Caller,
        ids: &[String],
        op: Operation,
        verb: &str,
        to: InstanceState,
    ) -> Result<Value, ControlError> {
        if ids.is_empty() {
            return Err(ControlError::BadShape);
        }
        let mut rows = Vec::new();
        for id in ids {
            rows.push(
                self.repo
                    .instance(&c.tenant, id)?
                    .ok_or(ControlError::NoSuchInstance)?,
            );
        }
        let mut out = Vec::new();
        for i in rows {
            if !i.state.can_become(to) {
                return Err(ControlError::WrongState);
            }
            let host = self.host(&i.host_id)?;
            if op == Operation::TerminateInstance {
                for v in self
                    .repo
                    .volumes(&c.tenant)?
                    .into_iter()
                    .filter(|v| v.instance_id.as_deref() == Some(&i.instance_id))
                {
                    let _ = self.detach(c, &v.volume_id).await;
                }
            }
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    op,
                    &[format!("instance:{}", i.instance_id)],
                    "POST",
                    &format!("/v1/instances/{}/{verb}", i.instance_id),
                    None,
                )
                .await?;
            self.repo
                .set_instance_state(&c.tenant, &i.instance_id, i.state, to)?;
            out.push(json!({
                "InstanceId": i.instance_id,
                "PreviousState": i.state.as_str(),
                "CurrentState": to.as_str(),
            }));
        }
        Ok(json!({ "Instances": out }))
    }
}

/// The controller's CreateInstance body; `user_data` only when the customer gave one.
pub(crate) fn create_body(row: &InstanceRow, user_data: Option<&str>) -> Value {
    let mut body = json!({
        "instance_id": row.instance_id,
        "image": row.image_id,
        "vcpus": row.vcpus,
        "memory_mib": row.memory_mib,
    });
    if let (Some(u), Some(o)) = (user_data, body.as_object_mut()) {
        o.insert("user_data".into(), Value::String(u.to_owned()));
    }
    body
}
