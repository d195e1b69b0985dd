//! The KMS's own SQLite store (WAL, versioned migrations). It holds only wrapped material:
//! CMKs and customer signing secrets are AES-256-GCM-wrapped under the root key; data keys are
//! not stored at all (the control plane keeps their ciphertext).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store lock poisoned")]
    Poisoned,
    #[error("database schema version {0} is newer than this binary")]
    TooNew(i64),
    #[error("the volume's key belongs to another tenant")]
    NotOwner,
    #[error("the key family's member is gone or not this tenant's")]
    NoSuchMember,
    #[error("the new member id is already keyed or was destroyed")]
    MemberExists,
}

/// Versioned migrations; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE customers (
        access_key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        wrapped_secret BLOB NOT NULL,
        created INTEGER NOT NULL);
     CREATE TABLE cmks (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        description TEXT NOT NULL,
        created INTEGER NOT NULL);
     CREATE TABLE grants (
        grant_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES cmks(key_id),
        tenant_id TEXT NOT NULL,
        volume_id TEXT NOT NULL,
        created INTEGER NOT NULL,
        revoked INTEGER);
     CREATE INDEX grants_by_key ON grants(key_id, tenant_id, volume_id);",
    // A forwarded customer authorization opens a data key for one host, once.
    "CREATE TABLE used_authorizations (
        signature TEXT PRIMARY KEY,
        used INTEGER NOT NULL);",
    // VPC epoch keys: the owner of each VPC, and its keys wrapped under the root key.
    "CREATE TABLE vpcs (
        vpc_id TEXT PRIMARY KEY,
        vpc_number INTEGER NOT NULL UNIQUE,
        tenant_id TEXT NOT NULL,
        created INTEGER NOT NULL);
     CREATE TABLE vpc_epochs (
        vpc_id TEXT NOT NULL REFERENCES vpcs(vpc_id),
        epoch INTEGER NOT NULL,
        wrapped BLOB NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY (vpc_id, epoch));",
    // Crypto-erase: each volume's data key (blob version 2) needs this per-volume secret, kept
    // only here and only wrapped under the root key. DestroyDataKey deletes it (secure_delete:
    // the page is overwritten, the WAL checkpointed) and leaves a tombstone naming the owner.
    "CREATE TABLE volume_secrets (
        volume_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created INTEGER NOT NULL);
     CREATE TABLE destroyed_volumes (
        volume_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        destroyed INTEGER NOT NULL);",
    // Key families (snapshots): a snapshot and every volume made from it open the same data-key
    // blob, so they share one secret, kept under the family id (the volume the blob was made
    // for). Each member has a row; DestroyDataKey on a member drops its row and tombstones it,
    // and the family's secret is destroyed with its last member. Every existing volume is the
    // one member of its own family.
    "CREATE TABLE family_members (
        member_id TEXT PRIMARY KEY,
        family_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        created INTEGER NOT NULL);
     CREATE INDEX family_members_by_family ON family_members(family_id);
     INSERT INTO family_members (member_id, family_id, tenant_id, created)
        SELECT volume_id, volume_id, tenant_id, created FROM volume_secrets;",
];

/// What the store knows about one volume's data-key secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSecret {
    /// Live: the owner, the family whose secret (and blob) the volume shares (the volume itself
    /// unless it was made from a snapshot), and that secret wrapped under the root key.
    Live {
        tenant_id: String,
        family_id: String,
        wrapped: Vec<u8>,
    },
    /// Destroyed (crypto-erased) for this owner.
    Destroyed { tenant_id: String },
    /// Never made here (a version-1 blob, or another KMS's volume).
    Unknown,
}

/// A VPC the KMS keeps epoch keys for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcRow {
    pub vpc_id: String,
    pub vpc_number: u32,
    pub tenant_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmkRow {
    pub key_id: String,
    pub tenant_id: String,
    pub wrapped: Vec<u8>,
    pub description: String,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub grant_id: String,
    pub key_id: String,
    pub tenant_id: String,
    pub volume_id: String,
    pub revoked: bool,
}

pub struct Store {
    conn: Mutex<Connection>,
}

/// Whether anything names `id`: a key-family member, a tombstone, a secret or any tenant's
/// grant. Such an id can never become a new member (nor be tombstoned as unknown).
fn id_is_named(tx: &rusqlite::Transaction<'_>, id: &str) -> rusqlite::Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM family_members WHERE member_id = ?1
             UNION ALL SELECT 1 FROM destroyed_volumes WHERE volume_id = ?1
             UNION ALL SELECT 1 FROM volume_secrets WHERE volume_id = ?1
             UNION ALL SELECT 1 FROM grants WHERE volume_id = ?1",
            params![id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // A destroyed volume secret is overwritten in the file, not only unlinked from the tree.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(StoreError::TooNew(version));
        }
        for (i, m) in MIGRATIONS.iter().enumerate() {
            let v = i64::try_from(i + 1).unwrap_or(i64::MAX);
            if v <= version {
                continue;
            }
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", v)?;
            tx.commit()?;
            tracing::info!(version = v, "kms store migrated");
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&mut c)?)
    }

    /// Inserts a customer; returns false if the access key already exists.
    pub fn insert_customer(
        &self,
        akid: &str,
        tenant: &str,
        wrapped: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO customers (access_key_id, tenant_id, wrapped_secret, created) VALUES (?1, ?2, ?3, ?4)",
                params![akid, tenant, wrapped, secs(now)],
            )?;
            Ok(n == 1)
        })
    }

    pub fn tenant_has_customer(&self, tenant: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM customers WHERE tenant_id = ?1 LIMIT 1",
                params![tenant],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
        })
    }

    /// (tenant, wrapped secret) of an access key.
    pub fn customer(&self, akid: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT tenant_id, wrapped_secret FROM customers WHERE access_key_id = ?1",
                params![akid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn insert_cmk(&self, row: &CmkRow) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO cmks (key_id, tenant_id, wrapped, description, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![row.key_id, row.tenant_id, row.wrapped, row.description, secs(row.created)],
            )
            .map(|_| ())
        })
    }

    pub fn cmk(&self, key_id: &str) -> Result<Option<CmkRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT key_id, tenant_id, wrapped, description, created FROM cmks WHERE key_id = ?1",
                params![key_id],
                |r| {
                    Ok(CmkRow {
                        key_id: r.get(0)?,
                        tenant_id: r.get(1)?,
                        wrapped: r.get(2)?,
                        description: r.get(3)?,
                        created: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    })
                },
            )
            .optional()
        })
    }

    pub fn insert_grant(&self, g: &GrantRow, now: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO grants (grant_id, key_id, tenant_id, volume_id, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![g.grant_id, g.key_id, g.tenant_id, g.volume_id, secs(now)],
            )
            .map(|_| ())
        })
    }

    /// An unrevoked grant of `key_id` to `tenant` for `volume_id`.
    pub fn active_grant(
        &self,
        key_id: &str,
        tenant: &str,
        volume_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT grant_id FROM grants WHERE key_id = ?1 AND tenant_id = ?2 AND volume_id = ?3 AND revoked IS NULL LIMIT 1",
                params![key_id, tenant, volume_id],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Whether this customer authorization (its signature, hex) already opened a data key.
    pub fn authorization_used(&self, signature: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM used_authorizations WHERE signature = ?1",
                params![signature],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
        })
    }

    /// Marks an authorization used; false if it already was (atomic: of two concurrent uses
    /// exactly one wins). Entries older than `forget_before` are pruned (a signature that old is
    /// refused as stale anyway).
    pub fn consume_authorization(
        &self,
        signature: &str,
        now: u64,
        forget_before: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM used_authorizations WHERE used < ?1",
                params![secs(forget_before)],
            )?;
            let n = c.execute(
                "INSERT OR IGNORE INTO used_authorizations (signature, used) VALUES (?1, ?2)",
                params![signature, secs(now)],
            )?;
            Ok(n == 1)
        })
    }

    /// Records a new volume's secret (wrapped); false if the volume already has one or was
    /// destroyed (a volume id is never keyed twice).
    pub fn insert_volume_secret(
        &self,
        volume_id: &str,
        tenant: &str,
        wrapped: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let gone: bool = tx
                .query_row(
                    "SELECT 1 FROM destroyed_volumes WHERE volume_id = ?1",
                    params![volume_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if gone {
                return Ok(false);
            }
            let member: bool = tx
                .query_row(
                    "SELECT 1 FROM family_members WHERE member_id = ?1",
                    params![volume_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if member {
                return Ok(false);
            }
            let n = tx.execute(
                "INSERT OR IGNORE INTO volume_secrets (volume_id, tenant_id, wrapped, created) VALUES (?1, ?2, ?3, ?4)",
                params![volume_id, tenant, wrapped, secs(now)],
            )?;
            if n != 1 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO family_members (member_id, family_id, tenant_id, created) VALUES (?1, ?1, ?2, ?3)",
                params![volume_id, tenant, secs(now)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// The state of `volume_id`'s secret (through its key family).
    pub fn volume_secret(&self, volume_id: &str) -> Result<VolumeSecret, StoreError> {
        self.with(|c| {
            if let Some((tenant_id, family_id, wrapped)) = c
                .query_row(
                    "SELECT m.tenant_id, m.family_id, s.wrapped FROM family_members m
                     JOIN volume_secrets s ON s.volume_id = m.family_id
                     WHERE m.member_id = ?1",
                    params![volume_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .optional()?
            {
                return Ok(VolumeSecret::Live {
                    tenant_id,
                    family_id,
                    wrapped,
                });
            }
            Ok(c.query_row(
                "SELECT tenant_id FROM destroyed_volumes WHERE volume_id = ?1",
                params![volume_id],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .map_or(VolumeSecret::Unknown, |tenant_id| VolumeSecret::Destroyed {
                tenant_id,
            }))
        })
    }

    /// Adds `member_id` to the key family of the live member `source_id` (a snapshot of a
    /// volume, or a volume made from a snapshot), for `tenant`, with a grant of `key_id`;
    /// returns the family id. The source must be live and `tenant`'s; the new id must never
    /// have been keyed, granted (a volume keyed before families, any tenant's) or destroyed.
    /// One transaction.
    pub fn add_family_member(
        &self,
        source_id: &str,
        member_id: &str,
        tenant: &str,
        grant: &GrantRow,
        now: u64,
    ) -> Result<String, StoreError> {
        enum Out {
            Added(String),
            NoSource,
            Exists,
        }
        let out = self.with(|c| {
            let tx = c.transaction()?;
            let family: Option<String> = tx
                .query_row(
                    "SELECT m.family_id FROM family_members m
                     JOIN volume_secrets s ON s.volume_id = m.family_id
                     WHERE m.member_id = ?1 AND m.tenant_id = ?2",
                    params![source_id, tenant],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(family) = family else {
                return Ok(Out::NoSource);
            };
            let taken = id_is_named(&tx, member_id)?;
            if taken {
                return Ok(Out::Exists);
            }
            tx.execute(
                "INSERT INTO family_members (member_id, family_id, tenant_id, created) VALUES (?1, ?2, ?3, ?4)",
                params![member_id, family, tenant, secs(now)],
            )?;
            tx.execute(
                "INSERT INTO grants (grant_id, key_id, tenant_id, volume_id, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![grant.grant_id, grant.key_id, tenant, member_id, secs(now)],
            )?;
            tx.commit()?;
            Ok(Out::Added(family))
        })?;
        match out {
            Out::Added(f) => Ok(f),
            Out::NoSource => Err(StoreError::NoSuchMember),
            Out::Exists => Err(StoreError::MemberExists),
        }
    }

    /// How many live members the key family `family_id` has.
    pub fn family_members(&self, family_id: &str) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM family_members WHERE family_id = ?1",
                params![family_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
        })
    }

    /// Whether `tenant` ever held a grant for `volume_id` (the owner of a version-1 volume).
    pub fn tenant_has_volume_grant(
        &self,
        tenant: &str,
        volume_id: &str,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT 1 FROM grants WHERE tenant_id = ?1 AND volume_id = ?2 LIMIT 1",
                params![tenant, volume_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
    }

    /// Crypto-erase of one key-family member: drops `volume_id`'s membership, records its
    /// tombstone (its blob is refused from now on) and revokes its grants; when it was the
    /// family's last member, deletes the family's secret (its page overwritten: `secure_delete`).
    /// Then checkpoints the WAL so no copy of a deleted secret stays in it. Returns how many
    /// members the family still has (0: the secret is gone). Idempotent.
    pub fn destroy_volume_secret(
        &self,
        volume_id: &str,
        tenant: &str,
        now: u64,
    ) -> Result<u64, StoreError> {
        let done = self.with(|c| {
            let tx = c.transaction()?;
            // Ownership is re-checked inside the transaction: a secret another tenant holds for
            // this id is never touched, and then nothing is tombstoned either.
            let other: bool = tx
                .query_row(
                    "SELECT 1 FROM family_members WHERE member_id = ?1 AND tenant_id <> ?2
                     UNION ALL SELECT 1 FROM volume_secrets WHERE volume_id = ?1 AND tenant_id <> ?2",
                    params![volume_id, tenant],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if other {
                return Ok(None);
            }
            // A member row's family; a volume keyed before families existed is its own.
            let family: String = tx
                .query_row(
                    "SELECT family_id FROM family_members WHERE member_id = ?1",
                    params![volume_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or_else(|| volume_id.to_string());
            tx.execute(
                "DELETE FROM family_members WHERE member_id = ?1 AND tenant_id = ?2",
                params![volume_id, tenant],
            )?;
            let left: i64 = tx.query_row(
                "SELECT COUNT(*) FROM family_members WHERE family_id = ?1",
                params![family],
                |r| r.get(0),
            )?;
            if left == 0 {
                tx.execute(
                    "DELETE FROM volume_secrets WHERE volume_id = ?1",
                    params![family],
                )?;
            }
            tx.execute(
                "INSERT OR IGNORE INTO destroyed_volumes (volume_id, tenant_id, destroyed) VALUES (?1, ?2, ?3)",
                params![volume_id, tenant, secs(now)],
            )?;
            tx.execute(
                "UPDATE grants SET revoked = ?3 WHERE tenant_id = ?1 AND volume_id = ?2 AND revoked IS NULL",
                params![tenant, volume_id, secs(now)],
            )?;
            tx.commit()?;
            // Copy the WAL back and truncate it, so no page of the secret stays there; a busy
            // checkpoint (a reader holding the WAL) is retried.
            for _ in 0..50 {
                let busy: i64 =
                    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
                if busy == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(Some(u64::try_from(left).unwrap_or(0)))
        })?;
        done.ok_or(StoreError::NotOwner)
    }

    /// Tombstones `volume_id` for `tenant` when nothing names it yet (no member, secret, grant of
    /// any tenant, or tombstone): the owner's signed delete of an id the KMS never keyed (a
    /// create whose `ShareDataKey` or `GenerateDataKey` is late or lost), so that a late call
    /// cannot key it afterwards. False (nothing written) when something names it. One
    /// transaction, so a racing [`Store::add_family_member`] either lands first (then this is
    /// false) or is refused.
    pub fn tombstone_unknown(
        &self,
        volume_id: &str,
        tenant: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let named = id_is_named(&tx, volume_id)?;
            if named {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO destroyed_volumes (volume_id, tenant_id, destroyed) VALUES (?1, ?2, ?3)",
                params![volume_id, tenant, secs(now)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Revokes every active grant of `key_id` for `volume_id` held by `tenant`. Returns how many.
    pub fn revoke_grants(
        &self,
        key_id: &str,
        tenant: &str,
        volume_id: &str,
        now: u64,
    ) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE grants SET revoked = ?4 WHERE key_id = ?1 AND tenant_id = ?2 AND volume_id = ?3 AND revoked IS NULL",
                params![key_id, tenant, volume_id, secs(now)],
            )
        })
    }

    /// The VPC with this id, or the one with this number (either clash matters to a create).
    pub fn vpc(&self, vpc_id: &str, vpc_number: u32) -> Result<Option<VpcRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT vpc_id, vpc_number, tenant_id FROM vpcs WHERE vpc_id = ?1 OR vpc_number = ?2 LIMIT 1",
                params![vpc_id, i64::from(vpc_number)],
                |r| {
                    Ok(VpcRow {
                        vpc_id: r.get(0)?,
                        vpc_number: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        tenant_id: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    /// The VPC with this id.
    pub fn vpc_by_id(&self, vpc_id: &str) -> Result<Option<VpcRow>, StoreError> {
        Ok(self.vpc(vpc_id, u32::MAX)?.filter(|v| v.vpc_id == vpc_id))
    }

    /// Records a VPC and its first epoch key (one transaction); false if the id or number is
    /// taken.
    pub fn insert_vpc(
        &self,
        row: &VpcRow,
        epoch: u32,
        wrapped: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO vpcs (vpc_id, vpc_number, tenant_id, created) VALUES (?1, ?2, ?3, ?4)",
                params![row.vpc_id, i64::from(row.vpc_number), row.tenant_id, secs(now)],
            )?;
            if n != 1 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO vpc_epochs (vpc_id, epoch, wrapped, created) VALUES (?1, ?2, ?3, ?4)",
                params![row.vpc_id, i64::from(epoch), wrapped, secs(now)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// The wrapped key of one epoch of a VPC.
    pub fn vpc_epoch(&self, vpc_id: &str, epoch: u32) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT wrapped FROM vpc_epochs WHERE vpc_id = ?1 AND epoch = ?2",
                params![vpc_id, i64::from(epoch)],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// The newest epoch of a VPC.
    pub fn vpc_latest_epoch(&self, vpc_id: &str) -> Result<Option<u32>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT MAX(epoch) FROM vpc_epochs WHERE vpc_id = ?1",
                params![vpc_id],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|o| o.and_then(|e| u32::try_from(e).ok()))
        })
    }
}
