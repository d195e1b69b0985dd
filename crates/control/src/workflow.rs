//! Multi-step operations (attach, detach, run, terminate) as explicit sequences of steps, each
//! with its undo, their progress durable after every step.
//!
//! A workflow is one row of the `workflows` table ([`store`]): its kind, tenant and resources,
//! how many steps it completed, what those steps produced (`outputs`, JSON) and its status
//! (`running`, `done`, `unwound`). The driver ([`ControlPlane::drive`]) runs the steps forward
//! and writes the row after each one; when a step fails it runs the undos of the steps that ran,
//! in reverse, and marks the row `unwound`.
//!
//! After a crash, [`ControlPlane::resume`] (called by the reconciler at start-up) finishes or
//! unwinds each workflow left `running`, from the step it reached: **forward** when every step
//! still to run is safe to repeat ([`Steps::repeatable`]: idempotent host calls and
//! compare-and-set state changes), **backward** otherwise. The step in flight at the crash may or
//! may not have acted, so its undo runs too (every undo is harmless when its step did nothing).
//! The KMS's DecryptForHost is the step that is never repeatable: it spends the customer's
//! forwarded authorization, which the KMS honours once and which is not stored, so an attach that
//! crashed before its sealed key was recorded is unwound, never asked again.
//!
//! A test-only fault hook ([`FAULT_ENV`]) exits the process at a chosen step, so the tests kill
//! the control plane at every step of a workflow instead of injecting state.

pub mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::api;
use crate::repo::RepoError;
use crate::service::{new_id, now, Caller, ControlPlane};
use crate::ControlError;

pub use store::{Claim, WorkflowStore};

/// How long a replica's hold on a running workflow lasts unless renewed (it renews every third
/// of it while a step runs, and with every step's progress).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// This replica's workflow ownership: its id (fresh per process) and its lease length.
///
/// Replicas share one PostgreSQL. A workflow is written only by the replica whose id the row
/// names, and only while it is `running`; the owner renews the lease while a step runs. A
/// replica that cannot renew (store unreachable) stops the step before its lease can run out,
/// and a replica killed -9 simply stops renewing: once the lease ended, any replica's periodic
/// sweep ([`ControlPlane::sweep_workflows`]) claims the row (one `UPDATE`, so exactly one
/// replica wins) and resumes or unwinds it by the same rules as after a restart. Lease times
/// are wall-clock milliseconds of the replicas' hosts (kept in sync by NTP; a skew shortens or
/// lengthens the take-over delay, and the self-stop margin of a third of the lease absorbs it).
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub ttl: Duration,
}

impl Default for Lease {
    fn default() -> Lease {
        Lease {
            owner: new_id("cp"),
            ttl: DEFAULT_LEASE,
        }
    }
}

impl Lease {
    /// A hold from now for one lease length.
    pub fn claim(&self) -> Claim {
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        Claim {
            owner: self.owner.clone(),
            until_ms: now_ms().saturating_add(ttl),
        }
    }
}

/// Wall-clock milliseconds since the epoch (lease times).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The store is gone or the workflow is another replica's now: stop acting, undo nothing
/// (the lease holder, or the sweep once the lease ends, finishes or unwinds it).
fn store_lost(e: &ControlError) -> bool {
    matches!(
        e,
        ControlError::Repo(RepoError::Unavailable | RepoError::LeaseLost)
    )
}

/// What a workflow does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Attach,
    Detach,
    Run,
    Terminate,
}

/// Where a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// In flight (or left so by a crash: the reconciler finishes or unwinds it).
    Running,
    Done,
    /// Failed; the undos of its completed steps ran.
    Unwound,
}

macro_rules! names {
    ($t:ty, $what:literal, $($v:ident => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
            pub fn parse(s: &str) -> Result<Self, crate::state::UnknownState> {
                match s {
                    $($s => Ok(Self::$v),)+
                    _ => Err(crate::state::UnknownState {
                        kind: $what,
                        name: s.chars().take(32).collect(),
                    }),
                }
            }
        }
    };
}
names!(Kind, "workflow kind", Attach => "attach", Detach => "detach", Run => "run", Terminate => "terminate");
names!(Status, "workflow status", Running => "running", Done => "done", Unwound => "unwound");

/// One workflow's durable record.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowRow {
    pub workflow_id: String,
    pub kind: Kind,
    pub tenant_id: String,
    pub instance_id: Option<String>,
    pub volume_id: Option<String>,
    pub host_id: Option<String>,
    /// How many steps completed (0: none yet).
    pub step: u32,
    /// What the completed steps produced (a JSON object), e.g. the attach's sealed key.
    pub outputs: Value,
    pub status: Status,
    pub created: u64,
    pub updated: u64,
}

impl WorkflowRow {
    pub fn new(
        kind: Kind,
        tenant: &str,
        instance: Option<&str>,
        volume: Option<&str>,
        host: Option<&str>,
    ) -> WorkflowRow {
        let t = now();
        WorkflowRow {
            workflow_id: new_id("wf"),
            kind,
            tenant_id: tenant.to_string(),
            instance_id: instance.map(str::to_string),
            volume_id: volume.map(str::to_string),
            host_id: host.map(str::to_string),
            step: 0,
            outputs: Value::Object(Map::new()),
            status: Status::Running,
            created: t,
            updated: t,
        }
    }

    /// The instance this workflow acts on (every kind has one).
    pub(crate) fn instance(&self) -> Result<&str, ControlError> {
        self.instance_id.as_deref().ok_or(ControlError::Internal)
    }

    pub(crate) fn volume(&self) -> Result<&str, ControlError> {
        self.volume_id.as_deref().ok_or(ControlError::Internal)
    }

    pub(crate) fn host(&self) -> Result<&str, ControlError> {
        self.host_id.as_deref().ok_or(ControlError::Internal)
    }

    /// A string output of an earlier step.
    pub(crate) fn output(&self, key: &str) -> Option<&str> {
        self.outputs.get(key).and_then(Value::as_str)
    }
}

/// What a live call brings that a resumed workflow does not have (nothing of it is stored).
#[derive(Clone, Copy, Default)]
pub(crate) struct Live<'a> {
    /// The customer, with the signed request the KMS may honour once.
    pub caller: Option<&'a Caller>,
    /// RunInstances' parameters (its user data is never stored).
    pub run: Option<&'a api::RunInstances>,
}

pub(crate) type StepFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ControlError>> + Send + 'a>>;

/// One workflow's steps, in order. Implemented by a step enum per workflow.
pub(crate) trait Steps: Copy + Send + Sync + std::fmt::Debug + 'static {
    const KIND: Kind;
    const ALL: &'static [Self];
    /// Safe to run again after a crash during or after it (the resume may go forward through it).
    fn repeatable(self) -> bool {
        true
    }
    /// A failure of this step may still have left an effect (a remote call that may have acted),
    /// so its own undo runs when it fails.
    fn may_act_on_error(self) -> bool {
        false
    }
    /// Runs the step; its outputs (a JSON object, or null) are merged into the row's.
    fn forward<'a>(
        self,
        cp: &'a ControlPlane,
        w: &'a WorkflowRow,
        live: Live<'a>,
    ) -> StepFuture<'a, Value>;
    /// Undoes the step; harmless when the step did nothing. By default there is nothing to undo.
    fn undo<'a>(self, _cp: &'a ControlPlane, _w: &'a WorkflowRow) -> StepFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The environment variable of the test-only fault hook.
pub const FAULT_ENV: &str = "BULKHEAD_FAULT";

/// A test-only fault: `workflow:<kind>:after:<N>` exits the control plane (status 70) right
/// after step N's progress is durable; `workflow:<kind>:before:<N>` right after step N acted but
/// before its progress is written. Read once by [`arm_fault`] at `serve` start-up, inert unless
/// set in the process's own environment: no API, configuration file or token can set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: Kind,
    pub step: u32,
    pub durable: bool,
}

impl Fault {
    pub fn parse(v: &str) -> Option<Fault> {
        let mut p = v.split(':');
        let (Some("workflow"), Some(kind), Some(when), Some(n), None) =
            (p.next(), p.next(), p.next(), p.next(), p.next())
        else {
            return None;
        };
        Some(Fault {
            kind: Kind::parse(kind).ok()?,
            durable: match when {
                "after" => true,
                "before" => false,
                _ => return None,
            },
            step: n.parse().ok().filter(|n| *n > 0)?,
        })
    }
}

static FAULT: OnceLock<Option<Fault>> = OnceLock::new();

/// Reads [`FAULT_ENV`] once (the `serve` start-up calls this; nothing else sets the hook).
pub fn arm_fault() -> Option<Fault> {
    *FAULT.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        let f = Fault::parse(&v);
        match f {
            Some(f) => tracing::warn!(fault = ?f, "{FAULT_ENV} is set: a test fault hook is armed"),
            None => tracing::warn!(value = %v, "{FAULT_ENV}: not a workflow fault, ignored"),
        }
        f
    })
}

fn fault_point(kind: Kind, step: u32, durable: bool) {
    if FAULT.get().copied().flatten()
        == Some(Fault {
            kind,
            step,
            durable,
        })
    {
        tracing::warn!(
            kind = kind.as_str(),
            step,
            durable,
            "{FAULT_ENV}: exiting at the armed step"
        );
        std::process::exit(70);
    }
}

/// Merges a step's outputs into the row's.
fn merge(into: &mut Value, out: Value) {
    if let (Some(dst), Value::Object(src)) = (into.as_object_mut(), out) {
        dst.extend(src);
    }
}

/// How a resumed workflow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    Finished,
    Unwound,
}

/// The resume decision from the persisted step: forward iff every step still to run is
/// repeatable.
pub(crate) fn goes_forward<S: Steps>(reached: u32) -> bool {
    let from = usize::try_from(reached).unwrap_or(usize::MAX);
    S::ALL
        .get(from..)
        .unwrap_or(&[])
        .iter()
        .all(|s| s.repeatable())
}

impl ControlPlane {
    /// Creates and stores a workflow row (step 0, running).
    pub(crate) fn begin(
        &self,
        kind: Kind,
        tenant: &str,
        instance: Option<&str>,
        volume: Option<&str>,
        host: Option<&str>,
    ) -> Result<WorkflowRow, ControlError> {
        self.begin_with(kind, tenant, instance, volume, host, None)
    }

    /// [`Self::begin`] with the workflow's parameters recorded as its first outputs (durable
    /// with the row, so a resumed workflow sees them too).
    pub(crate) fn begin_with(
        &self,
        kind: Kind,
        tenant: &str,
        instance: Option<&str>,
        volume: Option<&str>,
        host: Option<&str>,
        params: Option<Value>,
    ) -> Result<WorkflowRow, ControlError> {
        let mut w = WorkflowRow::new(kind, tenant, instance, volume, host);
        if let Some(p) = params {
            w.outputs = p;
        }
        match self.repo.insert_workflow(&w, &self.lease.claim()) {
            Ok(()) => Ok(w),
            // The volume already has a workflow running (on this replica or another).
            Err(RepoError::Conflict) if kind == Kind::Attach => Err(ControlError::VolumeInUse),
            Err(RepoError::Conflict) => Err(ControlError::WrongState),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, w: &mut WorkflowRow) -> Result<(), ControlError> {
        w.updated = now();
        self.repo.save_workflow(w, &self.lease.claim())?;
        Ok(())
    }

    /// Awaits a step while renewing the workflow's lease every third of it. When the lease is
    /// lost, or cannot be renewed before it would run out, the step is dropped (as a crash
    /// would drop it) and [`store_lost`]'s error returned.
    async fn renewing<T>(&self, id: &str, mut step: StepFuture<'_, T>) -> Result<T, ControlError> {
        let every = (self.lease.ttl / 3).max(Duration::from_millis(50));
        let mut held_until = Instant::now() + self.lease.ttl;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                r = &mut step => return r,
                _ = tick.tick() => {
                    let asked = Instant::now();
                    match self.repo.renew_workflow(id, &self.lease.claim()) {
                        Ok(()) => held_until = asked + self.lease.ttl,
                        Err(RepoError::LeaseLost) => {
                            tracing::error!(workflow = %id, "workflow lease lost to another replica: step abandoned");
                            return Err(RepoError::LeaseLost.into());
                        }
                        Err(e) => {
                            tracing::warn!(workflow = %id, error = %e, "workflow lease not renewed");
                            if held_until.saturating_duration_since(Instant::now()) <= every {
                                tracing::error!(workflow = %id, "workflow lease about to end: step abandoned");
                                return Err(RepoError::Unavailable.into());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs `w`'s steps from the one it reached to the end, durable after each; on a failure the
    /// completed steps are undone in reverse and the failure returned.
    pub(crate) async fn drive<S: Steps>(
        &self,
        w: &mut WorkflowRow,
        live: Live<'_>,
    ) -> Result<(), ControlError> {
        let from = usize::try_from(w.step).unwrap_or(usize::MAX);
        let id = w.workflow_id.clone();
        for (idx, s) in S::ALL.iter().enumerate().skip(from) {
            let started = std::time::Instant::now();
            match self.renewing(&id, s.forward(self, w, live)).await {
                Ok(out) => {
                    let took = started.elapsed();
                    self.step_times
                        .record(S::KIND.as_str(), &format!("{s:?}"), took);
                    tracing::info!(workflow = %w.workflow_id, kind = S::KIND.as_str(), step = ?s, ms = took.as_secs_f64() * 1e3, "workflow step done");
                    // A step may choose the host (RunInstances' placement).
                    if let Some(h) = out.get("host_id").and_then(Value::as_str) {
                        w.host_id = Some(h.to_string());
                    }
                    merge(&mut w.outputs, out);
                    w.step = u32::try_from(idx + 1).unwrap_or(u32::MAX);
                    if idx + 1 == S::ALL.len() {
                        w.status = Status::Done;
                        // Nothing a finished workflow produced is kept (the sealed key above all).
                        w.outputs = json!({});
                    }
                    fault_point(S::KIND, w.step, false);
                    if let Err(e) = self.save(w) {
                        if store_lost(&e) {
                            tracing::error!(workflow = %w.workflow_id, code = e.code(), "workflow progress not stored and the store is lost: left to the lease");
                            return Err(e);
                        }
                        tracing::error!(workflow = %w.workflow_id, code = e.code(), "workflow progress not stored: unwinding");
                        self.unwind::<S>(w, true, Some(e.code())).await;
                        return Err(e);
                    }
                    fault_point(S::KIND, w.step, true);
                }
                Err(e) if store_lost(&e) => {
                    tracing::error!(workflow = %w.workflow_id, kind = S::KIND.as_str(), step = ?s, code = e.code(), "workflow stopped: store lost, left to the lease");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(workflow = %w.workflow_id, kind = S::KIND.as_str(), step = ?s, code = e.code(), "workflow step failed: unwinding");
                    self.unwind::<S>(w, s.may_act_on_error(), Some(e.code()))
                        .await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Runs the undos of the completed steps in reverse (and of the step in flight, when
    /// `in_flight` says it may have acted), then marks `w` unwound, with the failure's code.
    pub(crate) async fn unwind<S: Steps>(
        &self,
        w: &mut WorkflowRow,
        in_flight: bool,
        error: Option<&str>,
    ) {
        let done = usize::try_from(w.step)
            .unwrap_or(usize::MAX)
            .min(S::ALL.len());
        let upto = if in_flight {
            (done + 1).min(S::ALL.len())
        } else {
            done
        };
        for s in S::ALL[..upto].iter().rev() {
            if let Err(e) = s.undo(self, w).await {
                tracing::warn!(workflow = %w.workflow_id, step = ?s, code = e.code(), "undo failed");
            }
        }
        w.status = Status::Unwound;
        w.outputs = match error {
            Some(code) => json!({ "error": code }),
            None => json!({}),
        };
        if let Err(e) = self.save(w) {
            tracing::error!(workflow = %w.workflow_id, code = e.code(), "unwound workflow not stored");
        }
    }

    /// Finishes or unwinds a workflow a crash left running (see the module doc).
    pub(crate) async fn resume<S: Steps>(&self, mut w: WorkflowRow) -> Resumed {
        if goes_forward::<S>(w.step) {
            tracing::warn!(workflow = %w.workflow_id, kind = S::KIND.as_str(), step = w.step, "resuming an interrupted workflow forward");
            match self.drive::<S>(&mut w, Live::default()).await {
                Ok(()) => Resumed::Finished,
                Err(_) => Resumed::Unwound,
            }
        } else {
            tracing::warn!(workflow = %w.workflow_id, kind = S::KIND.as_str(), step = w.step, "unwinding an interrupted workflow");
            self.unwind::<S>(&mut w, true, Some("interrupted")).await;
            Resumed::Unwound
        }
    }

    /// Uses `ttl` as this replica's workflow lease (default [`DEFAULT_LEASE`]).
    pub fn with_workflow_lease(mut self, ttl: Duration) -> ControlPlane {
        self.lease.ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// This replica's workflow lease length.
    pub fn workflow_lease(&self) -> Duration {
        self.lease.ttl
    }

    /// This replica's id (owner of the workflows it runs).
    pub fn replica_id(&self) -> &str {
        &self.lease.owner
    }

    /// Resumes `w` with its kind's steps.
    pub(crate) async fn resume_any(&self, w: WorkflowRow) -> Resumed {
        use crate::instances::{RunStep, TerminateStep};
        use crate::volumes::{AttachStep, DetachStep};
        match w.kind {
            Kind::Attach => self.resume::<AttachStep>(w).await,
            Kind::Detach => self.resume::<DetachStep>(w).await,
            Kind::Run => self.resume::<RunStep>(w).await,
            Kind::Terminate => self.resume::<TerminateStep>(w).await,
        }
    }

    /// One host call for a resource of a workflow (looks the host up first).
    pub(crate) async fn on_host<C: bulkhead_controller_proto::ControllerCall>(
        &self,
        host_id: &str,
        call: &C,
    ) -> Result<C::Response, ControlError> {
        let h = self.host(host_id)?;
        self.hosts.call(&h.host_id, &h.addr, call).await
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// How long each workflow step took (successful runs), per kind and step, since start: the
/// per-step breakdown of RunInstances, AttachVolume, DetachVolume and TerminateInstances that
/// `GET /v1/operator/metrics` serves and the attach benchmark prints.
#[derive(Debug, Default)]
pub struct StepTimes {
    by_step: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), StepStat>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct StepStat {
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl StepTimes {
    pub(crate) fn record(&self, kind: &'static str, step: &str, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut m = crate::service::lock(&self.by_step);
        let e = m.entry((kind, step.to_string())).or_default();
        e.count = e.count.saturating_add(1);
        e.sum_us = e.sum_us.saturating_add(us);
        e.max_us = e.max_us.max(us);
    }

    /// Prometheus text: `bulkhead_workflow_step_seconds` as a summary (sum, count) plus the
    /// longest run, labelled by workflow kind and step.
    pub fn render_metrics(&self) -> String {
        let m = crate::service::lock(&self.by_step);
        let mut out = String::from(
            "# HELP bulkhead_workflow_step_seconds Time spent in each workflow step (successful runs).\n\
             # TYPE bulkhead_workflow_step_seconds summary\n",
        );
        for ((kind, step), st) in m.iter() {
            // Kinds and steps are our own identifiers (letters only): nothing to escape.
            let sum = st.sum_us as f64 / 1e6;
            out.push_str(&format!(
                "bulkhead_workflow_step_seconds_sum{{kind=\"{kind}\",step=\"{step}\"}} {sum:.6}\n\
                 bulkhead_workflow_step_seconds_count{{kind=\"{kind}\",step=\"{step}\"}} {}\n",
                st.count
            ));
        }
        out.push_str(
            "# HELP bulkhead_workflow_step_max_seconds Longest successful run of each workflow step.\n\
             # TYPE bulkhead_workflow_step_max_seconds gauge\n",
        );
        for ((kind, step), st) in m.iter() {
            let max = st.max_us as f64 / 1e6;
            out.push_str(&format!(
                "bulkhead_workflow_step_max_seconds{{kind=\"{kind}\",step=\"{step}\"}} {max:.6}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod step_time_tests {
    use super::StepTimes;
    use std::time::Duration;

    #[test]
    fn step_times_render_as_a_summary_per_kind_and_step() {
        let t = StepTimes::default();
        t.record("attach", "Plug", Duration::from_millis(300));
        t.record("attach", "Plug", Duration::from_millis(100));
        t.record("attach", "Attest", Duration::from_millis(20));
        let text = t.render_metrics();
        assert!(text.contains(
            "bulkhead_workflow_step_seconds_sum{kind=\"attach\",step=\"Plug\"} 0.400000\n"
        ));
        assert!(text
            .contains("bulkhead_workflow_step_seconds_count{kind=\"attach\",step=\"Plug\"} 2\n"));
        assert!(text.contains(
            "bulkhead_workflow_step_max_seconds{kind=\"attach\",step=\"Plug\"} 0.300000\n"
        ));
        assert!(text.contains("step=\"Attest\"} 0.020000"));
    }
}
