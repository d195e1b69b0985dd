//! [`Repository`] on [`PgRepo`]: customers, signatures and idempotency, hosts and their pulled
//! audit, instances (with placement under one advisory lock every replica takes) and volumes.
//! Each call is one closure run on the connection's worker thread.

use super::{pg_err, PgRepo};
use crate::repo::{
    CustomerRow, HostRow, InstanceRow, InstanceState, RepoError, Repository, SnapshotRow,
    SnapshotState, VolumeRow, VolumeState,
};

/// The advisory lock every replica's scheduler takes around read-free-capacity + insert
/// (transaction-scoped: released at commit or when the connection dies).
const PLACEMENT_LOCK: i64 = 0x6275_6c6b_0001;

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

const INSTANCE_COLS: &str =
    "instance_id, tenant_id, host_id, image_id, vcpus, memory_mib, cores, dedicated, state, created, instance_storage_gib";
const VOLUME_COLS: &str = "volume_id, tenant_id, size_gib, kms_key_id, ciphertext_blob, state, instance_id, host_id, created, storage_node";

const SNAPSHOT_COLS: &str = "snapshot_id, tenant_id, volume_id, size_gib, kms_key_id, ciphertext_blob, state, storage_node, created";

fn snapshot_row(r: &postgres::Row) -> Result<SnapshotRow, RepoError> {
    Ok(SnapshotRow {
        snapshot_id: r.get(0),
        tenant_id: r.get(1),
        volume_id: r.get(2),
        size_gib: u32_of(r.get(3)),
        kms_key_id: r.get(4),
        ciphertext_blob: r.get(5),
        state: SnapshotState::parse(&r.get::<_, String>(6))?,
        storage_node: r.get(7),
        created: u(r.get(8)),
    })
}

fn instance_row(r: &postgres::Row) -> Result<InstanceRow, RepoError> {
    Ok(InstanceRow {
        instance_id: r.get(0),
        tenant_id: r.get(1),
        host_id: r.get(2),
        image_id: r.get(3),
        vcpus: u32_of(r.get(4)),
        memory_mib: u32_of(r.get(5)),
        cores: u32_of(r.get(6)),
        dedicated: r.get(7),
        state: InstanceState::parse(&r.get::<_, String>(8))?,
        created: u(r.get(9)),
        instance_storage_gib: r.get::<_, Option<i64>>(10).map(u32_of),
    })
}

fn volume_row(r: &postgres::Row) -> Result<VolumeRow, RepoError> {
    Ok(VolumeRow {
        volume_id: r.get(0),
        tenant_id: r.get(1),
        size_gib: u32_of(r.get(2)),
        kms_key_id: r.get(3),
        ciphertext_blob: r.get(4),
        state: VolumeState::parse(&r.get::<_, String>(5))?,
        instance_id: r.get(6),
        host_id: r.get(7),
        created: u(r.get(8)),
        storage_node: r.get(9),
    })
}

fn s(v: &str) -> String {
    v.to_string()
}

impl Repository for PgRepo {
    fn shared(&self) -> bool {
        true
    }

    fn reserve_instance(
        &self,
        row: &InstanceRow,
        choose: crate::repo::Chooser,
    ) -> Result<Option<String>, RepoError> {
        let row = row.clone();
        self.run(move |db| {
            let mut tx = db.transaction().map_err(pg_err)?;
            // Every replica's scheduler serializes here; the lock ends with the transaction.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PLACEMENT_LOCK])
                .map_err(pg_err)?;
            let hosts: Vec<HostRow> = tx
                .query(
                    "SELECT host_id, addr, cores, dedicated_tenant FROM hosts ORDER BY host_id",
                    &[],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| HostRow {
                    host_id: r.get(0),
                    addr: r.get(1),
                    cores: u32_of(r.get(2)),
                    dedicated_tenant: r.get(3),
                })
                .collect();
            let live = tx
                .query(
                    &format!("SELECT {INSTANCE_COLS} FROM instances WHERE state != 'terminated'"),
                    &[],
                )
                .map_err(pg_err)?
                .iter()
                .map(instance_row)
                .collect::<Result<Vec<_>, _>>()?;
            let Some(host_id) = choose(&hosts, &live) else {
                return Ok(None);
            };
            let x = InstanceRow {
                host_id: host_id.clone(),
                ..row
            };
            tx.execute(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
                &[
                    &x.instance_id,
                    &x.tenant_id,
                    &x.host_id,
                    &x.image_id,
                    &i64::from(x.vcpus),
                    &i64::from(x.memory_mib),
                    &i64::from(x.cores),
                    &x.dedicated,
                    &x.state.as_str(),
                    &i(x.created),
                    &x.instance_storage_gib.map(i64::from),
                ],
            )
            .map_err(pg_err)?;
            tx.execute(
                "UPDATE hosts SET dedicated_tenant = $2 WHERE host_id = $1",
                &[&host_id, &x.dedicated.then_some(x.tenant_id.as_str())],
            )
            .map_err(pg_err)?;
            tx.commit().map_err(pg_err)?;
            Ok(Some(host_id))
        })
    }

    fn put_customer(&self, c: &CustomerRow) -> Result<(), RepoError> {
        let c = c.clone();
        self.run(move |db| {
            db.execute(
                "INSERT INTO customers (access_key_id, tenant_id, wrapped_secret) VALUES ($1, $2, $3)",
                &[&c.access_key_id, &c.tenant_id, &c.wrapped_secret],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn customer(&self, akid: &str) -> Result<Option<CustomerRow>, RepoError> {
        let akid = s(akid);
        self.run(move |db| {
            Ok(db
                .query_opt(
                    "SELECT access_key_id, tenant_id, wrapped_secret FROM customers WHERE access_key_id = $1",
                    &[&akid],
                )
                .map_err(pg_err)?
                .map(|r| CustomerRow { access_key_id: r.get(0), tenant_id: r.get(1), wrapped_secret: r.get(2) }))
        })
    }

    fn first_use_of_signature(
        &self,
        sig: &str,
        now: u64,
        forget_before: u64,
    ) -> Result<bool, RepoError> {
        let sig = s(sig);
        self.run(move |db| {
            db.execute("DELETE FROM signatures WHERE seen < $1", &[&i(forget_before)]).map_err(pg_err)?;
            let n = db
                .execute(
                    "INSERT INTO signatures (signature, seen) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&sig, &i(now)],
                )
                .map_err(pg_err)?;
            Ok(n == 1)
        })
    }

    fn idempotency(
        &self,
        tenant: &str,
        action: &str,
        token: &str,
    ) -> Result<Option<(String, String)>, RepoError> {
        let (t, a, k) = (s(tenant), s(action), s(token));
        self.run(move |db| {
            Ok(db
                .query_opt(
                    "SELECT request_hash, response FROM idempotency WHERE tenant_id = $1 AND action = $2 AND token = $3",
                    &[&t, &a, &k],
                )
                .map_err(pg_err)?
                .map(|r| (r.get(0), r.get(1))))
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
        let (t, a, k, h, r) = (s(tenant), s(action), s(token), s(hash), s(response));
        self.run(move |db| {
            db.execute(
                "INSERT INTO idempotency (tenant_id, action, token, request_hash, response) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&t, &a, &k, &h, &r],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn upsert_host(&self, h: &HostRow) -> Result<(), RepoError> {
        let h = h.clone();
        self.run(move |db| {
            db.execute(
                "INSERT INTO hosts (host_id, addr, cores) VALUES ($1, $2, $3)
                 ON CONFLICT (host_id) DO UPDATE SET addr = excluded.addr, cores = excluded.cores",
                &[&h.host_id, &h.addr, &i64::from(h.cores)],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn hosts(&self) -> Result<Vec<HostRow>, RepoError> {
        self.run(move |db| {
            Ok(db
                .query(
                    "SELECT host_id, addr, cores, dedicated_tenant FROM hosts ORDER BY host_id",
                    &[],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| HostRow {
                    host_id: r.get(0),
                    addr: r.get(1),
                    cores: u32_of(r.get(2)),
                    dedicated_tenant: r.get(3),
                })
                .collect())
        })
    }

    fn set_host_dedicated(&self, host_id: &str, tenant: Option<&str>) -> Result<(), RepoError> {
        let (h, t) = (s(host_id), tenant.map(s));
        self.run(move |db| {
            db.execute(
                "UPDATE hosts SET dedicated_tenant = $2 WHERE host_id = $1",
                &[&h, &t],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn set_host_status(&self, host_id: &str, status: &str, now: u64) -> Result<(), RepoError> {
        let (h, st) = (s(host_id), s(status));
        self.run(move |db| {
            db.execute(
                "UPDATE hosts SET status = $2, polled = $3 WHERE host_id = $1",
                &[&h, &st, &i(now)],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn host_status(&self, host_id: &str) -> Result<Option<(String, u64)>, RepoError> {
        let h = s(host_id);
        self.run(move |db| {
            Ok(db
                .query_opt(
                    "SELECT status, polled FROM hosts WHERE host_id = $1 AND status IS NOT NULL",
                    &[&h],
                )
                .map_err(pg_err)?
                .map(|r| (r.get(0), u(r.get::<_, Option<i64>>(1).unwrap_or(0)))))
        })
    }

    fn host_audit_cursor(&self, host_id: &str) -> Result<u64, RepoError> {
        let h = s(host_id);
        self.run(move |db| {
            Ok(db
                .query_opt("SELECT audit_cursor FROM hosts WHERE host_id = $1", &[&h])
                .map_err(pg_err)?
                .map(|r| u(r.get(0)))
                .unwrap_or(0))
        })
    }

    fn append_host_audit(&self, host_id: &str, records: &[(u64, String)]) -> Result<(), RepoError> {
        let (h, recs) = (s(host_id), records.to_vec());
        self.run(move |db| {
            let mut tx = db.transaction().map_err(pg_err)?;
            let mut max = 0u64;
            for (seq, line) in &recs {
                tx.execute(
                    "INSERT INTO host_audit (host_id, seq, line) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&h, &i(*seq), line],
                )
                .map_err(pg_err)?;
                max = max.max(*seq);
            }
            tx.execute(
                "UPDATE hosts SET audit_cursor = GREATEST(audit_cursor, $2) WHERE host_id = $1",
                &[&h, &i(max)],
            )
            .map_err(pg_err)?;
            tx.commit().map_err(pg_err)
        })
    }

    fn host_audit_count(&self, host_id: &str) -> Result<u64, RepoError> {
        let h = s(host_id);
        self.run(move |db| {
            Ok(u(db
                .query_one("SELECT COUNT(*) FROM host_audit WHERE host_id = $1", &[&h])
                .map_err(pg_err)?
                .get(0)))
        })
    }

    fn host_audit_after(
        &self,
        host_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, RepoError> {
        let h = s(host_id);
        self.run(move |db| {
            Ok(db
                .query(
                    "SELECT seq, line FROM host_audit WHERE host_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&h, &i(after), &i64::from(limit)],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| (u(r.get(0)), r.get(1)))
                .collect())
        })
    }

    fn insert_instance(&self, x: &InstanceRow) -> Result<(), RepoError> {
        let x = x.clone();
        self.run(move |db| {
            db.execute(
                &format!("INSERT INTO instances ({INSTANCE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
                &[
                    &x.instance_id,
                    &x.tenant_id,
                    &x.host_id,
                    &x.image_id,
                    &i64::from(x.vcpus),
                    &i64::from(x.memory_mib),
                    &i64::from(x.cores),
                    &x.dedicated,
                    &x.state.as_str(),
                    &i(x.created),
                    &x.instance_storage_gib.map(i64::from),
                ],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn instance(&self, tenant: &str, id: &str) -> Result<Option<InstanceRow>, RepoError> {
        let (t, id) = (s(tenant), s(id));
        self.run(move |db| {
            db
                .query_opt(
                    &format!("SELECT {INSTANCE_COLS} FROM instances WHERE tenant_id = $1 AND instance_id = $2"),
                    &[&t, &id],
                )
                .map_err(pg_err)?
                .map(|r| instance_row(&r)).transpose()
        })
    }

    fn instances(&self, tenant: &str) -> Result<Vec<InstanceRow>, RepoError> {
        let t = s(tenant);
        self.run(move |db| {
            db
                .query(
                    &format!("SELECT {INSTANCE_COLS} FROM instances WHERE tenant_id = $1 ORDER BY created, instance_id"),
                    &[&t],
                )
                .map_err(pg_err)?
                .iter()
                .map(instance_row)
                .collect::<Result<Vec<_>, _>>()
        })
    }

    fn live_instances(&self) -> Result<Vec<InstanceRow>, RepoError> {
        self.run(move |db| {
            db.query(
                &format!("SELECT {INSTANCE_COLS} FROM instances WHERE state != 'terminated'"),
                &[],
            )
            .map_err(pg_err)?
            .iter()
            .map(instance_row)
            .collect::<Result<Vec<_>, _>>()
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
        let (t, id, f, st) = (s(tenant), s(id), from.as_str(), to.as_str());
        let n = self.run(move |db| {
            db.execute(
                "UPDATE instances SET state = $4 WHERE tenant_id = $1 AND instance_id = $2 AND state = $3",
                &[&t, &id, &f, &st],
            )
            .map_err(pg_err)
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn insert_volume(&self, v: &VolumeRow) -> Result<(), RepoError> {
        let v = v.clone();
        self.run(move |db| {
            db.execute(
                &format!("INSERT INTO volumes ({VOLUME_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
                &[
                    &v.volume_id,
                    &v.tenant_id,
                    &i64::from(v.size_gib),
                    &v.kms_key_id,
                    &v.ciphertext_blob,
                    &v.state.as_str(),
                    &v.instance_id,
                    &v.host_id,
                    &i(v.created),
                    &v.storage_node,
                ],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn volume(&self, tenant: &str, id: &str) -> Result<Option<VolumeRow>, RepoError> {
        let (t, id) = (s(tenant), s(id));
        self.run(move |db| {
            db.query_opt(
                &format!(
                    "SELECT {VOLUME_COLS} FROM volumes WHERE tenant_id = $1 AND volume_id = $2"
                ),
                &[&t, &id],
            )
            .map_err(pg_err)?
            .map(|r| volume_row(&r))
            .transpose()
        })
    }

    fn volumes(&self, tenant: &str) -> Result<Vec<VolumeRow>, RepoError> {
        let t = s(tenant);
        self.run(move |db| {
            db
                .query(
                    &format!("SELECT {VOLUME_COLS} FROM volumes WHERE tenant_id = $1 ORDER BY created, volume_id"),
                    &[&t],
                )
                .map_err(pg_err)?
                .iter()
                .map(volume_row)
                .collect::<Result<Vec<_>, _>>()
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
        let (t, id, f, to, inst, h) = (
            s(tenant),
            s(id),
            from.as_str(),
            to.as_str(),
            instance.map(s),
            host.map(s),
        );
        let n = self.run(move |db| {
            db.execute(
                "UPDATE volumes SET state = $4, instance_id = $5, host_id = $6
                 WHERE tenant_id = $1 AND volume_id = $2 AND state = $3",
                &[&t, &id, &f, &to, &inst, &h],
            )
            .map_err(pg_err)
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn delete_volume(&self, tenant: &str, id: &str) -> Result<bool, RepoError> {
        let (t, id) = (s(tenant), s(id));
        self.run(move |db| {
            db.execute(
                "DELETE FROM volumes WHERE tenant_id = $1 AND volume_id = $2 AND state = 'deleting'",
                &[&t, &id],
            )
            .map(|n| n == 1)
            .map_err(pg_err)
        })
    }

    fn insert_snapshot(&self, v: &SnapshotRow) -> Result<(), RepoError> {
        let v = v.clone();
        self.run(move |db| {
            db.execute(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
                &[
                    &v.snapshot_id,
                    &v.tenant_id,
                    &v.volume_id,
                    &i64::from(v.size_gib),
                    &v.kms_key_id,
                    &v.ciphertext_blob,
                    &v.state.as_str(),
                    &v.storage_node,
                    &i(v.created),
                ],
            )
            .map(|_| ())
            .map_err(pg_err)
        })
    }

    fn snapshot(&self, tenant: &str, id: &str) -> Result<Option<SnapshotRow>, RepoError> {
        let (t, id) = (s(tenant), s(id));
        self.run(move |db| {
            db.query_opt(
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE tenant_id = $1 AND snapshot_id = $2"),
                &[&t, &id],
            )
            .map_err(pg_err)?
            .map(|r| snapshot_row(&r))
            .transpose()
        })
    }

    fn snapshots(&self, tenant: &str) -> Result<Vec<SnapshotRow>, RepoError> {
        let t = s(tenant);
        self.run(move |db| {
            db.query(
                &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE tenant_id = $1 ORDER BY created, snapshot_id"),
                &[&t],
            )
            .map_err(pg_err)?
            .iter()
            .map(snapshot_row)
            .collect::<Result<Vec<_>, _>>()
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
        let (t, id, f, to) = (s(tenant), s(id), from.as_str(), to.as_str());
        let n = self.run(move |db| {
            db.execute(
                "UPDATE snapshots SET state = $4 WHERE tenant_id = $1 AND snapshot_id = $2 AND state = $3",
                &[&t, &id, &f, &to],
            )
            .map_err(pg_err)
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(RepoError::Stale)
        }
    }

    fn delete_snapshot(&self, tenant: &str, id: &str) -> Result<bool, RepoError> {
        let (t, id) = (s(tenant), s(id));
        self.run(move |db| {
            db.execute(
                "DELETE FROM snapshots WHERE tenant_id = $1 AND snapshot_id = $2 AND state = 'deleting'",
                &[&t, &id],
            )
            .map(|n| n == 1)
            .map_err(pg_err)
        })
    }

    fn volumes_in_transition(&self) -> Result<Vec<VolumeRow>, RepoError> {
        self.run(move |db| {
            db.query(
                &format!(
                    "SELECT {VOLUME_COLS} FROM volumes WHERE state IN ('attaching', 'detaching')"
                ),
                &[],
            )
            .map_err(pg_err)?
            .iter()
            .map(volume_row)
            .collect::<Result<Vec<_>, _>>()
        })
    }
}
