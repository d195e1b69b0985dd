//! [`SqliteRepo`]: the embedded [`Repository`] (one connection, WAL, `synchronous=FULL`,
//! `user_version` migrations from [`crate::schema`]), the default when no `database_url` is set.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    Chooser, CustomerRow, HostRow, InstanceRow, InstanceState, RepoError, Repository, SnapshotRow,
    SnapshotState, VolumeRow, VolumeState,
};

pub struct SqliteRepo {
    conn: Mutex<Connection>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

macro_rules! state_sql {
    ($t:ty) => {
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                <$t>::parse(s).map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    };
}
state_sql!(InstanceState);
state_sql!(VolumeState);
state_sql!(SnapshotState);

const SNAPSHOT_COLS: &str =
    "snapshot_id, tenant_id, volume_id, size_gib, kms_key_id, ciphertext_blob, state, storage_node, created";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        snapshot_id: r.get(0)?,
        tenant_id: r.get(1)?,
        volume_id: r.get(2)?,
        size_gib: u32_of(r.get(3)?),
        kms_key_id: r.get(4)?,
        ciphertext_blob: r.get(5)?,
        state: r.get(6)?,
        storage_node: r.get(7)?,
        created: u(r.get(8)?),
    })
}

fn instance_row(r: &Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        instance_id: r.get(0)?,
        tenant_id: r.get(1)?,
        host_id: r.get(2)?,
        image_id: r.get(3)?,
        vcpus: u32_of(r.get(4)?),
        memory_mib: u32_of(r.get(5)?),
        cores: u32_of(r.get(6)?),
        dedicated: r.get::<_, i64>(7)? != 0,
        state: r.get(8)?,
        created: u(r.get(9)?),
        instance_storage_gib: r.get::<_, Option<i64>>(10)?.map(u32_of),
    })
}

const INSTANCE_COLS: &str =
    "instance_id, tenant_id, host_id, image_id, vcpus, memory_mib, cores, dedicated, state, created, instance_storage_gib";
const VOLUME_COLS: &str =
    "volume_id, tenant_id, size_gib, kms_key_id, ciphertext_blob, state, instance_id, host_id, created, storage_node";

fn volume_row(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        volume_id: r.get(0)?,
        tenant_id: r.get(1)?,
        size_gib: u32_of(r.get(2)?),
        kms_key_id: r.get(3)?,
        ciphertext_blob: r.get(4)?,
        state: r.get(5)?,
        instance_id: r.get(6)?,
        host_id: r.get(7)?,
        created: u(r.get(8)?),
        storage_node: r.get(9)?,
    })
}

impl SqliteRepo {
    pub fn open(path: &Path) -> Result<SqliteRepo, RepoError> {
        Self::init(Connection::open(path)?)
    }

    pub fn open_in_memory() -> Result<SqliteRepo, RepoError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteRepo, RepoError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let migrations = crate::schema::migrations(crate::schema::Dialect::Sqlite);
        let known = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(RepoError::TooNew(version));
        }
        for (n, m) in migrations.iter().enumerate() {
            let v = i64::try_from(n + 1).unwrap_or(i64::MAX);
            if v > version {
                let tx = conn.transaction()?;
                tx.execute_batch(m)?;
                tx.pragma_update(None, "user_version", v)?;
                tx.commit()?;
            }
        }
        Ok(SqliteRepo {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, RepoError> {
        let mut c = self.conn.lock().map_err(|_| RepoError::Poisoned)?;
        Ok(f(&mut c)?)
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Repository for SqliteRepo {
    fn put_customer(&self, c: &CustomerRow) -> Result<(), RepoError> {
        let r = self.with(|db| {
            db.execute(
                "INSERT INTO customers (access_key_id, tenant_id, wrapped_secret) VALUES (?1, ?2, ?3)",
                params![c.access_key_id, c.tenant_id, c.wrapped_secret],
            )
        });
        match r {
            Err(RepoError::Sqlite(e)) if is_constraint(&e) => Err(RepoError::Conflict),
            r => r.map(|_| ()),
        }
    }

    fn customer(&self, akid: &str) -> Result<Option<CustomerRow>, RepoError> {
        self.with(|db| {
            db.query_row(
                "SELECT access_key_id, tenant_id, wrapped_secret FROM customers WHERE access_key_id = ?1",
                params![akid],
                |r| Ok(CustomerRow { access_key_id: r.get(0)?, tenant_id: r.get(1)?, wrapped_secret: r.get(2)? }),
            )
            .optional()
        })
    }

    fn first_use_of_signature(
        &self,
        sig: &str,
        now: u64,
        forget_before: u64,
    ) -> Result<bool, RepoError> {
        self.with(|db| {
            db.execute(
                "DELETE FROM signatures WHERE seen < ?1",
                params![i(forget_before)],
            )?;
            let n = db.execute(
                "INSERT OR IGNORE INTO signatures (signature, seen) VALUES (?1, ?2)",
                params![sig, i(now)],
            )?;
            Ok(n == 1)
        })
    }

    fn idempotency(
        &self,
        tenant: &str,
        action: &str,
        token: &str,
    ) -> Result<Option<(String, String)>, RepoError> {
        self.with(|db| {
            db.query_row(
                "SELECT request_hash, response FROM idempotency WHERE tenant_id = ?1 AND action = ?2 AND token = ?3",
                params![tenant, action, token],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    fn put_idempotency(
        &self,
        tenant: &str,
        action: &str,
        token: &str,
        hash: &str,
        response: &str,
    ) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                "INSERT OR IGNORE INTO idempotency (tenant_id, action, token, request_hash, response) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![tenant, action, token, hash, response],
            )
            .map(|_| ())
        })
    }

    fn upsert_host(&self, h: &HostRow) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                "INSERT INTO hosts (host_id, addr, cores) VALUES (?1, ?2, ?3)
                 ON CONFLICT(host_id) DO UPDATE SET addr = excluded.addr, cores = excluded.cores",
                params![h.host_id, h.addr, h.cores],
            )
            .map(|_| ())
        })
    }

    fn hosts(&self) -> Result<Vec<HostRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(
                "SELECT host_id, addr, cores, dedicated_tenant FROM hosts ORDER BY host_id",
            )?;
            let rows = s.query_map([], |r| {
                Ok(HostRow {
                    host_id: r.get(0)?,
                    addr: r.get(1)?,
                    cores: u32_of(r.get(2)?),
                    dedicated_tenant: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    fn set_host_dedicated(&self, host_id: &str, tenant: Option<&str>) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                "UPDATE hosts SET dedicated_tenant = ?2 WHERE host_id = ?1",
                params![host_id, tenant],
            )
            .map(|_| ())
        })
    }

    fn set_host_status(&self, host_id: &str, status: &str, now: u64) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                "UPDATE hosts SET status = ?2, polled = ?3 WHERE host_id = ?1",
                params![host_id, status, i(now)],
            )
            .map(|_| ())
        })
    }

    fn host_status(&self, host_id: &str) -> Result<Option<(String, u64)>, RepoError> {
        self.with(|db| {
            db.query_row(
                "SELECT status, polled FROM hosts WHERE host_id = ?1 AND status IS NOT NULL",
                params![host_id],
                |r| Ok((r.get(0)?, u(r.get(1)?))),
            )
            .optional()
        })
    }

    fn host_audit_cursor(&self, host_id: &str) -> Result<u64, RepoError> {
        self.with(|db| {
            db.query_row(
                "SELECT audit_cursor FROM hosts WHERE host_id = ?1",
                params![host_id],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|o| o.map(u).unwrap_or(0))
        })
    }

    fn append_host_audit(&self, host_id: &str, records: &[(u64, String)]) -> Result<(), RepoError> {
        self.with(|db| {
            let tx = db.transaction()?;
            let mut max = 0u64;
            for (seq, line) in records {
                tx.execute(
                    "INSERT OR IGNORE INTO host_audit (host_id, seq, line) VALUES (?1, ?2, ?3)",
                    params![host_id, i(*seq), line],
                )?;
                max = max.max(*seq);
            }
            tx.execute(
                "UPDATE hosts SET audit_cursor = MAX(audit_cursor, ?2) WHERE host_id = ?1",
                params![host_id, i(max)],
            )?;
            tx.commit()
        })
    }

    fn host_audit_count(&self, host_id: &str) -> Result<u64, RepoError> {
        self.with(|db| {
            db.query_row(
                "SELECT COUNT(*) FROM host_audit WHERE host_id = ?1",
                params![host_id],
                |r| r.get::<_, i64>(0),
            )
            .map(u)
        })
    }

    fn host_audit_after(
        &self,
        host_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(
                "SELECT seq, line FROM host_audit WHERE host_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = s.query_map(params![host_id, i(after), i64::from(limit)], |r| {
                Ok((u(r.get::<_, i64>(0)?), r.get::<_, String>(1)?))
            })?;
            rows.collect()
        })
    }

    fn insert_instance(&self, x: &InstanceRow) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    x.instance_id, x.tenant_id, x.host_id, x.image_id, x.vcpus, x.memory_mib, x.cores,
                    i64::from(x.dedicated), x.state, i(x.created), x.instance_storage_gib
                ],
            )
            .map(|_| ())
        })
    }

    fn instance(&self, tenant: &str, id: &str) -> Result<Option<InstanceRow>, RepoError> {
        self.with(|db| {
            db.query_row(
                &format!("SELECT {INSTANCE_COLS} FROM instances WHERE tenant_id = ?1 AND instance_id = ?2"),
                params![tenant, id],
                instance_row,
            )
            .optional()
        })
    }

    fn instances(&self, tenant: &str) -> Result<Vec<InstanceRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(&format!("SELECT {INSTANCE_COLS} FROM instances WHERE tenant_id = ?1 ORDER BY created, instance_id"))?;
            let rows = s.query_map(params![tenant], instance_row)?;
            rows.collect()
        })
    }

    fn live_instances(&self) -> Result<Vec<InstanceRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(&format!(
                "SELECT {INSTANCE_COLS} FROM instances WHERE state != 'terminated'"
            ))?;
            let rows = s.query_map([], instance_row)?;
            rows.collect()
        })
    }

    fn set_instance_state(
        &self,
        tenant: &str,
        id: &str,
        from: InstanceState,
        to: InstanceState,
    ) -> Result<(), RepoError> {
        from.check(to)?;
        let n = self.with(|db| {
            db.execute(
                "UPDATE instances SET state = ?4 WHERE tenant_id = ?1 AND instance_id = ?2 AND state = ?3",
                params![tenant, id, from, to],
            )
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn insert_volume(&self, v: &VolumeRow) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                &format!("INSERT INTO volumes ({VOLUME_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    v.volume_id, v.tenant_id, v.size_gib, v.kms_key_id, v.ciphertext_blob, v.state, v.instance_id,
                    v.host_id, i(v.created), v.storage_node
                ],
            )
            .map(|_| ())
        })
    }

    fn volume(&self, tenant: &str, id: &str) -> Result<Option<VolumeRow>, RepoError> {
        self.with(|db| {
            db.query_row(
                &format!(
                    "SELECT {VOLUME_COLS} FROM volumes WHERE tenant_id = ?1 AND volume_id = ?2"
                ),
                params![tenant, id],
                volume_row,
            )
            .optional()
        })
    }

    fn volumes(&self, tenant: &str) -> Result<Vec<VolumeRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(&format!("SELECT {VOLUME_COLS} FROM volumes WHERE tenant_id = ?1 ORDER BY created, volume_id"))?;
            let rows = s.query_map(params![tenant], volume_row)?;
            rows.collect()
        })
    }

    fn transition_volume(
        &self,
        tenant: &str,
        id: &str,
        from: VolumeState,
        to: VolumeState,
        instance: Option<&str>,
        host: Option<&str>,
    ) -> Result<(), RepoError> {
        from.check(to)?;
        let n = self.with(|db| {
            db.execute(
                "UPDATE volumes SET state = ?4, instance_id = ?5, host_id = ?6
                 WHERE tenant_id = ?1 AND volume_id = ?2 AND state = ?3",
                params![tenant, id, from, to, instance, host],
            )
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn delete_volume(&self, tenant: &str, id: &str) -> Result<bool, RepoError> {
        self.with(|db| {
            db.execute("DELETE FROM volumes WHERE tenant_id = ?1 AND volume_id = ?2 AND state = 'deleting'", params![tenant, id])
                .map(|n| n == 1)
        })
    }

    fn insert_snapshot(&self, v: &SnapshotRow) -> Result<(), RepoError> {
        self.with(|db| {
            db.execute(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    v.snapshot_id, v.tenant_id, v.volume_id, v.size_gib, v.kms_key_id, v.ciphertext_blob,
                    v.state, v.storage_node, i(v.created)
                ],
            )
            .map(|_| ())
        })
    }

    fn snapshot(&self, tenant: &str, id: &str) -> Result<Option<SnapshotRow>, RepoError> {
        self.with(|db| {
            db.query_row(
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE tenant_id = ?1 AND snapshot_id = ?2"),
                params![tenant, id],
                snapshot_row,
            )
            .optional()
        })
    }

    fn snapshots(&self, tenant: &str) -> Result<Vec<SnapshotRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(&format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE tenant_id = ?1 ORDER BY created, snapshot_id"))?;
            let rows = s.query_map(params![tenant], snapshot_row)?;
            rows.collect()
        })
    }

    fn transition_snapshot(
        &self,
        tenant: &str,
        id: &str,
        from: SnapshotState,
        to: SnapshotState,
    ) -> Result<(), RepoError> {
        from.check(to)?;
        let n = self.with(|db| {
            db.execute(
                "UPDATE snapshots SET state = ?4 WHERE tenant_id = ?1 AND snapshot_id = ?2 AND state = ?3",
                params![tenant, id, from, to],
            )
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn delete_snapshot(&self, tenant: &str, id: &str) -> Result<bool, RepoError> {
        self.with(|db| {
            db.execute("DELETE FROM snapshots WHERE tenant_id = ?1 AND snapshot_id = ?2 AND state = 'deleting'", params![tenant, id])
                .map(|n| n == 1)
        })
    }

    fn volumes_in_transition(&self) -> Result<Vec<VolumeRow>, RepoError> {
        self.with(|db| {
            let mut s = db.prepare(&format!(
                "SELECT {VOLUME_COLS} FROM volumes WHERE state IN ('attaching', 'detaching')"
            ))?;
            let rows = s.query_map([], volume_row)?;
            rows.collect()
        })
    }

    fn reserve_instance(
        &self,
        row: &InstanceRow,
        choose: Chooser,
    ) -> Result<Option<String>, RepoError> {
        // The connection's mutex is the lock: one process, one connection.
        self.with(|db| {
            let tx = db.transaction()?;
            let hosts = {
                let mut s = tx.prepare(
                    "SELECT host_id, addr, cores, dedicated_tenant FROM hosts ORDER BY host_id",
                )?;
                let rows = s.query_map([], |r| {
                    Ok(HostRow {
                        host_id: r.get(0)?,
                        addr: r.get(1)?,
                        cores: u32_of(r.get(2)?),
                        dedicated_tenant: r.get(3)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let live = {
                let mut s = tx.prepare(&format!(
                    "SELECT {INSTANCE_COLS} FROM instances WHERE state != 'terminated'"
                ))?;
                let rows = s.query_map([], instance_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let Some(host_id) = choose(&hosts, &live) else {
                return Ok(None);
            };
            let x = InstanceRow {
                host_id: host_id.clone(),
                ..row.clone()
            };
            tx.execute(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    x.instance_id, x.tenant_id, x.host_id, x.image_id, x.vcpus, x.memory_mib, x.cores,
                    i64::from(x.dedicated), x.state, i(x.created), x.instance_storage_gib
                ],
            )?;
            tx.execute(
                "UPDATE hosts SET dedicated_tenant = ?2 WHERE host_id = ?1",
                params![host_id, x.dedicated.then_some(x.tenant_id.as_str())],
            )?;
            tx.commit()?;
            Ok(Some(host_id))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::repo::contract_suite;

    #[test]
    fn sqlite_passes_repository_contract() {
        contract_suite(&SqliteRepo::open_in_memory().unwrap());
    }

    #[test]
    fn sqlite_file_reopens_at_same_schema() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        contract_suite(&SqliteRepo::open(&p).unwrap());
        let r = SqliteRepo::open(&p).unwrap();
        assert_eq!(
            r.customer("AKIDA0000001").unwrap().unwrap().tenant_id,
            "t-a"
        );
    }
}
