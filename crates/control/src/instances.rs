//! RunInstances and TerminateInstances as workflows ([`crate::workflow`]), and the single-call
//! lifecycle operations (Start/StopInstances).

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
    Reserve,
    /// CreateInstance on the host. Undo: TerminateInstance on the host.
    Create,
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

fn inst_res(w: &WorkflowRow) -> Result<[String; 1], ControlError> {
    Ok([format!("instance:{}", w.instance()?)])
}

/// A lifecycle call (`verb`) for `w`'s instance on its host; `also_ok` codes count as done
/// (the call was repeated after a crash).
async fn host_lifecycle(
    cp: &ControlPlane,
    w: &WorkflowRow,
    op: Operation,
    verb: &str,
    also_ok: &[&str],
) -> Result<(), ControlError> {
    let r = cp
        .on_host(
            w.host()?,
            op,
            &inst_res(w)?,
            "POST",
            &format!("/v1/instances/{}/{verb}", w.instance()?),
            None,
        )
        .await;
    match r {
        Ok(_) => Ok(()),
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
                let host_id = cp.reserve(w, r).await?;
                Ok(json!({ "host_id": host_id }))
            }
            RunStep::Create => {
                let r = live.run.ok_or(ControlError::Internal)?;
                let row = cp
                    .repo
                    .instance(&w.tenant_id, w.instance()?)?
                    .ok_or(ControlError::NoSuchInstance)?;
                cp.on_host(
                    w.host()?,
                    Operation::CreateInstance,
                    &inst_res(w)?,
                    "POST",
                    "/v1/instances",
                    Some(create_body(&row, r.user_data.as_deref())),
                )
                .await?;
                Ok(Value::Null)
            }
            RunStep::Start => {
                // Repeated after a crash, the host may already run it.
                host_lifecycle(cp, w, Operation::StartInstance, "start", &["wrong_state"]).await?;
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
        RunStep::Start,
        RunStep::Commit,
    ];

    fn repeatable(self) -> bool {
        matches!(self, RunStep::Start | RunStep::Commit)
    }

    fn may_act_on_error(self) -> bool {
        matches!(self, RunStep::Create | RunStep::Start)
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
                    Ok(())
                }
                RunStep::Create if w.host_id.is_some() => {
                    host_lifecycle(
                        cp,
                        w,
                        Operation::TerminateInstance,
                        "terminate",
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
                    if let Err(e) = cp.detach(&w.tenant_id, &v.volume_id).await {
                        tracing::warn!(volume = %v.volume_id, code = e.code(), "detach before terminate failed");
                    }
                }
            }
            TerminateStep::Stop => {
                host_lifecycle(
                    cp,
                    w,
                    Operation::TerminateInstance,
                    "terminate",
                    &["no_such_instance", "wrong_state"],
                )
                .await?
            }
            TerminateStep::Commit => set_state(cp, w, InstanceState::Terminated)?,
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
        Ok(json!({ "Instances": [instance_json(&row)] }))
    }

    /// Start/Stop/TerminateInstances; a termination is a [`TerminateStep`] workflow.
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
            let ids = (Some(i.instance_id.as_str()), None, Some(i.host_id.as_str()));
            if op == Operation::TerminateInstance {
                let mut w = self.begin(Kind::Terminate, &c.tenant, ids.0, ids.1, ids.2)?;
                self.drive::<TerminateStep>(&mut w, Live::default()).await?;
            } else {
                // One host call: not a workflow (nothing to resume or undo), not stored.
                let w = WorkflowRow::new(Kind::Terminate, &c.tenant, ids.0, ids.1, ids.2);
                host_lifecycle(self, &w, op, verb, &[]).await?;
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
