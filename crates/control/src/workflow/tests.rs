//! The workflow driver against a real SQLite repository: forward runs, unwind order, resume
//! decisions, the fault hook's grammar.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::*;
use crate::hosts::{HostClient, TokenSource};
use crate::instances::{RunStep, TerminateStep};
use crate::repo::SqliteRepo;
use crate::volumes::{AttachStep, DetachStep};

/// What the test steps did, per workflow id.
static LOG: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn log(w: &WorkflowRow, what: String) {
    crate::service::lock(&LOG).push((w.workflow_id.clone(), what));
}

fn logged(w: &WorkflowRow) -> Vec<String> {
    crate::service::lock(&LOG)
        .iter()
        .filter(|(id, _)| id == &w.workflow_id)
        .map(|(_, s)| s.clone())
        .collect()
}

/// Four steps: A and B not repeatable, C and D repeatable; D may act when it fails. A step
/// fails when the row's `fail_at` output names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum T {
    A,
    B,
    C,
    D,
}

impl Steps for T {
    const KIND: Kind = Kind::Run;
    const ALL: &'static [Self] = &[T::A, T::B, T::C, T::D];
    fn repeatable(self) -> bool {
        matches!(self, T::C | T::D)
    }
    fn may_act_on_error(self) -> bool {
        self == T::D
    }
    fn forward<'a>(
        self,
        _: &'a ControlPlane,
        w: &'a WorkflowRow,
        _: Live<'a>,
    ) -> StepFuture<'a, Value> {
        Box::pin(async move {
            log(w, format!("do {self:?}"));
            if w.output("fail_at") == Some(&format!("{self:?}")) {
                return Err(ControlError::Upstream);
            }
            Ok(json!({ format!("{self:?}"): true }))
        })
    }
    fn undo<'a>(self, _: &'a ControlPlane, w: &'a WorkflowRow) -> StepFuture<'a, ()> {
        Box::pin(async move {
            log(w, format!("undo {self:?}"));
            Ok(())
        })
    }
}

/// A control plane on an in-memory SQLite repository whose KMS and token service addresses
/// answer nothing (a call to them fails on the transport).
pub(crate) fn cp(dir: &std::path::Path) -> ControlPlane {
    let ca = bulkhead_tokens::pki::CaDir::new(dir.join("ca"));
    ca.init().unwrap();
    ca.issue("control-plane", bulkhead_tokens::Role::ControlPlane, false)
        .unwrap();
    let https = || {
        bulkhead_mtls::HttpsClient::from_ca(
            &ca.ca_pem(),
            Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
        )
        .unwrap()
    };
    let (identity, _) = ca.identity("control-plane").unwrap();
    let tokens = TokenSource::Remote {
        addr: "127.0.0.1:9".into(),
        https: https(),
    };
    let (audit, _) = bulkhead_audit::AuditLog::open(&dir.join("audit.log")).unwrap();
    ControlPlane::new(
        Arc::new(SqliteRepo::open_in_memory().unwrap()),
        bulkhead_sealing::wrap::load_root_key(&dir.join("root.key"), true).unwrap(),
        https(),
        "127.0.0.1:9".into(),
        HostClient::new(https(), tokens, identity),
        BTreeMap::new(),
        audit,
    )
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn started(cp: &ControlPlane, fail_at: Option<&str>) -> WorkflowRow {
    let mut w = cp.begin(Kind::Run, "t-a", Some("i-1"), None, None).unwrap();
    if let Some(f) = fail_at {
        w.outputs = json!({ "fail_at": f });
        cp.repo.save_workflow(&w, &cp.lease.claim()).unwrap();
    }
    w
}

#[test]
fn forward_to_the_end_is_durable_and_keeps_no_outputs() {
    let d = tempfile::tempdir().unwrap();
    let cp = cp(d.path());
    let mut w = started(&cp, None);
    rt().block_on(cp.drive::<T>(&mut w, Live::default()))
        .unwrap();
    assert_eq!(logged(&w), ["do A", "do B", "do C", "do D"]);
    let stored = cp.repo.workflow(&w.workflow_id).unwrap().unwrap();
    assert_eq!((stored.step, stored.status), (4, Status::Done));
    assert_eq!(stored.outputs, json!({}));
    assert!(cp.repo.running_workflows().unwrap().is_empty());
}

#[test]
fn a_failed_step_undoes_the_completed_ones_in_reverse() {
    let d = tempfile::tempdir().unwrap();
    let cp = cp(d.path());
    let mut w = started(&cp, Some("C"));
    let e = rt().block_on(cp.drive::<T>(&mut w, Live::default()));
    assert!(matches!(e, Err(ControlError::Upstream)));
    // C failed without acting: only B and A are undone, last first.
    assert_eq!(logged(&w), ["do A", "do B", "do C", "undo B", "undo A"]);
    let stored = cp.repo.workflow(&w.workflow_id).unwrap().unwrap();
    assert_eq!((stored.step, stored.status), (2, Status::Unwound));
    assert_eq!(stored.outputs, json!({ "error": "upstream_unreachable" }));

    // A step that may have acted when it failed is undone too.
    let mut w = started(&cp, Some("D"));
    let _ = rt().block_on(cp.drive::<T>(&mut w, Live::default()));
    assert_eq!(logged(&w)[4..], ["undo D", "undo C", "undo B", "undo A"]);
}

#[test]
fn resume_goes_forward_only_through_repeatable_steps() {
    let d = tempfile::tempdir().unwrap();
    let cp = cp(d.path());
    // Crashed after A: B (not repeatable) is still to run: unwound, B's undo included (it may
    // have been in flight).
    let mut w = started(&cp, None);
    w.step = 1;
    cp.repo.save_workflow(&w, &cp.lease.claim()).unwrap();
    let w1 = cp.repo.workflow(&w.workflow_id).unwrap().unwrap();
    assert_eq!(rt().block_on(cp.resume::<T>(w1)), Resumed::Unwound);
    assert_eq!(logged(&w), ["undo B", "undo A"]);
    assert_eq!(
        cp.repo.workflow(&w.workflow_id).unwrap().unwrap().status,
        Status::Unwound
    );
    // Crashed after B: C and D are repeatable: finished.
    let mut w = started(&cp, None);
    w.step = 2;
    cp.repo.save_workflow(&w, &cp.lease.claim()).unwrap();
    let w2 = cp.repo.workflow(&w.workflow_id).unwrap().unwrap();
    assert_eq!(rt().block_on(cp.resume::<T>(w2)), Resumed::Finished);
    assert_eq!(logged(&w), ["do C", "do D"]);
    // A forward resume that fails unwinds everything, the failed step included if it may act.
    let mut w = started(&cp, Some("D"));
    w.step = 3;
    cp.repo.save_workflow(&w, &cp.lease.claim()).unwrap();
    let w3 = cp.repo.workflow(&w.workflow_id).unwrap().unwrap();
    assert_eq!(rt().block_on(cp.resume::<T>(w3)), Resumed::Unwound);
    assert_eq!(logged(&w), ["do D", "undo D", "undo C", "undo B", "undo A"]);
    // A finished workflow cannot be resumed into running again.
    assert!(cp.repo.running_workflows().unwrap().is_empty());
}

#[test]
fn the_real_workflows_resume_where_their_design_says() {
    // Attach: unwound until the sealed key is recorded (DecryptForHost spends the customer's
    // authorization), finished after.
    let attach: Vec<bool> = (0..=6).map(goes_forward::<AttachStep>).collect();
    assert_eq!(attach, [false, false, false, false, true, true, true]);
    assert_eq!(AttachStep::ALL[3], AttachStep::Release);
    assert!(!AttachStep::Release.repeatable());
    // Run: unwound until the net card's sealed epoch key was used (SealVpcKey spends the
    // customer's authorization, like DecryptForHost), finished after.
    let run: Vec<bool> = (0..=5).map(goes_forward::<RunStep>).collect();
    assert_eq!(run, [false, false, false, true, true, true]);
    assert_eq!(RunStep::ALL[2], RunStep::Network);
    assert!(!RunStep::Network.repeatable());
    // Detach and terminate only ever go forward.
    assert!((0..=3).all(goes_forward::<DetachStep>));
    assert!((0..=3).all(goes_forward::<TerminateStep>));
}

#[test]
fn fault_hook_grammar() {
    assert_eq!(
        Fault::parse("workflow:attach:after:3"),
        Some(Fault {
            kind: Kind::Attach,
            step: 3,
            durable: true
        })
    );
    assert_eq!(
        Fault::parse("workflow:run:before:1").map(|f| (f.kind, f.durable)),
        Some((Kind::Run, false))
    );
    for bad in [
        "",
        "workflow:attach:after:0",
        "workflow:attach:after:x",
        "workflow:mount:after:1",
        "workflow:attach:during:1",
        "workflow:attach:after:1:extra",
        "attach:after_card_keyed:exit",
    ] {
        assert_eq!(Fault::parse(bad), None, "{bad}");
    }
    // Never armed in this process: every point is inert.
    fault_point(Kind::Attach, 1, true);
}

#[test]
fn names_round_trip() {
    for k in [Kind::Attach, Kind::Detach, Kind::Run, Kind::Terminate] {
        assert_eq!(Kind::parse(k.as_str()), Ok(k));
    }
    for s in [Status::Running, Status::Done, Status::Unwound] {
        assert_eq!(Status::parse(s.as_str()), Ok(s));
    }
    assert!(Kind::parse("Attach").is_err());
}
