//! The minimal SQL executor the network logic runs on ([`Db`] over one [`V`] value type) and
//! each engine's transaction runner: SQLite's connection, PostgreSQL's transaction under the
//! network advisory lock every replica takes.

use crate::pg::{pg_err, PgRepo};
use crate::repo::{RepoError, SqliteRepo};

/// One SQL value, whichever the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum V {
    I(i64),
    T(String),
    B(bool),
    N,
}

impl V {
    pub(super) fn int(&self) -> i64 {
        match self {
            V::I(i) => *i,
            V::B(b) => i64::from(*b),
            _ => 0,
        }
    }
    pub(super) fn text(&self) -> String {
        match self {
            V::T(s) => s.clone(),
            _ => String::new(),
        }
    }
    pub(super) fn opt_text(&self) -> Option<String> {
        match self {
            V::T(s) => Some(s.clone()),
            _ => None,
        }
    }
    pub(super) fn boolean(&self) -> bool {
        self.int() != 0
    }
}

pub(super) fn t(s: &str) -> V {
    V::T(s.to_string())
}

pub(super) fn u32_of(v: &V) -> u32 {
    u32::try_from(v.int()).unwrap_or(0)
}

/// A transaction of either engine.
pub(crate) trait Db {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError>;
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError>;
}

struct Lite<'a>(&'a rusqlite::Transaction<'a>);

fn lite_params(p: &[V]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as L;
    p.iter()
        .map(|v| match v {
            V::I(i) => L::Integer(*i),
            V::T(s) => L::Text(s.clone()),
            V::B(b) => L::Integer(i64::from(*b)),
            V::N => L::Null,
        })
        .collect()
}

impl Db for Lite<'_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError> {
        let n = self
            .0
            .execute(sql, rusqlite::params_from_iter(lite_params(params)))
            .map_err(lite_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError> {
        use rusqlite::types::ValueRef;
        let mut s = self.0.prepare(sql)?;
        let cols = s.column_count();
        let rows = s.query_map(rusqlite::params_from_iter(lite_params(params)), |r| {
            (0..cols)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Integer(n) => V::I(n),
                        ValueRef::Text(b) => V::T(String::from_utf8_lossy(b).into_owned()),
                        _ => V::N,
                    })
                })
                .collect::<rusqlite::Result<Vec<V>>>()
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

fn lite_err(e: rusqlite::Error) -> RepoError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            RepoError::Conflict
        }
        e => RepoError::Sqlite(e),
    }
}

struct Pg<'a, 'b>(&'a mut postgres::Transaction<'b>);

/// `?N` → `$N`.
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

impl Db for Pg<'_, '_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        self.0.execute(&pg_sql(sql), &refs).map_err(pg_err)
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError> {
        use postgres::types::Type;
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        let rows = self.0.query(&pg_sql(sql), &refs).map_err(pg_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, c) in r.columns().iter().enumerate() {
                let v = match *c.type_() {
                    Type::INT8 => r.get::<_, Option<i64>>(i).map_or(V::N, V::I),
                    Type::INT4 => r.get::<_, Option<i32>>(i).map_or(V::N, |n| V::I(n.into())),
                    Type::BOOL => r.get::<_, Option<bool>>(i).map_or(V::N, V::B),
                    Type::TEXT | Type::VARCHAR => r.get::<_, Option<String>>(i).map_or(V::N, V::T),
                    _ => V::N,
                };
                row.push(v);
            }
            out.push(row);
        }
        Ok(out)
    }
}

fn pg_params(p: &[V]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    p.iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                V::I(i) => Box::new(*i),
                V::T(s) => Box::new(s.clone()),
                V::B(b) => Box::new(*b),
                V::N => Box::new(Option::<String>::None),
            }
        })
        .collect()
}

/// The advisory lock every replica takes around a network change (transaction-scoped).
const NET_LOCK: i64 = 0x6275_6c6b_0002;

impl SqliteRepo {
    pub(super) fn net<T>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError>,
    ) -> Result<T, RepoError> {
        let mut out = None;
        self.with(|c| {
            let tx = c.transaction()?;
            let r = f(&mut Lite(&tx));
            if r.is_ok() {
                tx.commit()?;
            }
            out = Some(r);
            Ok(())
        })?;
        out.unwrap_or(Err(RepoError::Poisoned))
    }
}

impl SqliteRepo {
    /// A read: the same transaction (SQLite has one connection anyway).
    pub(super) fn net_read<T>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError>,
    ) -> Result<T, RepoError> {
        self.net(f)
    }
}

impl PgRepo {
    /// A change: one transaction under the network lock every replica takes.
    pub(super) fn net<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.net_tx(true, f)
    }

    /// A read: one transaction (a consistent view), without the lock.
    pub(super) fn net_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.net_tx(false, f)
    }

    fn net_tx<T: Send + 'static>(
        &self,
        lock: bool,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.run(move |c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            if lock {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&NET_LOCK])
                    .map_err(pg_err)?;
            }
            let r = f(&mut Pg(&mut tx))?;
            tx.commit().map_err(pg_err)?;
            Ok(r)
        })
    }
}
