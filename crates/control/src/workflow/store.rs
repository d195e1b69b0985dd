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

/// Where workflows are stored; a part of every [`crate::repo::Repository`].
pub trait WorkflowStore {
    fn insert_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError>;
    /// Writes `w`'s step, outputs, status and time, only if the stored row is still running
    /// (else [`RepoError::Stale`]).
    fn save_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError>;
    fn workflow(&self, id: &str) -> Result<Option<WorkflowRow>, RepoError>;
    /// Every workflow left running, oldest first.
    fn running_workflows(&self) -> Result<Vec<WorkflowRow>, RepoError>;
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
        Err(RepoError::Stale)
    }
}

impl WorkflowStore for SqliteRepo {
    fn insert_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError> {
        use rusqlite::params;
        self.with(|db| {
            db.execute(
                &format!("INSERT INTO workflows ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    w.workflow_id, w.kind.as_str(), w.tenant_id, w.instance_id, w.volume_id, w.host_id,
                    i64::from(w.step), w.outputs.to_string(), w.status.as_str(), i(w.created), i(w.updated)
                ],
            )
        })
        .map(|_| ())
    }

    fn save_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError> {
        use rusqlite::params;
        let n = self.with(|db| {
            db.execute(
                "UPDATE workflows SET step = ?2, outputs = ?3, status = ?4, updated = ?5, host_id = ?6
                 WHERE workflow_id = ?1 AND status = 'running'",
                params![
                    w.workflow_id,
                    i64::from(w.step),
                    w.outputs.to_string(),
                    w.status.as_str(),
                    i(w.updated),
                    w.host_id
                ],
            )
        })?;
        stale_unless_one(u64::try_from(n).unwrap_or(0))
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
    fn insert_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError> {
        let w = w.clone();
        self.run(move |db| {
            db.execute(
                &format!("INSERT INTO workflows ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
                &[
                    &w.workflow_id, &w.kind.as_str(), &w.tenant_id, &w.instance_id, &w.volume_id, &w.host_id,
                    &i64::from(w.step), &w.outputs.to_string(), &w.status.as_str(), &i(w.created), &i(w.updated),
                ],
            )
            .map(|_| ())
            .map_err(crate::pg::pg_err)
        })
    }

    fn save_workflow(&self, w: &WorkflowRow) -> Result<(), RepoError> {
        let w = w.clone();
        let n = self.run(move |db| {
            db.execute(
                "UPDATE workflows SET step = $2, outputs = $3, status = $4, updated = $5, host_id = $6
                 WHERE workflow_id = $1 AND status = 'running'",
                &[
                    &w.workflow_id,
                    &i64::from(w.step),
                    &w.outputs.to_string(),
                    &w.status.as_str(),
                    &i(w.updated),
                    &w.host_id,
                ],
            )
            .map_err(crate::pg::pg_err)
        })?;
        stale_unless_one(n)
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
    let mut w = WorkflowRow::new(
        Kind::Attach,
        "t-a",
        Some("i-1"),
        Some("vol-1"),
        Some("host-1"),
    );
    r.insert_workflow(&w).unwrap();
    assert!(matches!(
        r.insert_workflow(&w),
        Err(RepoError::Conflict) | Err(RepoError::Sqlite(_))
    ));
    w.step = 4;
    w.host_id = Some("host-2".into());
    w.outputs = serde_json::json!({"sealed_key": "c2VhbGVk"});
    r.save_workflow(&w).unwrap();
    let mut other = WorkflowRow::new(Kind::Run, "t-b", Some("i-2"), None, None);
    other.created = w.created + 1;
    r.insert_workflow(&other).unwrap();
    assert_eq!(r.workflow(&w.workflow_id).unwrap().unwrap(), w);
    let running: Vec<String> = r
        .running_workflows()
        .unwrap()
        .into_iter()
        .map(|x| x.workflow_id)
        .collect();
    assert_eq!(running, [w.workflow_id.clone(), other.workflow_id.clone()]);
    w.status = Status::Done;
    w.outputs = serde_json::json!({});
    r.save_workflow(&w).unwrap();
    // Finished is final: no later write changes it.
    w.status = Status::Running;
    assert!(matches!(r.save_workflow(&w), Err(RepoError::Stale)));
    assert_eq!(
        r.workflow(&w.workflow_id).unwrap().unwrap().status,
        Status::Done
    );
    assert_eq!(r.running_workflows().unwrap().len(), 1);
    assert!(r.workflow("wf-none").unwrap().is_none());
}
