//! The `workflows` table, in both repositories: one schema (the same text is valid SQLite and
//! PostgreSQL), one row per workflow, progress written with a compare-and-set on `running` (a
//! finished or unwound workflow is never changed again).

use serde_json::Value;

use super::{Kind, Status, WorkflowRow};
use crate::pg::PgRepo;
use crate::repo::{RepoError, SqliteRepo};

/// The migration that adds the table (listed in both repositories' migrations).
pub const SCHEMA: &str = "CREATE TABLE workflows (
        workflow_id TEXT PRIMARY KEY, kind TEXT NOT NULL, tenant_id TEXT NOT NULL,
        instance_id TEXT, volume_id TEXT, host_id TEXT, step BIGINT NOT NULL,
        outputs TEXT NOT NULL, status TEXT NOT NULL, created BIGINT NOT NULL,
        updated BIGINT NOT NULL);
     CREATE INDEX workflows_by_status ON workflows(status);";

/// The migration that makes workflows shareable between replicas: each running workflow has an
/// owner (a replica's id) and a lease expiry (ms since the epoch) that its owner renews while it
/// runs; at most one running workflow per volume (an attach or detach is never started twice);
/// and named leader leases (one replica polls hosts).
pub const LEASES: &str = "ALTER TABLE workflows ADD COLUMN owner TEXT;
     ALTER TABLE workflows ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;
     CREATE UNIQUE INDEX workflows_one_per_volume ON workflows(volume_id)
        WHERE status = 'running' AND volume_id IS NOT NULL;
     CREATE TABLE leader_leases (
        name TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until BIGINT NOT NULL);";

/// A replica's hold on what it writes: its id and until when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub owner: String,
    pub until_ms: u64,
}

/// Where workflows are stored; a part of every [`crate::repo::Repository`].
pub trait WorkflowStore {
    /// Stores a new workflow owned by `claim` ([`RepoError::Conflict`] when its volume already
    /// has a running workflow).
    fn insert_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError>;
    /// Writes `w`'s step, outputs, status and time and extends the lease, only if the stored
    /// row is still running and owned by `claim.owner` (else [`RepoError::LeaseLost`]).
    fn save_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError>;
    /// Extends the lease of a running workflow this owner holds (else [`RepoError::LeaseLost`]).
    fn renew_workflow(&self, id: &str, claim: &Claim) -> Result<(), RepoError>;
    /// Takes over running workflows: those whose lease ended before `now_ms` (or every running
    /// one, when `all`: a single-process store at start-up), atomically, so two replicas never
    /// claim the same one. Returns them, oldest first.
    fn claim_workflows(
        &self,
        claim: &Claim,
        now_ms: u64,
        all: bool,
    ) -> Result<Vec<WorkflowRow>, RepoError>;
    fn workflow(&self, id: &str) -> Result<Option<WorkflowRow>, RepoError>;
    /// Every workflow left running, oldest first.
    fn running_workflows(&self) -> Result<Vec<WorkflowRow>, RepoError>;
    /// Takes or keeps the leader lease `name`: true when `claim.owner` holds it until
    /// `claim.until_ms` (it held it, or the holder's lease ended before `now_ms`).
    fn lead(&self, name: &str, claim: &Claim, now_ms: u64) -> Result<bool, RepoError>;
}

const COLS: &str = "workflow_id, kind, tenant_id, instance_id, volume_id, host_id, step, outputs, status, created, updated";

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The columns as read, whichever the database.
type Cols = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    String,
    String,
    i64,
    i64,
);

fn row_of(c: Cols) -> Result<WorkflowRow, RepoError> {
    Ok(WorkflowRow {
        workflow_id: c.0,
        kind: Kind::parse(&c.1)?,
        tenant_id: c.2,
        instance_id: c.3,
        volume_id: c.4,
        host_id: c.5,
        step: u32::try_from(c.6).unwrap_or(u32::MAX),
        outputs: serde_json::from_str(&c.7).unwrap_or(Value::Null),
        status: Status::parse(&c.8)?,
        created: u(c.9),
        updated: u(c.10),
    })
}

fn stale_unless_one(n: u64) -> Result<(), RepoError> {
    if n == 1 {
        Ok(())
    } else {
        Err(RepoError::LeaseLost)
    }
}

fn conflict(e: RepoError) -> RepoError {
    match e {
        RepoError::Sqlite(ref s)
            if matches!(s, rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation) =>
        {
            RepoError::Conflict
        }
        e => e,
    }
}

const LEAD_SQL: &str = "INSERT INTO leader_leases (name, owner, lease_until) VALUES ($1, $2, $3)
     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until
     WHERE leader_leases.owner = excluded.owner OR leader_leases.lease_until < $4";

impl WorkflowStore for SqliteRepo {
    fn insert_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError> {
        use rusqlite::params;
        self.with(|db| {
            db.execute(
                &format!("INSERT INTO workflows ({COLS}, owner, lease_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    w.workflow_id, w.kind.as_str(), w.tenant_id, w.instance_id, w.volume_id, w.host_id,
                    i64::from(w.step), w.outputs.to_string(), w.status.as_str(), i(w.created), i(w.updated),
                    claim.owner, i(claim.until_ms)
                ],
            )
        })
        .map(|_| ())
        .map_err(conflict)
    }

    fn save_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError> {
        use rusqlite::params;
        let n = self.with(|db| {
            db.execute(
                "UPDATE workflows SET step = ?2, outputs = ?3, status = ?4, updated = ?5, host_id = ?6,
                    lease_until = ?8
                 WHERE workflow_id = ?1 AND status = 'running' AND owner = ?7",
                params![
                    w.workflow_id,
                    i64::from(w.step),
                    w.outputs.to_string(),
                    w.status.as_str(),
                    i(w.updated),
                    w.host_id,
                    claim.owner,
                    i(claim.until_ms)
                ],
            )
        })?;
        stale_unless_one(u64::try_from(n).unwrap_or(0))
    }

    fn renew_workflow(&self, id: &str, claim: &Claim) -> Result<(), RepoError> {
        use rusqlite::params;
        let n = self.with(|db| {
            db.execute(
                "UPDATE workflows SET lease_until = ?3
                 WHERE workflow_id = ?1 AND status = 'running' AND owner = ?2",
                params![id, claim.owner, i(claim.until_ms)],
            )
        })?;
        stale_unless_one(u64::try_from(n).unwrap_or(0))
    }

    fn claim_workflows(
        &self,
        claim: &Claim,
        now_ms: u64,
        all: bool,
    ) -> Result<Vec<WorkflowRow>, RepoError> {
        use rusqlite::params;
        // One connection, one transaction: no other claim interleaves.
        let ids = self.with(|db| {
            let tx = db.transaction()?;
            let ids = {
                let mut st = tx.prepare(
                    "SELECT workflow_id FROM workflows
                     WHERE status = 'running' AND (lease_until < ?1 OR ?2)
                     ORDER BY created, workflow_id",
                )?;
                let rows = st.query_map(params![i(now_ms), all], |r| r.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            for id in &ids {
                tx.execute(
                    "UPDATE workflows SET owner = ?2, lease_until = ?3 WHERE workflow_id = ?1",
                    params![id, claim.owner, i(claim.until_ms)],
                )?;
            }
            tx.commit()?;
            Ok(ids)
        })?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.workflow(&id)?);
        }
        Ok(out)
    }

    fn lead(&self, name: &str, claim: &Claim, now_ms: u64) -> Result<bool, RepoError> {
        use rusqlite::params;
        let n = self.with(|db| {
            db.execute(
                &LEAD_SQL.replace('$', "?"),
                params![name, claim.owner, i(claim.until_ms), i(now_ms)],
            )
        })?;
        Ok(n == 1)
    }

    fn workflow(&self, id: &str) -> Result<Option<WorkflowRow>, RepoError> {
        Ok(self
            .sqlite_workflows("workflow_id = ?1", id)?
            .into_iter()
            .next())
    }

    fn running_workflows(&self) -> Result<Vec<WorkflowRow>, RepoError> {
        self.sqlite_workflows("status = ?1", Status::Running.as_str())
    }
}

impl SqliteRepo {
    fn sqlite_workflows(&self, filter: &str, arg: &str) -> Result<Vec<WorkflowRow>, RepoError> {
        let cols = self.with(|db| {
            let mut s = db.prepare(&format!(
                "SELECT {COLS} FROM workflows WHERE {filter} ORDER BY created, workflow_id"
            ))?;
            let rows = s.query_map([arg], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<Cols>>>()
        })?;
        cols.into_iter().map(row_of).collect()
    }
}

impl WorkflowStore for PgRepo {
    fn insert_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError> {
        let (w, c) = (w.clone(), claim.clone());
        self.run(move |db| {
            db.execute(
                &format!("INSERT INTO workflows ({COLS}, owner, lease_until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"),
                &[
                    &w.workflow_id, &w.kind.as_str(), &w.tenant_id, &w.instance_id, &w.volume_id, &w.host_id,
                    &i64::from(w.step), &w.outputs.to_string(), &w.status.as_str(), &i(w.created), &i(w.updated),
                    &c.owner, &i(c.until_ms),
                ],
            )
            .map(|_| ())
            .map_err(crate::pg::pg_err)
        })
    }

    fn save_workflow(&self, w: &WorkflowRow, claim: &Claim) -> Result<(), RepoError> {
        let (w, c) = (w.clone(), claim.clone());
        let n = self.run(move |db| {
            db.execute(
                "UPDATE workflows SET step = $2, outputs = $3, status = $4, updated = $5, host_id = $6,
                    lease_until = $8
                 WHERE workflow_id = $1 AND status = 'running' AND owner = $7",
                &[
                    &w.workflow_id,
                    &i64::from(w.step),
                    &w.outputs.to_string(),
                    &w.status.as_str(),
                    &i(w.updated),
                    &w.host_id,
                    &c.owner,
                    &i(c.until_ms),
                ],
            )
            .map_err(crate::pg::pg_err)
        })?;
        stale_unless_one(n)
    }

    fn renew_workflow(&self, id: &str, claim: &Claim) -> Result<(), RepoError> {
        let (id, c) = (id.to_string(), claim.clone());
        let n = self.run(move |db| {
            db.execute(
                "UPDATE workflows SET lease_until = $3
                 WHERE workflow_id = $1 AND status = 'running' AND owner = $2",
                &[&id, &c.owner, &i(c.until_ms)],
            )
            .map_err(crate::pg::pg_err)
        })?;
        stale_unless_one(n)
    }

    fn claim_workflows(
        &self,
        claim: &Claim,
        now_ms: u64,
        all: bool,
    ) -> Result<Vec<WorkflowRow>, RepoError> {
        let c = claim.clone();
        // One statement: row locks make two replicas' claims of one workflow exclusive (the
        // second re-checks the lease after the first committed, and finds it renewed).
        let ids: Vec<String> = self.run(move |db| {
            db.query(
                "UPDATE workflows SET owner = $1, lease_until = $2
                 WHERE status = 'running' AND (lease_until < $3 OR $4)
                 RETURNING workflow_id",
                &[&c.owner, &i(c.until_ms), &i(now_ms), &all],
            )
            .map_err(crate::pg::pg_err)
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        })?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.workflow(&id)?);
        }
        out.sort_by(|a, b| (a.created, &a.workflow_id).cmp(&(b.created, &b.workflow_id)));
        Ok(out)
    }

    fn lead(&self, name: &str, claim: &Claim, now_ms: u64) -> Result<bool, RepoError> {
        let (name, c) = (name.to_string(), claim.clone());
        let n = self.run(move |db| {
            db.execute(LEAD_SQL, &[&name, &c.owner, &i(c.until_ms), &i(now_ms)])
                .map_err(crate::pg::pg_err)
        })?;
        Ok(n == 1)
    }

    fn workflow(&self, id: &str) -> Result<Option<WorkflowRow>, RepoError> {
        Ok(self
            .pg_workflows("workflow_id = $1", id)?
            .into_iter()
            .next())
    }

    fn running_workflows(&self) -> Result<Vec<WorkflowRow>, RepoError> {
        self.pg_workflows("status = $1", Status::Running.as_str())
    }
}

impl PgRepo {
    fn pg_workflows(&self, filter: &str, arg: &str) -> Result<Vec<WorkflowRow>, RepoError> {
        let sql =
            format!("SELECT {COLS} FROM workflows WHERE {filter} ORDER BY created, workflow_id");
        let arg = arg.to_string();
        let cols = self.run(move |db| {
            db.query(&sql, &[&arg])
                .map_err(crate::pg::pg_err)
                .map(|rows| {
                    rows.iter()
                        .map(|r| {
                            (
                                r.get(0),
                                r.get(1),
                                r.get(2),
                                r.get(3),
                                r.get(4),
                                r.get(5),
                                r.get(6),
                                r.get(7),
                                r.get(8),
                                r.get(9),
                                r.get(10),
                            )
                        })
                        .collect::<Vec<Cols>>()
                })
        })?;
        cols.into_iter().map(row_of).collect()
    }
}

/// The workflow part of the repository contract (run by `repo::contract_suite` on each backend).
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub fn contract(r: &dyn crate::repo::Repository) {
    use super::Kind;
    let me = Claim {
        owner: "cp-a".into(),
        until_ms: 10_000,
    };
    let other_replica = Claim {
        owner: "cp-b".into(),
        until_ms: 20_000,
    };
    let mut w = WorkflowRow::new(
        Kind::Attach,
        "t-a",
        Some("i-1"),
        Some("vol-1"),
        Some("host-1"),
    );
    r.insert_workflow(&w, &me).unwrap();
    assert!(matches!(
        r.insert_workflow(&w, &me),
        Err(RepoError::Conflict)
    ));
    // A second running workflow on the same volume is refused (an attach never starts twice).
    let twice = WorkflowRow::new(Kind::Attach, "t-a", Some("i-9"), Some("vol-1"), None);
    assert!(matches!(
        r.insert_workflow(&twice, &other_replica),
        Err(RepoError::Conflict)
    ));
    w.step = 4;
    w.host_id = Some("host-2".into());
    w.outputs = serde_json::json!({"sealed_key": "c2VhbGVk"});
    r.save_workflow(&w, &me).unwrap();
    // Only the owner writes progress.
    assert!(matches!(
        r.save_workflow(&w, &other_replica),
        Err(RepoError::LeaseLost)
    ));
    assert!(matches!(
        r.renew_workflow(&w.workflow_id, &other_replica),
        Err(RepoError::LeaseLost)
    ));
    let mut other = WorkflowRow::new(Kind::Run, "t-b", Some("i-2"), None, None);
    other.created = w.created + 1;
    r.insert_workflow(&other, &other_replica).unwrap();
    assert_eq!(r.workflow(&w.workflow_id).unwrap().unwrap(), w);
    let running: Vec<String> = r
        .running_workflows()
        .unwrap()
        .into_iter()
        .map(|x| x.workflow_id)
        .collect();
    assert_eq!(running, [w.workflow_id.clone(), other.workflow_id.clone()]);
    // Leases: nothing expired at 9 s; at 15 s cp-a's ended and cp-b takes it over, once.
    assert!(r
        .claim_workflows(&other_replica, 9_000, false)
        .unwrap()
        .is_empty());
    let taken = r.claim_workflows(&other_replica, 15_000, false).unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].workflow_id, w.workflow_id);
    assert!(r.claim_workflows(&me, 15_000, false).unwrap().is_empty());
    assert!(matches!(
        r.save_workflow(&w, &me),
        Err(RepoError::LeaseLost)
    ));
    r.renew_workflow(&w.workflow_id, &other_replica).unwrap();
    w.status = Status::Done;
    w.outputs = serde_json::json!({});
    r.save_workflow(&w, &other_replica).unwrap();
    // Finished is final: no later write changes it.
    w.status = Status::Running;
    assert!(matches!(
        r.save_workflow(&w, &other_replica),
        Err(RepoError::LeaseLost)
    ));
    assert_eq!(
        r.workflow(&w.workflow_id).unwrap().unwrap().status,
        Status::Done
    );
    assert_eq!(r.running_workflows().unwrap().len(), 1);
    assert!(r.workflow("wf-none").unwrap().is_none());
    // `all` (a single-process store at start-up) takes every running workflow.
    assert_eq!(r.claim_workflows(&me, 0, true).unwrap().len(), 1);
    // Leader leases: one holder at a time, taken over once it ended.
    assert!(r.lead("poller", &me, 0).unwrap());
    assert!(!r.lead("poller", &other_replica, 5_000).unwrap());
    assert!(r.lead("poller", &me, 5_000).unwrap());
    assert!(r.lead("poller", &other_replica, 11_000).unwrap());
    assert!(!r.lead("poller", &me, 12_000).unwrap());
}
