//! PostgreSQL backend of [`Repository`](crate::repo::Repository) (the production option): the same schema, the same
//! tenant scoping, the same contract suite. The synchronous `postgres` client lives on one
//! dedicated thread (outside any async runtime); calls are shipped to it as closures.
//!
//! This file holds the connection: the worker thread, reconnection, migrations and the mapping
//! of server errors to [`RepoError`]; `repository` implements the trait on it (the
//! network and workflow parts are shared with SQLite: `crate::net_store`,
//! `crate::workflow::store`).

mod repository;

use std::str::FromStr;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::repo::RepoError;

/// A call shipped to the worker: the live connection, or `None` when the server cannot be
/// reached (the call then answers [`RepoError::Unavailable`] without running).
type Job = Box<dyn FnOnce(Option<&mut Client>) + Send>;

pub struct PgRepo {
    tx: Mutex<mpsc::Sender<Job>>,
}

/// How long a (re)connection attempt may take before the call is answered `Unavailable`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Drops every table of the control plane's schema (and its version record) from the database
/// at `url`: a fresh schema for a test or a benchmark run. Never called by the service.
pub fn drop_schema(url: &str) -> Result<(), RepoError> {
    let mut c = Client::connect(url, NoTls).map_err(pg_err)?;
    let mut tables = crate::schema::tables();
    tables.push("schema_version");
    c.batch_execute(&format!("DROP TABLE IF EXISTS {}", tables.join(", ")))
        .map_err(pg_err)
}

pub(crate) fn pg_err(e: postgres::Error) -> RepoError {
    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
        return RepoError::Conflict;
    }
    // Connection exceptions (08…), operator intervention (57P…: shutdown, terminated backend),
    // a closed socket or an I/O failure: the store is gone, not the statement wrong.
    let class = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    if e.is_closed()
        || class.starts_with("08")
        || class.starts_with("57P")
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
    {
        tracing::warn!(error = %e, "postgres unreachable");
        return RepoError::Unavailable;
    }
    tracing::warn!(error = %e, "postgres");
    RepoError::Postgres
}

impl PgRepo {
    /// Connects (e.g. `host=127.0.0.1 port=5432 user=bulkhead dbname=bulkhead`) and migrates.
    pub fn connect(url: &str) -> Result<PgRepo, RepoError> {
        let mut client = config(url)?.connect(NoTls).map_err(pg_err)?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .map_err(pg_err)?;
        let version: i64 = client
            .query_opt("SELECT version FROM schema_version", &[])
            .map_err(pg_err)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let migrations = crate::schema::migrations(crate::schema::Dialect::Postgres);
        let known = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(RepoError::TooNew(version));
        }
        for (n, m) in migrations.iter().enumerate() {
            let v = i64::try_from(n + 1).unwrap_or(i64::MAX);
            if v > version {
                let mut tx = client.transaction().map_err(pg_err)?;
                tx.batch_execute(m).map_err(pg_err)?;
                tx.execute("DELETE FROM schema_version", &[])
                    .map_err(pg_err)?;
                tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&v])
                    .map_err(pg_err)?;
                tx.commit().map_err(pg_err)?;
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let cfg = config(url)?;
        std::thread::Builder::new()
            .name("pg-repo".into())
            .spawn(move || {
                let mut live = Some(client);
                for job in rx {
                    // A lost connection is replaced before the next call; while the server is
                    // unreachable every call answers `Unavailable` (never a cached answer).
                    if live.as_ref().is_none_or(Client::is_closed) {
                        live = match cfg.connect(NoTls) {
                            Ok(c) => {
                                tracing::info!("postgres connection re-established");
                                Some(c)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres unreachable");
                                None
                            }
                        };
                    }
                    job(live.as_mut());
                }
            })
            .map_err(|_| RepoError::Postgres)?;
        Ok(PgRepo { tx: Mutex::new(tx) })
    }

    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        let (reply, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = reply.send(match c {
                Some(c) => f(c),
                None => Err(RepoError::Unavailable),
            });
        });
        self.tx
            .lock()
            .map_err(|_| RepoError::Poisoned)?
            .send(job)
            .map_err(|_| RepoError::Postgres)?;
        rx.recv().map_err(|_| RepoError::Postgres)?
    }
}

fn config(url: &str) -> Result<postgres::Config, RepoError> {
    let mut cfg = postgres::Config::from_str(url).map_err(pg_err)?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::repo::Repository;

    /// The same repository contract as SQLite, against a real PostgreSQL server named by
    /// `BULKHEAD_PG_URL` (see `scripts/with-postgres.sh`). Without it the test says so and passes.
    #[test]
    fn postgres_passes_repository_contract() {
        let Ok(url) = std::env::var("BULKHEAD_PG_URL") else {
            bulkhead_testkit::skip_or_fail(
                "postgres_passes_repository_contract: BULKHEAD_PG_URL not set (run under scripts/with-postgres.sh)",
            );
            return;
        };
        // A fresh schema per run: drop what an earlier run left.
        drop_schema(&url).unwrap();
        let repo = PgRepo::connect(&url).unwrap();
        crate::repo::contract_suite(&repo);
        // Reconnect: migrations are not re-run, data is still there.
        let again = PgRepo::connect(&url).unwrap();
        assert_eq!(
            again.customer("AKIDA0000001").unwrap().unwrap().tenant_id,
            "t-a"
        );
        two_replicas_never_hand_out_one_address(repo, again);
    }

    /// Two replicas (two connections) allocating in one subnet at the same time: every
    /// address, card id and MAC is handed out once, and a released one is handed out again.
    fn two_replicas_never_hand_out_one_address(r1: PgRepo, r2: PgRepo) {
        use crate::net::*;
        use crate::net_store::NetStore;
        let cidr = |s: &str| Cidr::parse(s).unwrap();
        r1.create_vpc(
            &VpcRow {
                vpc_id: "vpc-race".into(),
                tenant_id: "t-race".into(),
                cidr: cidr("10.5.0.0/16"),
                vpc_number: 0,
                epoch: 1,
                is_default: false,
                created: 1,
            },
            Some(&SubnetRow {
                subnet_id: "subnet-race".into(),
                tenant_id: "t-race".into(),
                vpc_id: "vpc-race".into(),
                cidr: cidr("10.5.1.0/24"),
                is_default: false,
                created: 1,
            }),
            &SecurityGroupRow {
                group_id: "sg-race".into(),
                tenant_id: "t-race".into(),
                vpc_id: "vpc-race".into(),
                group_name: "default".into(),
                description: String::new(),
                is_default: true,
                ingress: vec![],
                created: 1,
            },
        )
        .unwrap();
        const EACH: usize = 25;
        let go = |r: PgRepo, who: &'static str| {
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|k| {
                        r.allocate_interface(
                            "t-race",
                            &format!("i-{who}-{k}"),
                            "subnet-race",
                            &["sg-race".into()],
                        )
                        .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let (a, b) = (go(r1, "a"), go(r2, "b"));
        let mut all = a.join().unwrap();
        all.extend(b.join().unwrap());
        assert_eq!(all.len(), 2 * EACH);
        let mut ips: Vec<u32> = all.iter().map(|n| n.ip.0).collect();
        let mut cards: Vec<u32> = all.iter().map(|n| n.card_id).collect();
        ips.sort_unstable();
        ips.dedup();
        cards.sort_unstable();
        cards.dedup();
        assert_eq!(ips.len(), 2 * EACH, "an address was handed out twice");
        assert_eq!(cards.len(), 2 * EACH, "a card id was handed out twice");
        // The lowest usable addresses, none reserved.
        let lo = Ipv4::parse("10.5.1.4").unwrap().0;
        assert_eq!(ips.first().copied(), Some(lo));
        assert_eq!(
            ips.last().copied(),
            Some(lo + u32::try_from(2 * EACH - 1).unwrap())
        );
    }
}
