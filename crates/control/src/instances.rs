//! RunInstances and TerminateInstances as workflows ([`crate::workflow`]), and the single-call
//! lifecycle operations (Start/StopInstances).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_controller_proto::{
    calls, AttachNetworkRequest, AttestRequest, CreateInstanceRequest, NetworkRequest,
};
use bulkhead_kms_proto::{ChallengeRequest, SealVpcKeyRequest};
use bulkhead_tokens::Operation;
use serde_json::{json, Value};

use crate::api;
use crate::repo::{InstanceRow, RepoError};
use crate::service::{instance_json, new_id, Caller, ControlPlane};
use crate::state::{InstanceState, VolumeState};
use crate::workflow::{Kind, Live, StepFuture, Steps, WorkflowRow};
use crate::ControlError;

/// RunInstances, in order. An interrupted run is finished once the host created the instance
/// (starting it and recording it are safe to repeat), and unwound before that (placement is
/// decided under the placement lock of a live call (`scheduler`), and the user data is never stored, so
/// neither is redone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStep {
    /// Placement (best attested host with room) and the `pending` row that holds its cores
    /// (`{"host_id"}`). Undo: the row `pending → terminated`, releasing the cores.
    /// Also the instance's interface: the lowest free address of its subnet (the tenant's
    /// default subnet, made on first use, when it names none), a card id and MAC.
    /// Undo: the row `pending → terminated`, releasing the cores and the address.
    Reserve,
    /// CreateInstance on the host, with its `network` (no key). Undo: TerminateInstance on the
    /// host.
    Create,
    /// The instance's net card: a KMS nonce, the host's quote bound to the instance, KMS
    /// SealVpcKey under the customer's forwarded RunInstances (spent once: never repeated),
    /// the controller launches the card (`{"net_endpoint"}`), and every other card of the VPC
    /// gets the new route. A host that reports no net support (`network_unavailable`) leaves
    /// the instance without a network (`{"net": "skipped"}`, a warning). Undo: none of its own
    /// (Create's undo terminates the instance and its card with it).
    Network,
    /// StartInstance on the host.
    Start,
    /// The row `pending → running`.
    Commit,
}

/// TerminateInstances, per instance; every step is safe to repeat, so an interrupted
/// termination is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateStep {
    /// Each volume attached to the instance is detached (a detach workflow each).
    Detach,
    /// TerminateInstance on the host.
    Stop,
    /// The row → `terminated`.
    Commit,
}

/// A lifecycle call (`op`: Start, Stop, Reboot or TerminateInstance) for `w`'s instance on
/// its host; `also_ok` codes count as done (the call was repeated after a crash).
async fn host_lifecycle(
    cp: &ControlPlane,
    w: &WorkflowRow,
    op: Operation,
    also_ok: &[&str],
) -> Result<(), ControlError> {
    let (host, instance_id) = (w.host()?, w.instance()?.to_string());
    let r = match op {
        Operation::StartInstance => cp
            .on_host(host, &calls::StartInstance { instance_id })
            .await
            .map(drop),
        Operation::StopInstance => cp
            .on_host(host, &calls::StopInstance { instance_id })
            .await
            .map(drop),
        Operation::RebootInstance => cp
            .on_host(host, &calls::RebootInstance { instance_id })
            .await
            .map(drop),
        Operation::TerminateInstance => cp
            .on_host(host, &calls::TerminateInstance { instance_id })
            .await
            .map(drop),
        _ => return Err(ControlError::Internal),
    };
    match r {
        Ok(()) => Ok(()),
        Err(ControlError::Host(c)) if also_ok.contains(&c) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The instance row `→ to`, from whatever it is now; already at `to` is success.
fn set_state(cp: &ControlPlane, w: &WorkflowRow, to: InstanceState) -> Result<(), ControlError> {
    let i = cp
        .repo
        .instance(&w.tenant_id, w.instance()?)?
        .ok_or(ControlError::NoSuchInstance)?;
    if i.state == to {
        return Ok(());
    }
    match cp
        .repo
        .set_instance_state(&w.tenant_id, w.instance()?, i.state, to)
    {
        Err(RepoError::Transition(_)) => Err(ControlError::WrongState),
        r => Ok(r?),
    }
}

impl RunStep {
    async fn run(
        self,
        cp: &ControlPlane,
        w: &WorkflowRow,
        live: Live<'_>,
    ) -> Result<Value, ControlError> {
        match self {
            RunStep::Reserve => {
                let r = live.run.ok_or(ControlError::Internal)?;
                let c = live.caller.ok_or(ControlError::Internal)?;
                // The address first: a subnet or group that is not the caller's is refused
                // before any host is chosen.
                let (subnet, groups) = cp
                    .network_for(c, r.subnet_id.as_deref(), &r.security_group_ids)
                    .await?;
                let nic =
                    cp.repo
                        .allocate_interface(&w.tenant_id, w.instance()?, &subnet, &groups)?;
                tracing::info!(instance = %nic.instance_id, ip = %nic.ip, subnet = %nic.subnet_id, card = nic.card_id, "private address allocated");
                let host_id = cp.reserve(w, r).await?;
                Ok(json!({ "host_id": host_id }))
            }
            RunStep::Create => {
                let r = live.run.ok_or(ControlError::Internal)?;
                let row = cp
                    .repo
                    .instance(&w.tenant_id, w.instance()?)?
                    .ok_or(ControlError::NoSuchInstance)?;
                let mut body = create_body(&row, r.user_data.as_deref());
                body.network = cp.network_body(&w.tenant_id, w.instance()?)?;
                cp.on_host(w.host()?, &calls::CreateInstance(body)).await?;
                Ok(Value::Null)
            }
            RunStep::Network => cp.network_step(w, live).await,
            RunStep::Start => {
                // Repeated after a crash, the host may already run it.
                host_lifecycle(cp, w, Operation::StartInstance, &["wrong_state"]).await?;
                Ok(Value::Null)
            }
            RunStep::Commit => {
                set_state(cp, w, InstanceState::Running)?;
                Ok(Value::Null)
            }
        }
    }
}

impl Steps for RunStep {
    const KIND: Kind = Kind::Run;
    const ALL: &'static [Self] = &[
        RunStep::Reserve,
        RunStep::Create,
        RunStep::Network,
        RunStep::Start,
        RunStep::Commit,
    ];

    fn repeatable(self) -> bool {
        matches!(self, RunStep::Start | RunStep::Commit)
    }

    fn may_act_on_error(self) -> bool {
        // Reserve may have allocated the address before placement failed.
        matches!(self, RunStep::Reserve | RunStep::Create | RunStep::Start)
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
        Box::pin(async move {
            match self {
                // Release the reservation; the instance never ran.
                RunStep::Reserve => {
                    let i = cp.repo.instance(&w.tenant_id, w.instance()?)?;
                    if i.is_some_and(|i| i.state == InstanceState::Pending) {
                        set_state(cp, w, InstanceState::Terminated)?;
                    }
                    cp.release_address(&w.tenant_id, w.instance()?).await?;
                    Ok(())
                }
                RunStep::Create if w.host_id.is_some() => {
                    host_lifecycle(
                        cp,
                        w,
                        Operation::TerminateInstance,
                        &["no_such_instance", "wrong_state"],
                    )
                    .await
                }
                _ => Ok(()),
            }
        })
    }
}

impl TerminateStep {
    async fn run(self, cp: &ControlPlane, w: &WorkflowRow) -> Result<Value, ControlError> {
        match self {
            TerminateStep::Detach => {
                for v in cp.repo.volumes(&w.tenant_id)?.into_iter().filter(|v| {
                    v.instance_id.as_deref() == w.instance_id.as_deref()
                        && v.state == VolumeState::InUse
                }) {
                    if let Err(e) = cp.detach(&w.tenant_id, &v.volume_id, false).await {
                        tracing::warn!(volume = %v.volume_id, code = e.code(), "detach before terminate failed");
                    }
                }
            }
            TerminateStep::Stop => {
                host_lifecycle(
                    cp,
                    w,
                    Operation::TerminateInstance,
                    &["no_such_instance", "wrong_state"],
                )
                .await?
            }
            TerminateStep::Commit => {
                set_state(cp, w, InstanceState::Terminated)?;
                cp.release_address(&w.tenant_id, w.instance()?).await?;
            }
        }
        Ok(Value::Null)
    }
}

impl Steps for TerminateStep {
    const KIND: Kind = Kind::Terminate;
    const ALL: &'static [Self] = &[
        TerminateStep::Detach,
        TerminateStep::Stop,
        TerminateStep::Commit,
    ];

    fn forward<'a>(
        self,
        cp: &'a ControlPlane,
        w: &'a WorkflowRow,
        _: Live<'a>,
    ) -> StepFuture<'a, Value> {
        Box::pin(self.run(cp, w))
    }

    // No undo: a detached card or a terminated guest cannot be brought back.
}

impl ControlPlane {
    /// RunInstances: the [`RunStep`]s for a new instance id.
    pub(crate) async fn run_instance(
        &self,
        c: &Caller,
        r: api::RunInstances,
    ) -> Result<Value, ControlError> {
        let id = new_id("i");
        let mut w = self.begin(Kind::Run, &c.tenant, Some(&id), None, None)?;
        let live = Live {
            caller: Some(c),
            run: Some(&r),
        };
        self.drive::<RunStep>(&mut w, live).await?;
        let row = self
            .repo
            .instance(&c.tenant, &id)?
            .ok_or(ControlError::Internal)?;
        let mut v = instance_json(&row);
        if let Some(n) = self
            .repo
            .interfaces(&c.tenant)?
            .iter()
            .find(|n| n.instance_id == id)
        {
            crate::vpcs::add_interface_json(&mut v, n, &self.repo.security_groups(&c.tenant)?);
        }
        Ok(json!({ "Instances": [v] }))
    }

    /// Frees a terminated (or never started) instance's address, MAC and card id, and takes its
    /// route off the other cards of its VPC. Safe to repeat.
    pub(crate) async fn release_address(
        &self,
        tenant: &str,
        instance: &str,
    ) -> Result<(), ControlError> {
        let nic = self
            .repo
            .interfaces(tenant)?
            .into_iter()
            .find(|n| n.instance_id == instance);
        if let Some(n) = nic {
            self.repo.release_interface(tenant, instance)?;
            tracing::info!(instance, ip = %n.ip, "private address released");
            if n.endpoint.is_some() {
                self.push_routes(tenant, &n.vpc_id, instance).await;
            }
        }
        Ok(())
    }

    /// The `network` object of the controller's CreateInstance (contract 6), or `None` when
    /// the instance has no interface.
    pub(crate) fn network_body(
        &self,
        tenant: &str,
        instance: &str,
    ) -> Result<Option<NetworkRequest>, ControlError> {
        let all = self.repo.interfaces(tenant)?;
        let Some(n) = all.iter().find(|n| n.instance_id == instance) else {
            return Ok(None);
        };
        let vpc = self
            .repo
            .vpc(tenant, &n.vpc_id)?
            .ok_or(ControlError::Internal)?;
        let subnet = self
            .repo
            .subnets(tenant)?
            .into_iter()
            .find(|s| s.subnet_id == n.subnet_id)
            .ok_or(ControlError::Internal)?;
        let groups = self.repo.security_groups(tenant)?;
        Ok(Some(NetworkRequest {
            vpc: vpc.vpc_number,
            card_id: n.card_id,
            mac: n.mac.to_string(),
            ip: n.ip.to_string(),
            prefix: subnet.cidr.prefix(),
            gateway: Some(subnet.cidr.gateway().to_string()),
            mtu: Some(crate::net::GUEST_MTU),
            allow: self.allow_for(n, &groups),
            routes: self.routes_for(n, &all),
        }))
    }

    /// [`RunStep::Network`].
    async fn network_step(&self, w: &WorkflowRow, live: Live<'_>) -> Result<Value, ControlError> {
        let instance = w.instance()?;
        let host_id = w.host()?;
        let Some(nic) = self
            .repo
            .interfaces(&w.tenant_id)?
            .into_iter()
            .find(|n| n.instance_id == instance)
        else {
            return Ok(Value::Null);
        };
        let vpc = self
            .repo
            .vpc(&w.tenant_id, &nic.vpc_id)?
            .ok_or(ControlError::Internal)?;
        // Only a live call holds the customer's authorization; it is never stored.
        let c = live.caller.ok_or(ControlError::Internal)?;
        let ch = self
            .kms(&ChallengeRequest {
                host_id: host_id.to_string(),
            })
            .await?;
        let evidence = if ch.required {
            let nonce = ch.nonce;
            // Bound to the instance: the host quotes only if it runs it.
            let call = calls::AttestHost(AttestRequest {
                nonce,
                instance_id: Some(instance.to_string()),
                credential: None,
            });
            // Either kind: the KMS verifies a sealed host's boot evidence itself.
            Some(self.on_host(host_id, &call).await?.0)
        } else {
            None
        };
        let host_pub = self.host_keys.get(host_id).ok_or(ControlError::Internal)?;
        let sealed = self
            .kms(&SealVpcKeyRequest {
                customer_request: c.forwarded.clone(),
                vpc_id: vpc.vpc_id.clone(),
                epoch: vpc.epoch,
                instance_id: instance.to_string(),
                host_id: host_id.to_string(),
                host_public_key: B64.encode(host_pub),
                evidence,
            })
            .await?;
        let call = calls::AttachNetwork {
            instance_id: instance.to_string(),
            body: AttachNetworkRequest {
                epoch: vpc.epoch,
                sealed_epoch_key: sealed.sealed_epoch_key.to_hex(),
            },
        };
        let r = self.on_host(host_id, &call).await;
        let v = match r {
            Ok(v) => v,
            Err(ControlError::Host("network_unavailable")) => {
                // TODO(issue 13): a host without net cards (no data network configured) runs
                // the instance without a network; the customer sees no sign of it yet.
                tracing::warn!(
                    instance,
                    host = host_id,
                    "Network step skipped: the host reports no net support"
                );
                return Ok(json!({ "net": "skipped" }));
            }
            Err(e) => return Err(e),
        };
        let endpoint = v.net_endpoint.as_str();
        self.repo
            .set_interface_endpoint(&w.tenant_id, instance, endpoint)?;
        let told = self.push_routes(&w.tenant_id, &nic.vpc_id, instance).await;
        tracing::info!(instance, endpoint, peers_told = told, "net card up");
        Ok(json!({ "net_endpoint": endpoint }))
    }

    /// Start/Stop/TerminateInstances; a termination is a [`TerminateStep`] workflow.
    pub(crate) async fn lifecycle(
        &self,
        c: &Caller,
        ids: &[String],
        op: Operation,
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
            let ids = (Some(i.instance_id.as_str()), None, Some(i.host_id.as_str()));
            if op == Operation::TerminateInstance {
                let mut w = self.begin(Kind::Terminate, &c.tenant, ids.0, ids.1, ids.2)?;
                self.drive::<TerminateStep>(&mut w, Live::default()).await?;
            } else {
                // One host call: not a workflow (nothing to resume or undo), not stored.
                let w = WorkflowRow::new(Kind::Terminate, &c.tenant, ids.0, ids.1, ids.2);
                host_lifecycle(self, &w, op, &[]).await?;
                self.repo
                    .set_instance_state(&c.tenant, &i.instance_id, i.state, to)?;
            }
            out.push(json!({
                "InstanceId": i.instance_id,
                "PreviousState": i.state.as_str(),
                "CurrentState": to.as_str(),
            }));
        }
        Ok(json!({ "Instances": out }))
    }
}

/// The controller's CreateInstance body (without its `network`); `user_data` and
/// `instance_storage_gib` only when the customer gave them.
pub(crate) fn create_body(row: &InstanceRow, user_data: Option<&str>) -> CreateInstanceRequest {
    CreateInstanceRequest {
        instance_id: row.instance_id.clone(),
        image: row.image_id.clone(),
        vcpus: row.vcpus,
        memory_mib: row.memory_mib,
        user_data: user_data.map(str::to_owned),
        network: None,
        instance_storage_gib: row.instance_storage_gib,
    }
}
