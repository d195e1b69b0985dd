//! The control plane killed at every step of AttachVolume, RunInstances, DetachVolume and
//! TerminateInstances, by its own fault hook (`BULKHEAD_FAULT=workflow:<kind>:<after|before>:<N>`:
//! the process exits right after step N's progress is durable, or right after step N acted but
//! before that is written), against the real daemons (KMS, token service, two host controllers on
//! the detached backend). After a restart the volume and instance must be consistent (finished or
//! rolled back, as the workflow's design says for that step), the customer's authorization must
//! have been used by the KMS at most once (its audit log), and a fresh AttachVolume must succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use bulkhead_audit::{AuditRecord, Decision, EntryKind};
use bulkhead_devcluster::cluster::Cluster;
use common::*;
use serde_json::{json, Value};

/// Restarts the control plane, with the fault armed when given.
fn restart(c: &mut Cluster, fault: Option<&str>) {
    c.kill9("control");
    let env: Vec<(&str, &str)> = fault.map(|f| ("BULKHEAD_FAULT", f)).into_iter().collect();
    c.restart_control_with_env(&bins(), &env).unwrap();
}

/// The KMS's DecryptForHost request records for `volume`: (allowed, denied).
fn kms_releases(dir: &Path, volume: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(dir.join("kms/audit.log")).unwrap();
    let res = format!("volume:{volume}");
    let mut out = (0, 0);
    for r in text
        .lines()
        .filter_map(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .filter(|r| {
            r.entry.kind == EntryKind::Request
                && r.entry.op == "DecryptForHost"
                && r.entry.resources.contains(&res)
        })
    {
        match r.entry.decision {
            Decision::Allow => out.0 += 1,
            _ => out.1 += 1,
        }
    }
    out
}

/// The workflows the control plane stored for a resource: (kind, step, status).
fn workflows_of(dir: &Path, column: &str, id: &str) -> Vec<(String, i64, String)> {
    let db = rusqlite::Connection::open(dir.join("control/control.db")).unwrap();
    let mut s = db
        .prepare(&format!(
            "SELECT kind, step, status FROM workflows WHERE {column} = ?1 ORDER BY created, rowid"
        ))
        .unwrap();
    let rows = s
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

fn volume_state(a: &Customer, v: &str) -> (String, Value) {
    let d = a.ok("DescribeVolumes", json!({"VolumeIds": [v]}));
    (
        d["Volumes"][0]["State"].as_str().unwrap().to_string(),
        d["Volumes"][0]["InstanceId"].clone(),
    )
}

fn instance_state(a: &Customer, i: &str) -> String {
    a.ok("DescribeInstances", json!({"InstanceIds": [i]}))["Instances"][0]["State"]
        .as_str()
        .unwrap()
        .to_string()
}

fn host_audit(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("host-1/audit.log")).unwrap()
        + &std::fs::read_to_string(dir.join("host-2/audit.log")).unwrap()
}

#[test]
fn control_plane_killed_at_every_attach_step_finishes_or_unwinds_and_spends_the_authorization_once()
{
    let dir = tempfile::tempdir().unwrap();
    let mut c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    let i = run(&a);
    // (fault, the attach ends attached): until DecryptForHost's sealed key is durable (step 4)
    // the attach is unwound; from then on it is finished.
    let cases = [
        ("after:1", false),
        ("after:2", false),
        ("after:3", false),
        ("before:4", false),
        ("after:4", true),
        ("before:5", true),
        ("after:5", true),
        ("before:6", true),
        ("after:6", true),
        ("after:7", true),
    ];
    for (at, attached) in cases {
        let fault = format!("workflow:attach:{at}");
        restart(&mut c, Some(&fault));
        let v = volume(&a);
        let r = a.try_call("AttachVolume", json!({"VolumeId": v, "InstanceId": i}));
        assert!(
            r.is_none(),
            "{fault}: the control plane answered instead of dying: {r:?}"
        );
        restart(&mut c, None);

        let (state, on) = volume_state(&a, &v);
        let wfs = workflows_of(dir.path(), "volume_id", &v);
        assert_eq!(wfs.len(), 1, "{fault}: {wfs:?}");
        let (allowed, denied) = kms_releases(dir.path(), &v);
        if attached {
            assert_eq!(state, "in-use", "{fault}");
            assert_eq!(on, json!(i), "{fault}");
            assert_eq!(wfs[0].2, "done", "{fault}: {wfs:?}");
            assert_eq!(
                allowed, 1,
                "{fault}: the attach used its authorization once"
            );
        } else {
            assert_eq!(state, "available", "{fault}");
            assert_eq!(on, Value::Null, "{fault}");
            assert_eq!(wfs[0].2, "unwound", "{fault}: {wfs:?}");
            let expect = usize::from(at == "before:4");
            assert_eq!(allowed, expect, "{fault}: DecryptForHost allows");
        }
        assert_eq!(
            denied, 0,
            "{fault}: the restarted control plane never presented the spent authorization again"
        );

        // The state is usable: a fresh attach (after a detach when it was finished) succeeds,
        // with a fresh authorization.
        if attached {
            a.ok("DetachVolume", json!({"VolumeId": v}));
        }
        a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": i}));
        assert_eq!(volume_state(&a, &v).0, "in-use", "{fault}");
        assert_eq!(
            kms_releases(dir.path(), &v),
            (allowed + 1, 0),
            "{fault}: one more release for the one more authorization"
        );
        a.ok("DetachVolume", json!({"VolumeId": v}));
    }
    // Every workflow ended; none is left running.
    let db = rusqlite::Connection::open(dir.path().join("control/control.db")).unwrap();
    let running: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM workflows WHERE status = 'running'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(running, 0);
}

#[test]
fn control_plane_killed_at_every_run_step_finishes_or_unwinds_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    // (fault, the instance ends running): until the net card's sealed epoch key was used
    // (step 3, Network: KMS SealVpcKey spends the customer's forwarded RunInstances, which a
    // restarted control plane does not have) the run is unwound (terminated, cores and private
    // address released); from then on it is finished.
    let cases = [
        ("after:1", false),
        ("before:2", false),
        ("after:2", false),
        ("before:3", false),
        ("after:3", true),
        ("after:4", true),
        ("after:5", true),
    ];
    for (at, running) in cases {
        let fault = format!("workflow:run:{at}");
        let before: Vec<Value> = a.ok("DescribeInstances", json!({}))["Instances"]
            .as_array()
            .unwrap()
            .clone();
        restart(&mut c, Some(&fault));
        let r = a.try_call("RunInstances", json!({"ImageId": "img-1"}));
        assert!(r.is_none(), "{fault}: the control plane answered: {r:?}");
        restart(&mut c, None);

        let all = a.ok("DescribeInstances", json!({}))["Instances"]
            .as_array()
            .unwrap()
            .clone();
        let new: Vec<&Value> = all.iter().filter(|x| !before.contains(x)).collect();
        assert_eq!(new.len(), 1, "{fault}: one instance was recorded: {all:?}");
        let id = new[0]["InstanceId"].as_str().unwrap().to_string();
        let wfs = workflows_of(dir.path(), "instance_id", &id);
        assert_eq!(wfs[0].0, "run", "{fault}: {wfs:?}");
        let v = volume(&a);
        let described =
            a.ok("DescribeInstances", json!({"InstanceIds": [id]}))["Instances"][0].clone();
        if running {
            assert_eq!(instance_state(&a, &id), "running", "{fault}");
            assert!(
                described["PrivateIpAddress"].is_string(),
                "{fault}: a finished run keeps its address: {described}"
            );
            assert_eq!(wfs[0].2, "done", "{fault}: {wfs:?}");
            // The host really runs it: a volume attaches to it.
            a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": id}));
            assert_eq!(volume_state(&a, &v).0, "in-use");
            a.ok("TerminateInstances", json!({"InstanceIds": [id]}));
            assert_eq!(
                volume_state(&a, &v).0,
                "available",
                "{fault}: terminate detached it"
            );
            assert_eq!(instance_state(&a, &id), "terminated");
        } else {
            assert_eq!(instance_state(&a, &id), "terminated", "{fault}");
            assert_eq!(wfs[0].2, "unwound", "{fault}: {wfs:?}");
            assert!(
                described.get("PrivateIpAddress").is_none(),
                "{fault}: an unwound run released its address: {described}"
            );
            if matches!(at, "before:2" | "after:2" | "before:3") {
                // The host had created it: the unwind told it to terminate.
                assert!(
                    host_audit(dir.path())
                        .lines()
                        .any(|l| l.contains("TerminateInstance") && l.contains(&id)),
                    "{fault}: the host was told to terminate {id}"
                );
            }
            // Attaching to it is refused; a fresh instance takes the volume.
            let (st, _) = a.call("AttachVolume", json!({"VolumeId": v, "InstanceId": id}));
            assert_ne!(st, 200, "{fault}");
            let fresh = run(&a);
            a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": fresh}));
            a.ok("TerminateInstances", json!({"InstanceIds": [fresh]}));
        }
    }
}

/// The last workflow of `kind` stored for a resource: (step, status).
fn last_workflow(dir: &Path, column: &str, id: &str, kind: &str) -> (i64, String) {
    let wfs = workflows_of(dir, column, id);
    let w = wfs
        .iter()
        .rev()
        .find(|w| w.0 == kind)
        .unwrap_or_else(|| panic!("no {kind} workflow for {id}: {wfs:?}"));
    (w.1, w.2.clone())
}

/// Host audit records of `op` naming `id`.
fn host_ops(dir: &Path, op: &str, id: &str) -> usize {
    host_audit(dir)
        .lines()
        .filter(|l| l.contains(op) && l.contains(id))
        .count()
}

#[test]
fn control_plane_killed_at_every_detach_and_terminate_step_finishes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    let steps = [
        "before:1", "after:1", "before:2", "after:2", "before:3", "after:3", "before:4", "after:4",
    ];

    // DetachVolume: every step is safe to repeat, so an interrupted detach is finished, the
    // card told to drop the key, and the volume attaches again with a fresh authorization.
    let i = run(&a);
    let v = volume(&a);
    for at in steps {
        let fault = format!("workflow:detach:{at}");
        a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": i}));
        let unplugs = host_ops(dir.path(), "DetachVolume", &v);
        let (allowed, _) = kms_releases(dir.path(), &v);
        restart(&mut c, Some(&fault));
        let r = a.try_call("DetachVolume", json!({"VolumeId": v}));
        assert!(r.is_none(), "{fault}: the control plane answered: {r:?}");
        restart(&mut c, None);

        assert_eq!(
            volume_state(&a, &v),
            ("available".to_string(), Value::Null),
            "{fault}"
        );
        assert_eq!(
            last_workflow(dir.path(), "volume_id", &v, "detach"),
            (4, "done".to_string()),
            "{fault}"
        );
        assert!(
            host_ops(dir.path(), "DetachVolume", &v) > unplugs,
            "{fault}: the host was told to detach {v}"
        );
        assert_eq!(instance_state(&a, &i), "running", "{fault}");
        // No authorization was spent by the detach, none presented again.
        assert_eq!(kms_releases(dir.path(), &v), (allowed, 0), "{fault}");
    }
    // Usable afterwards: one more attach, one more release.
    let (allowed, _) = kms_releases(dir.path(), &v);
    a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": i}));
    assert_eq!(kms_releases(dir.path(), &v), (allowed + 1, 0));
    a.ok("DetachVolume", json!({"VolumeId": v}));

    // TerminateInstances with a volume attached: finished whatever step it died at; the volume
    // is detached and free, the host terminated the guest (three steps).
    for at in &steps[..6] {
        let fault = format!("workflow:terminate:{at}");
        let i = run(&a);
        a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": i}));
        restart(&mut c, Some(&fault));
        let r = a.try_call("TerminateInstances", json!({"InstanceIds": [i]}));
        assert!(r.is_none(), "{fault}: the control plane answered: {r:?}");
        restart(&mut c, None);

        assert_eq!(instance_state(&a, &i), "terminated", "{fault}");
        assert_eq!(
            volume_state(&a, &v),
            ("available".to_string(), Value::Null),
            "{fault}: terminate detached the volume"
        );
        assert_eq!(
            last_workflow(dir.path(), "instance_id", &i, "terminate"),
            (3, "done".to_string()),
            "{fault}"
        );
        assert!(
            host_ops(dir.path(), "TerminateInstance", &i) >= 1,
            "{fault}: the host was told to terminate {i}"
        );
        let described =
            a.ok("DescribeInstances", json!({"InstanceIds": [i]}))["Instances"][0].clone();
        assert!(
            described.get("PrivateIpAddress").is_none(),
            "{fault}: a terminated instance released its address: {described}"
        );
    }
    let db = rusqlite::Connection::open(dir.path().join("control/control.db")).unwrap();
    let running: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM workflows WHERE status = 'running'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(running, 0, "no workflow is left running");
}
